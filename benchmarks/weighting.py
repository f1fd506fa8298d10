"""Training-step time of every weighting strategy relative to ``static``, on MMoE (not a test).

One step is what the Lightning module does per batch: forward, per-task losses,
the strategy (with its per-task gradients for GradNorm/PCGrad/DB-MTL), backward,
the strategy's ``before_optimizer_step`` and the Adam step. Strategies are timed
round-robin (one timed block of ``--steps`` steps each, ``--rounds`` times) so
that a change in machine load hits all of them alike; the reported time is the
median over rounds.

    .venv/bin/python benchmarks/weighting.py                      # CPU, batch 2048
    .venv/bin/python benchmarks/weighting.py --device cuda --precision bf16
    .venv/bin/python benchmarks/weighting.py --output benchmarks/results/weighting_cost.md

Every registered strategy runs in the same process, side by side. ``--output`` also writes the table as
Markdown with the command and the machine's load average during the run (on a shared machine the
absolute times move with the load; the ratios, measured round-robin, much less).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import make_table, synthetic_features, synthetic_tasks  # noqa: E402
from datamodules import ParquetDataModule  # noqa: E402
from mtl_lightning import MultiTaskLightningModule  # noqa: E402
from mtl_lightning.architectures import MMoE  # noqa: E402
from mtl_lightning.weighting import STRATEGIES  # noqa: E402


def batches(batch_size: int, count: int, device: str, directory: Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = directory / "bench.parquet"
    pq.write_table(make_table(batch_size * count, seed=0), path)
    dm = ParquetDataModule(train=path, features=synthetic_features(), tasks=synthetic_tasks(),
                           batch_size=batch_size, shuffle=False)
    dm.setup("fit")
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return [{"features": move(b["features"]), "labels": move(b["labels"])} for b in dm.dataset("train")]


def make_step(name: str, device: str, precision: str):
    torch.manual_seed(0)
    model = MMoE(synthetic_features(), synthetic_tasks(), num_experts=4, expert_hidden=(256, 128), tower_hidden=(64,))
    module = MultiTaskLightningModule(model, weighting=name).to(device)
    optimizer = torch.optim.Adam(module.optimized_parameters(), lr=1e-3)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(batch: dict) -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            outputs = module.model(batch["features"])
            losses = module.compute_losses(outputs, batch["labels"])
            total = module.weighting([losses[t.name] for t in module.tasks])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        module.weighting.before_optimizer_step()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the table here as Markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = batches(args.batch_size, args.steps, args.device, Path(tmp))
    steps = {name: make_step(name, args.device, args.precision) for name in STRATEGIES}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for step in steps.values():  # warm-up
        for batch in data[:3]:
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for batch in data:
                step(batch)
            sync()
            times[name].append((time.perf_counter() - start) / len(data))
    base = statistics.median(times["static"])
    title = (f"MMoE (4 experts, 256-128, towers 64), 3 tasks, batch {args.batch_size}, device {args.device}, "
             f"precision {args.precision}, {args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps")
    print(title)
    print(f"{'strategy':<12} {'ms/step':>9} {'x static':>9}")
    ordered = sorted(times, key=lambda name: statistics.median(times[name]))
    for name in ordered:
        median = statistics.median(times[name])
        print(f"{name:<12} {median * 1e3:9.2f} {median / base:9.2f}")
    if args.output is not None:
        load = os.getloadavg()
        command = " ".join(["python benchmarks/weighting.py", *sys.argv[1:]])
        lines = ["# Weighting strategies: training-step cost relative to `static`", "",
                 f"Produced by `{command}`: {title}; strategies timed round-robin in one process. Load average "
                 f"at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} "
                 "CPUs, shared with other work: absolute times are inflated, ratios less so.", "",
                 "| strategy | ms/step | x static |", "|---|---|---|"]
        lines += [f"| `{name}` | {statistics.median(times[name]) * 1e3:.1f} | "
                  f"{statistics.median(times[name]) / base:.2f} |" for name in ordered]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
