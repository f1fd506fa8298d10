"""``TorchRecStrategy`` against DDP with replicated tables, 2 CPU processes (gloo), side by side in one run.

    .venv/bin/python benchmarks/sharded_embeddings.py                     # memory (4 tables of 1M x 64) + quality
    .venv/bin/python benchmarks/sharded_embeddings.py --table-rows 2000000  # the issue's 2M x 64 (~23 GB for DDP's 2 ranks)
    .venv/bin/python benchmarks/sharded_embeddings.py --quick             # small tables, short runs (a smoke run)

Two experiments, each a pair of 2-process ``Trainer(accelerator="cpu", devices=2)``
runs (each run is a fresh child process that Lightning re-launches once for
rank 1, so every rank's peak RSS is its own), one torch thread per rank:

1. **memory**: MMoE over the synthetic dataset's columns whose four sparse
   features (user, item, category, city; the history sequence shares the item
   table) get tables of ``--table-rows`` x ``--table-dim`` (so the tables are
   nearly all of the model), trained ``--memory-steps`` steps, batch
   ``--memory-batch`` per rank:

   * ``ddp``: ``strategy="ddp"``, the module's Adam (fused), every table
     replicated on both ranks with dense gradients;
   * ``torchrec`` (and ``torchrec deferred``, the model built inside
     ``trainer.init_module()``: deferred tables): ``TorchRecStrategy(sharding="table_wise",
     embedding_optimizer="rowwise_adagrad")``, the dense part on Adam.

   Per rank: table memory = weights + optimizer state of the tables this rank
   holds (``strategy.table_memory()`` for TorchRec; the tables' parameters and
   their Adam ``exp_avg``/``exp_avg_sq``/``step`` for DDP), the tables'
   gradient bytes seen before the optimizer step (DDP's dense gradients; none
   under the fused optimizers), RSS after the model is built, at the start of
   training (after TorchRec's set-up released the full tables), the highest RSS
   sampled at step boundaries during training (before and after the optimizer
   step), and the process's peak RSS (``getrusage``, start-up included).
2. **quality**: MMoE (``synthetic_features``, embedding dim 16) on
   ``--train-rows`` synthetic rows, ``--epochs`` epochs, batch ``--batch`` per
   rank, ``ParquetDataModule`` sharding rows by rank, the same seed for model
   and data: validation click/conversion AUC of DDP (Adam on everything) and
   of ``TorchRecStrategy(sharding="table_wise")`` (row-wise Adagrad at
   ``--embedding-lr`` on the tables, the same Adam on the dense part).

Training throughput (rows/s over both ranks, training steps after the first
``--warmup`` only: data loading, forward, backward, optimizer; validation left
out) is reported for every run as an extra column. One repetition: on a shared
machine read it as indicative. Not a test: nothing is asserted.

Writes the tables to ``--output`` (default ``benchmarks/results/sharded_embeddings.md``) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

# what a Lightning process group leaves in os.environ: a child started from here must not inherit it
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE")
GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------------- children
def current_rss() -> int:
    """This process's resident set size in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident set size in bytes since it started (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if hasattr(value, "element_size") else 0


class Probe(L.Callback):
    """Step times, rows, RSS samples and the tables' gradient bytes of one rank."""

    def __init__(self, warmup: int, table_parameters: Callable[[], list]) -> None:
        self.warmup = warmup
        self.table_parameters = table_parameters  # () -> the parameters holding the tables
        self.starts: list[tuple[int, float]] = []  # (epoch, time) per training step
        self.ends: list[float] = []
        self.rows: list[int] = []
        self.rss_samples: list[int] = []
        self.rss_train_start = 0
        self.grad_bytes = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.rss_train_start = current_rss()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rss_samples.append(current_rss())
        self.starts.append((trainer.current_epoch, time.perf_counter()))
        self.rows.append(int(next(iter(batch["labels"].values())).shape[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rss_samples.append(current_rss())
        grads = sum(tensor_bytes(p.grad) for p in self.table_parameters())
        self.grad_bytes = max(self.grad_bytes, grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.rss_samples.append(current_rss())

    def timed(self) -> tuple[int, float]:
        """Rows and seconds of the steps after the warm-up; a step lasts until the next one starts (its data
        loading included) or, the last of an epoch, until it ends (validation left out)."""
        rows, seconds = 0, 0.0
        for k, (epoch, start) in enumerate(self.starts):
            if k < self.warmup:
                continue
            following = self.starts[k + 1] if k + 1 < len(self.starts) else None
            end = following[1] if following is not None and following[0] == epoch else self.ends[k]
            rows += self.rows[k]
            seconds += end - start
        return rows, seconds


def build_module(spec: dict[str, Any]):
    from datamodules.synthetic import synthetic_features, synthetic_tasks
    from mtl_lightning import MultiTaskLightningModule, registry
    from mtl_lightning.features import SequenceFeature, SparseFeature

    features = synthetic_features(embedding_dim=spec["dim"])
    if spec["table_rows"]:  # the same columns, tables of table_rows ids (the data's ids are a prefix of them)
        features = [
            SequenceFeature(f.name, spec["table_rows"], f.max_len, spec["dim"], shared_with=f.shared_with)
            if isinstance(f, SequenceFeature) else
            SparseFeature(f.name, spec["table_rows"], spec["dim"]) if isinstance(f, SparseFeature) else f
            for f in features
        ]
    L.seed_everything(spec["seed"], verbose=False)
    model = registry.create("mmoe", features=features, tasks=synthetic_tasks())
    return MultiTaskLightningModule(model, lr=spec["lr"]), features


def run_child(spec_path: Path) -> None:
    """One 2-process training run (this function runs in both ranks); writes ``<out>-rank<R>.json``."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from datamodules import ParquetDataModule
    from datamodules.synthetic import synthetic_tasks

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    rss_before = current_rss()
    sharded = spec["system"].startswith("torchrec")
    if sharded:
        from mtl_lightning.distributed import TorchRecStrategy

        strategy: Any = TorchRecStrategy(sharding="table_wise", embedding_optimizer="rowwise_adagrad",
                                         embedding_lr=spec["embedding_lr"])
        tables = strategy.table_parameters
    else:
        strategy = "ddp"
        tables = lambda: module.model.embedding.embedding_parameters()  # noqa: E731
    probe = Probe(spec["warmup"], tables)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[probe], max_epochs=spec["epochs"], max_steps=spec["max_steps"],
                        limit_val_batches=1.0 if spec["validate"] else 0)
    # "torchrec deferred": built inside trainer.init_module(), the tables are allocated shard by shard at set-up
    with trainer.init_module(empty_init=spec["system"] == "torchrec deferred"):
        module, features = build_module(spec)
    rss_built = current_rss()
    data = ParquetDataModule(train=spec["train"], val=spec["val"], features=features, tasks=synthetic_tasks(),
                             batch_size=spec["batch"], seed=spec["seed"])
    trainer.fit(module, datamodule=data)

    if sharded:
        memory = strategy.table_memory()
        placement = {table: (s.sharding_type, s.ranks) for plan in strategy.plan.plan.values()
                     for table, s in plan.items()}
    else:
        weights = module.model.embedding.embedding_parameters()
        optimizer = trainer.optimizers[0]
        memory = {"weights": sum(tensor_bytes(p) for p in weights),
                  "optimizer": sum(tensor_bytes(v) for p in weights for v in optimizer.state.get(p, {}).values())}
        placement = {}
    rows, seconds = probe.timed()
    result = {
        "rank": trainer.global_rank,
        "table_weights": memory["weights"],
        "table_optimizer": memory["optimizer"],
        "table_grads": probe.grad_bytes,
        "rss_before_build": rss_before,
        "rss_built": rss_built,
        "rss_train_start": probe.rss_train_start,
        "rss_training_max": max(probe.rss_samples, default=0),
        "rss_peak": peak_rss(),
        "rows": rows,
        "seconds": seconds,
        "steps": len(probe.starts),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "placement": placement,
    }
    Path(f"{spec['out']}-rank{trainer.global_rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------ parent
def launch(spec: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Run one 2-process training in a fresh child process; returns the two ranks' results."""
    name = f"{spec['experiment']}-{spec['system'].replace(' ', '-')}"
    spec = {**spec, "out": str(work / name)}
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("PL_")}
    env.update(OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore")
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    ranks = [json.loads(Path(f"{spec['out']}-rank{r}.json").read_text()) for r in (0, 1)]
    print(f"  {name}: {time.monotonic() - started:.0f} s", flush=True)
    return ranks


def throughput(ranks: list[dict[str, Any]]) -> float:
    """Rows per second over both ranks (the slower rank's time: they step together)."""
    seconds = max(r["seconds"] for r in ranks)
    return sum(r["rows"] for r in ranks) / seconds if seconds > 0 else float("nan")


def gib(value: float) -> str:
    return f"{value / GIB:.2f}" if value >= 0.1 * GIB else f"{value / GIB:.3f}"


def memory_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| system | rank | table weights | table optimizer state | **table memory** | table gradients "
             "| RSS after build | RSS at train start | RSS max during training | peak RSS (process) "
             "| rows/s (2 ranks) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for system, ranks in runs.items():
        for r in ranks:
            total = r["table_weights"] + r["table_optimizer"]
            lines.append(f"| {system} | {r['rank']} | {gib(r['table_weights'])} | {gib(r['table_optimizer'])} | "
                         f"**{gib(total)}** | {gib(r['table_grads'])} | {gib(r['rss_built'])} | "
                         f"{gib(r['rss_train_start'])} | {gib(r['rss_training_max'])} | {gib(r['rss_peak'])} | "
                         + (f"{throughput(ranks):,.0f} |" if r["rank"] == 0 else "|"))
    ddp = runs["ddp"]
    sharded = [system for system in runs if system != "ddp"]

    def ratio(rec: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> str:
        values = [key(t) / key(d) for t, d in zip(rec, ddp)]
        return " / ".join(f"{v:.3f}" for v in values) + f" (worst rank {max(values):.3f})"

    rows = [
        ("**table memory** (weights + optimizer state; goal <= 0.55)", lambda r: r["table_weights"] + r["table_optimizer"]),
        ("table weights", lambda r: r["table_weights"]),
        ("table memory + gradients", lambda r: r["table_weights"] + r["table_optimizer"] + r["table_grads"]),
        ("RSS after the model is built", lambda r: r["rss_built"]),
        ("RSS at train start", lambda r: r["rss_train_start"]),
        ("RSS max during training", lambda r: r["rss_training_max"]),
        ("peak RSS (start-up included)", lambda r: r["rss_peak"]),
    ]
    lines += ["", "| / DDP, rank 0 / rank 1 | " + " | ".join(sharded) + " |", "|---|" + "---|" * len(sharded)]
    lines += [f"| {label} | " + " | ".join(ratio(runs[s], key) for s in sharded) + " |" for label, key in rows]
    lines.append("| rows/s | " + " | ".join(f"{throughput(runs[s]) / throughput(ddp):.2f}" for s in sharded) + " |")
    return lines


def quality_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| system | val click AUC | val conversion AUC | val dwell MSE | rows/s (2 ranks) |",
             "|---|---|---|---|---|"]
    for system, ranks in runs.items():
        m = ranks[0]["metrics"]
        lines.append(f"| {system} | {m.get('val/click/auc', float('nan')):.4f} | "
                     f"{m.get('val/conversion/auc', float('nan')):.4f} | {m.get('val/dwell/mse', float('nan')):.4f} | "
                     f"{throughput(ranks):,.0f} |")
    ddp, rec = runs["ddp"][0]["metrics"], runs["torchrec"][0]["metrics"]
    lines += ["", "| TorchRec - DDP | difference | goal: within 0.01 |", "|---|---|---|"]
    for task in ("click", "conversion"):
        key = f"val/{task}/auc"
        if key in ddp and key in rec:
            delta = rec[key] - ddp[key]
            lines.append(f"| {task} AUC | {delta:+.4f} | {'met' if abs(delta) <= 0.01 else 'missed'} |")
    lines.append(f"| rows/s ratio | {throughput(runs['torchrec']) / throughput(runs['ddp']):.2f} | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="100k-row tables, 8k training rows, 1 epoch")
    parser.add_argument("--table-rows", type=int, default=1_000_000, help="rows of each of the 4 memory tables")
    parser.add_argument("--table-dim", type=int, default=64)
    parser.add_argument("--memory-steps", type=int, default=20)
    parser.add_argument("--memory-batch", type=int, default=1024)
    parser.add_argument("--train-rows", type=int, default=60_000)
    parser.add_argument("--val-rows", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512, help="per rank, quality runs")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam, the dense part (and DDP's tables)")
    parser.add_argument("--embedding-lr", type=float, default=0.05, help="row-wise Adagrad, TorchRec's tables")
    parser.add_argument("--warmup", type=int, default=3, help="training steps left out of rows/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--only", choices=["memory", "quality"], help="run one experiment")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "sharded_embeddings.md")
    args = parser.parse_args()
    if args.child is not None:
        run_child(args.child)
        return
    if args.quick:
        args.table_rows, args.memory_steps, args.train_rows, args.val_rows, args.epochs = 100_000, 8, 8_000, 4_000, 1

    from mtl_lightning.distributed import torchrec_available

    if not torchrec_available():
        raise SystemExit("TorchRec is not installed: `make setup` (or see docs/distributed.md, Sharded embeddings: Install)")
    table_bytes = 4 * args.table_rows * args.table_dim * 4
    need = 2 * 5 * table_bytes  # DDP, per rank: weights, Adam's two moments, gradients, DDP's gradient buckets
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        available = None
    if args.only != "quality" and available is not None and need > 0.9 * available:
        raise SystemExit(f"the DDP memory run needs about {need / GIB:.1f} GiB (2 ranks x 5 copies of "
                         f"{table_bytes / GIB:.2f} GiB of tables) and {available / GIB:.1f} GiB are available: "
                         "pass a smaller --table-rows")

    from datamodules.synthetic import write_synthetic

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="torchrec-bench-"))
    paths = write_synthetic(work / "data", num_rows=(args.train_rows, args.val_rows, 1000), seed=args.seed)
    base = dict(train=str(paths["train"]), val=str(paths["val"]), seed=args.seed, threads=args.threads,
                warmup=args.warmup, lr=args.lr, embedding_lr=args.embedding_lr)
    memory_runs: dict[str, list[dict[str, Any]]] = {}
    quality_runs: dict[str, list[dict[str, Any]]] = {}
    if args.only != "quality":
        spec = dict(base, experiment="memory", table_rows=args.table_rows, dim=args.table_dim, batch=args.memory_batch,
                    epochs=None, max_steps=args.memory_steps, validate=False)
        for system in ("torchrec", "torchrec deferred", "ddp"):
            memory_runs[system] = launch(dict(spec, system=system), work)
    if args.only != "memory":
        spec = dict(base, experiment="quality", table_rows=0, dim=16, batch=args.batch, epochs=args.epochs,
                    max_steps=-1, validate=True)
        for system in ("ddp", "torchrec"):
            quality_runs[system] = launch(dict(spec, system=system), work)
    memory_runs = {k: memory_runs[k] for k in ("ddp", "torchrec", "torchrec deferred") if k in memory_runs}

    command = " ".join(["python benchmarks/sharded_embeddings.py", *sys.argv[1:]])
    lines = [
        "# TorchRecStrategy against DDP: table memory and quality (2 CPU processes, gloo)",
        "",
        f"Produced by `{command}` in {(time.monotonic() - started) / 60:.0f} min, one repetition, "
        f"{args.threads} torch thread(s) per rank, on {os.cpu_count()} CPU cores. DDP: `strategy=\"ddp\"`, "
        f"fused Adam lr {args.lr:g} on every parameter, tables replicated. TorchRec: "
        "`TorchRecStrategy(sharding=\"table_wise\", embedding_optimizer=\"rowwise_adagrad\", "
        f"embedding_lr={args.embedding_lr:g})`, the dense part on the same Adam. Sizes in GiB.",
        "",
    ]
    if memory_runs:
        placement = memory_runs["torchrec"][0]["placement"]
        where = ", ".join(f"{t} -> rank {r[0] if r else '?'}" for t, (_, r) in placement.items())
        lines += [
            f"## Memory: MMoE, 4 tables of {args.table_rows:,} x {args.table_dim} (the history sequence shares "
            f"the item table), {args.memory_steps} steps of {args.memory_batch} rows per rank",
            "",
            f"TorchRec's table-wise plan: {where}.",
            "",
            *memory_table(memory_runs),
            "",
            "Peak RSS includes start-up. `torchrec`: the model is built as usual, so every rank holds every "
            "table once until TorchRec has copied its shards out of them (after set-up only its shards remain: "
            "RSS at train start). `torchrec deferred`: built inside `trainer.init_module()`, the tables are "
            "meta tensors until set-up and each rank allocates and initialises only its shards.",
            "",
        ]
    if quality_runs:
        lines += [
            f"## Quality: MMoE on the synthetic dataset ({args.train_rows:,} training rows, {args.val_rows:,} "
            f"validation rows, embedding dim 16), {args.epochs} epoch(s), batch {args.batch} per rank, "
            f"seed {args.seed}",
            "",
            *quality_table(quality_runs),
            "",
        ]
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
