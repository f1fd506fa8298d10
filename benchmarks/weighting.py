"""Training-step time of every weighting strategy relative to ``static``, on MMoE (not a test).

One step is what the Lightning module does per batch: forward, per-task losses,
the strategy (with its per-task gradients for GradNorm/PCGrad/DB-MTL), backward,
the strategy's ``before_optimizer_step`` and the Adam step. Strategies are timed
round-robin (one timed block of ``--steps`` steps each, ``--rounds`` times) so
that a change in machine load hits all of them alike; the reported time is the
median over rounds.

    .venv/bin/python benchmarks/weighting.py                      # CPU, batch 2048
    .venv/bin/python benchmarks/weighting.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
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
    print(f"MMoE (4 experts, 256-128, towers 64), batch {args.batch_size}, device {args.device}, "
          f"precision {args.precision}, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'strategy':<12} {'ms/step':>9} {'x static':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<12} {median * 1e3:9.2f} {median / base:9.2f}")


if __name__ == "__main__":
    main()
