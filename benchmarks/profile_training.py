"""Profile training steps of the benchmark's MMoE with torch.profiler: the raw loop and the Lightning path.

    .venv/bin/python benchmarks/profile_training.py [--rows 100000] [--steps 20] [--sparse]

Prints the ops with the most self CPU time for each, over ``--steps`` steps
after 5 warm-up steps (the same models, data and batch size as throughput.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_data  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--sparse", action="store_true", help="sparse_embeddings=True (and SparseAdam in the raw loop)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import lightning as L

    from datamodules import ParquetDataModule
    from mtl_lightning import MultiTaskLightningModule
    from throughput import build_model, features_and_tasks

    paths = bench_data.dataset(args.rows)
    features, tasks = features_and_tasks(args.model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    torch.manual_seed(0)
    module = MultiTaskLightningModule(build_model(args.model, features, tasks), sparse_embeddings=args.sparse)
    optimizer = module.configure_optimizers()
    dm = ParquetDataModule(train=paths["train"], tasks=tasks, features=features, batch_size=args.batch_size)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())

    def step() -> None:
        batch = next(batches)
        loss = sum(module.compute_losses(module.model(batch["features"]), batch["labels"]).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    print(f"== raw loop ({'sparse' if args.sparse else 'dense'}), {args.steps} steps ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))

    torch.manual_seed(0)
    module = MultiTaskLightningModule(build_model(args.model, features, tasks), sparse_embeddings=args.sparse)
    dm = ParquetDataModule(train=paths["train"], tasks=tasks, features=features, batch_size=args.batch_size)

    class Profiled(L.Callback):
        def __init__(self) -> None:
            self.prof = profile(activities=activities)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 5:
                self.prof.__enter__()

        def on_train_end(self, trainer, pl_module) -> None:
            self.prof.__exit__(None, None, None)

    callback = Profiled()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5 + args.steps, logger=True, default_root_dir="/tmp",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, dm)
    print(f"== Trainer + ParquetDataModule ({'sparse' if args.sparse else 'dense'}), {args.steps} steps ==")
    print(callback.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
