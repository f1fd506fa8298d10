"""Validation quality against batch size and learning-rate rule: the guidance for larger batches on a GPU.

    .venv/bin/python benchmarks/batch_size.py                  # the docs' run (docs/performance.md), ~7 minutes
    .venv/bin/python benchmarks/batch_size.py --rows 500000 --epochs 2   # the docs' second run
    .venv/bin/python benchmarks/batch_size.py --batch-sizes 256,1024,4096,16384 --jobs 2
    .venv/bin/python benchmarks/batch_size.py --rows 20000 --epochs 1 --batch-sizes 1024,4096 --seeds 0   # a smoke run

A GPU step of a small recommendation model is bound by host work, so rows/s grows almost linearly with the batch
size until the GPU is busy (docs/performance.md); but an epoch at batch ``B`` takes ``N / B`` steps, so a larger batch
at the same learning rate makes fewer updates of the same size and usually learns less per epoch. This benchmark
measures how much, and how much of it a larger learning rate wins back.

Every run trains the throughput benchmark's MMoE (``throughput.build_model("mmoe")``: 4 experts (256, 128), towers
(64,), on ``bench_data``'s features: 16 sparse with vocabularies from 10 to 100,000, 8 dense, one 20-long history;
tasks ``click`` and ``conversion`` (binary) and ``dwell`` (regression)) from scratch through ``lightning.Trainer`` +
``ParquetDataModule`` + ``MultiTaskLightningModule`` (fused Adam, the library's defaults otherwise) for ``--epochs``
epochs on ``--rows`` training rows, then validates once on ``bench_data.val_rows(rows)`` rows. With
``k = batch / --base-batch`` the learning-rate rules are:

* ``unchanged``: ``--base-lr`` at every batch size;
* ``sqrt``: ``base_lr * sqrt(k)`` (the rule usually given for Adam);
* ``linear``: ``base_lr * k`` (Goyal et al., 2017, for SGD);
* ``linear-warmup``: ``base_lr * k`` reached by a linear warm-up from ``base_lr`` over the first
  ``--warmup-fraction`` of the run's steps (``lr_scheduler="LinearLR"``, ``lr_scheduler_interval="step"``: the
  module's own scheduler option).

At ``--base-batch`` every rule gives the same learning rate, so that batch size runs once per seed (the baseline).
Each ``(batch, rule, seed)`` runs in a fresh child process (``--threads`` torch threads each, ``--jobs`` at a time);
the seed sets the initial weights (``seed_everything``) and the data order (``ParquetDataModule(seed=...)``). The
table gives, per batch and rule: the learning rate, the optimizer steps, each binary task's validation AUC (mean over
seeds, min–max) and its difference to the baseline's mean, dwell's validation MSE and ``val/loss`` (means over seeds),
and the mean wall seconds of a run. Wall seconds on a CPU say nothing about a GPU's rows/s (on a CPU the arithmetic
grows with the batch; a GPU step of this model is bound by host work): ``benchmarks/gpu_check.sh`` measures those.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench_data  # noqa: E402

RULES = ["unchanged", "sqrt", "linear", "linear-warmup"]
BINARY_TASKS = ["click", "conversion"]


def learning_rate(rule: str, base_lr: float, batch_size: int, base_batch: int) -> float:
    """The peak learning rate of ``rule`` at ``batch_size`` (``k = batch_size / base_batch``)."""
    k = batch_size / base_batch
    if rule == "unchanged":
        return base_lr
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule in ("linear", "linear-warmup"):
        return base_lr * k
    raise ValueError(f"unknown learning-rate rule {rule!r}; use one of {RULES}")


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)  # the data module keeps the last, smaller batch (drop_last=False)


# ---------------------------------------------------------------------- one run, in a child process
def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import lightning as L
    import torch

    from datamodules import ParquetDataModule
    from mtl_lightning import MultiTaskLightningModule
    from throughput import build_model, features_and_tasks

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(args.seed, verbose=False)
    paths = bench_data.dataset(args.rows)
    features, tasks = features_and_tasks("mmoe")
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], features=features, tasks=tasks,
                           batch_size=args.batch_size, seed=args.seed)
    lr = learning_rate(args.rule, args.base_lr, args.batch_size, args.base_batch)
    total_steps = args.epochs * steps_per_epoch(args.rows, args.batch_size)
    schedule: dict[str, Any] = {}
    k = args.batch_size / args.base_batch
    if args.rule == "linear-warmup" and k > 1:
        warmup_steps = max(1, round(args.warmup_fraction * total_steps))
        schedule = dict(lr_scheduler="LinearLR", lr_scheduler_interval="step",
                        lr_scheduler_kwargs={"start_factor": 1.0 / k, "end_factor": 1.0, "total_iters": warmup_steps})
    module = MultiTaskLightningModule(build_model("mmoe", features, tasks), lr=lr, **schedule)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, check_val_every_n_epoch=args.epochs,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tempfile.mkdtemp(prefix="batch-size-"),
    )
    started = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - started
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    return {"batch_size": args.batch_size, "rule": args.rule, "seed": args.seed, "lr": lr,
            "steps": int(trainer.global_step), "seconds": seconds,
            **{f"{task}_auc": metrics[f"val/{task}/auc"] for task in BINARY_TASKS},
            "dwell_mse": metrics["val/dwell/mse"], "val_loss": metrics["val/loss"]}


def child_command(args: argparse.Namespace, batch_size: int, rule: str, seed: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--rows", str(args.rows),
            "--epochs", str(args.epochs), "--base-batch", str(args.base_batch), "--base-lr", repr(args.base_lr),
            "--warmup-fraction", repr(args.warmup_fraction), "--threads", str(args.threads),
            "--batch-size", str(batch_size), "--rule", rule, "--seed", str(seed)]


def run_child(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the table
def spread(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    settings: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        settings.setdefault((r["batch_size"], r["rule"]), []).append(r)
    baseline_rule = "unchanged" if (args.base_batch, "unchanged") in settings else None
    baseline = settings.get((args.base_batch, baseline_rule)) if baseline_rule else None
    header = ["batch", "lr rule", "lr", "steps"]
    for task in BINARY_TASKS:
        header += [f"val {task} AUC", "Δ to baseline"]
    header += ["val dwell MSE", "val/loss", "s/run"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for (batch, rule), runs in sorted(settings.items(), key=lambda item: (item[0][0], RULES.index(item[0][1]))):
        label = "(baseline)" if (batch, rule) == (args.base_batch, baseline_rule) else rule
        row = [f"{batch:,}", label, f"{runs[0]['lr']:.3g}", str(runs[0]["steps"])]
        for task in BINARY_TASKS:
            values = [r[f"{task}_auc"] for r in runs]
            row.append(spread(values))
            if baseline is None or (batch, rule) == (args.base_batch, baseline_rule):
                row.append("")
            else:
                delta = statistics.fmean(values) - statistics.fmean(r[f"{task}_auc"] for r in baseline)
                row.append(f"{delta:+.4f}")
        row += [f"{statistics.fmean(r['dwell_mse'] for r in runs):.4f}",
                f"{statistics.fmean(r['val_loss'] for r in runs):.4f}",
                f"{statistics.fmean(r['seconds'] for r in runs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows (bench_data; cached)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1024,4096,16384", help="comma-separated")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, from {RULES}")
    parser.add_argument("--seeds", default="0,1", help="comma-separated")
    parser.add_argument("--base-batch", type=int, default=1024, help="the batch size the base lr belongs to (k = 1)")
    parser.add_argument("--base-lr", type=float, default=1e-3, help="the learning rate at --base-batch")
    parser.add_argument("--warmup-fraction", type=float, default=0.2,
                        help="linear-warmup: share of the run's steps the warm-up takes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each in its own process)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rule", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rules = [r.strip() for r in args.rules.split(",")]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        parser.error(f"unknown --rules {unknown}; use {RULES}")
    if not 0 < args.warmup_fraction <= 1:
        parser.error(f"--warmup-fraction must be in (0, 1], got {args.warmup_fraction}")
    seeds = [int(s) for s in args.seeds.split(",")]
    paths = bench_data.dataset(args.rows)  # written once, before the children race for it
    # at k = 1 every rule is the same run: only "unchanged" runs there
    settings = [(b, r) for b in batch_sizes for r in (["unchanged"] if b == args.base_batch else rules)]
    commands = [child_command(args, b, r, s) for b, r in settings for s in seeds]
    print(f"{len(commands)} runs: MMoE, {args.rows:,} training rows ({paths['train'].parent.name}), "
          f"{args.epochs} epoch(s), {args.jobs} at a time with {args.threads} torch thread(s) each", flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(run_child, commands):
            results.append(result)
            print(f"  batch {result['batch_size']:>6,} {result['rule']:<13} seed {result['seed']}: lr {result['lr']:.3g}, "
                  f"{result['steps']} steps, click AUC {result['click_auc']:.4f}, conversion AUC "
                  f"{result['conversion_auc']:.4f}, val/loss {result['val_loss']:.4f} ({result['seconds']:.0f} s)",
                  flush=True)
    print()
    print(report(args, results))
    print(f"\n{len(results)} runs in {time.perf_counter() - started:.0f} s; seeds {seeds}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
