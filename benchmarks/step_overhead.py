"""Where a training step's time goes between a raw PyTorch loop and ``Trainer`` + ``MultiTaskLightningModule``.

    .venv/bin/python benchmarks/step_overhead.py                  # tiny MMoE: the fixed cost per step
    .venv/bin/python benchmarks/step_overhead.py --model bench    # the throughput benchmark's MMoE, batch 2048

Four loops train the same architecture on the same batches (built once, in
memory, so the data path is left out), with fused Adam and one torch thread,
and take turns ``--rounds`` times in one process:

* ``raw``: ``zero_grad(set_to_none=True)``, forward, the masked losses, backward, step;
* ``lightning-minimal``: a ``LightningModule`` whose ``training_step`` is that
  loop's forward and loss, under the benchmark's ``Trainer`` (TensorBoard
  logger, no progress bar, checkpointing or summary): Lightning's own cost;
* ``mtl-lightning``: ``MultiTaskLightningModule`` under the same ``Trainer``:
  Lightning's cost plus this library's (weighting, logging decision, hooks);
* ``mtl-lightning barebones``: the same under ``Trainer(barebones=True)``.

It reports the main thread's CPU time per step (``time.thread_time``), which
other processes' load moves much less than wall time, so the differences are
readable on a shared machine; with one torch thread that is all the step's
compute. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

LOOPS = ["raw", "lightning-minimal", "mtl-lightning", "mtl-lightning barebones"]


def tiny_model_and_batches(batch_size: int, count: int):
    from mtl_lightning import Task, registry
    from mtl_lightning.features import DenseFeature, SparseFeature

    features = [SparseFeature(f"s{i}", 10, 4) for i in range(16)] + [DenseFeature(f"d{i}") for i in range(8)]
    tasks = [Task("click"), Task("conversion"), Task("dwell", kind="regression")]
    g = torch.Generator().manual_seed(0)

    def batch() -> dict:
        return {
            "features": {**{f"s{i}": torch.randint(0, 10, (batch_size,), generator=g) for i in range(16)},
                         **{f"d{i}": torch.randn(batch_size, generator=g) for i in range(8)}},
            "labels": {"click": torch.randint(0, 2, (batch_size,), generator=g).float(),
                       "conversion": torch.randint(0, 2, (batch_size,), generator=g).float(),
                       "dwell": torch.randn(batch_size, generator=g)},
            "row_id": torch.arange(batch_size),
        }

    def build():
        return registry.create("mmoe", features=features, tasks=tasks, num_experts=2, expert_hidden=(8,),
                               tower_hidden=(4,))

    return build, tasks, [batch() for _ in range(count)]


def bench_model_and_batches(batch_size: int, count: int):
    import bench_data
    from throughput import build_model, features_and_tasks

    from datamodules.store import read_split

    features, tasks = features_and_tasks("mmoe")
    store = read_split([bench_data.dataset(100_000)["train"]], features, tasks)
    order = torch.randperm(store.num_rows, generator=torch.Generator().manual_seed(0))
    batches = [store.batch(order[i * batch_size:(i + 1) * batch_size]) for i in range(count)]
    return (lambda: build_model("mmoe", features, tasks)), tasks, batches


class Stamps:
    """Forward pre-hook: the main thread's CPU time at the start of every training forward."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, module, args) -> None:
        if module.training:
            self.times.append(time.thread_time())

    def per_step(self, warmup: int) -> float:
        timed = self.times[warmup:]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def run(loop: str, build, tasks, batches, warmup: int) -> float:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from mtl_lightning import MultiTaskLightningModule
    from mtl_lightning.losses import masked_loss

    model = build()
    stamps = Stamps()
    model.register_forward_pre_hook(stamps)

    def loss_of(batch: dict) -> torch.Tensor:
        outputs = model(batch["features"])
        return sum(t.weight * masked_loss(outputs[t.name], batch["labels"][t.name], t.kind, -1) for t in tasks)

    if loop == "raw":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        for batch in batches:
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return stamps.per_step(warmup)

    class Minimal(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return loss_of(batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    module = Minimal() if loop == "lightning-minimal" else MultiTaskLightningModule(model, lr=1e-3)
    quiet = (dict(barebones=True) if loop.endswith("barebones") else
             dict(logger=TensorBoardLogger(tempfile.mkdtemp(prefix="overhead-")), enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False))

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(batches)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), max_epochs=1, num_sanity_val_steps=0,
                        limit_val_batches=0, **quiet)
    trainer.fit(module, torch.utils.data.DataLoader(Batches(), batch_size=None))
    return stamps.per_step(warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "bench"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (tiny) or 2048 (bench)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 210 tiny, 60 bench)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", default=",".join(LOOPS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    tiny = args.model == "tiny"
    batch_size = args.batch_size or (64 if tiny else 2048)
    steps = args.steps or (210 if tiny else 60)
    build, tasks, batches = (tiny_model_and_batches if tiny else bench_model_and_batches)(batch_size, steps)
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    times: dict[str, list[float]] = {loop: [] for loop in loops}
    for round_ in range(args.rounds):
        for loop in loops if round_ % 2 == 0 else loops[::-1]:
            times[loop].append(run(loop, build, tasks, batches, args.warmup))
    print(f"{args.model} MMoE, batch {batch_size}, {steps - args.warmup - 1} timed steps per run, {args.rounds} "
          "rounds, 1 torch thread; CPU ms per step of the main thread, median (min-max) over rounds:")
    base = statistics.median(times["raw"]) if "raw" in times else None
    for loop, values in times.items():
        m = statistics.median(values)
        extra = f", {1000 * (m - base):+.2f} ms vs raw (raw/this {base / m:.3f})" if base and loop != "raw" else ""
        print(f"  {loop:24s} {1000 * m:8.2f} ({1000 * min(values):.2f}-{1000 * max(values):.2f}){extra}")


if __name__ == "__main__":
    main()
