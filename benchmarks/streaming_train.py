"""Train MMoE from streamed Parquet on whatever accelerator is there, then write prediction files (not a test).

Prints training rows/s, the validation metrics and checks that the prediction
files hold every row of the predict split once. The Trainer flags are the ones
docs/distributed.md gives for GPUs:

    .venv/bin/python benchmarks/streaming_train.py                                  # auto accelerator, 1 device
    .venv/bin/python benchmarks/streaming_train.py --strategy ddp --devices 2       # 2 GPUs (or 2 CPU processes)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_tasks, write_synthetic
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.callbacks import ParquetPredictionWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    parser.add_argument("--data", type=Path, default=None, help="folder for the synthetic data (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        rows = args.rows
        paths = write_synthetic(root / "data", (rows, rows // 8, rows // 8), files_per_split=4)
        torch.manual_seed(0)
        dm = ParquetDataModule(train=paths["train"], val=paths["val"], predict=paths["test"], tasks=synthetic_tasks(),
                               batch_size=args.batch_size, streaming=True, shuffle_buffer=65_536,
                               num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), normalize=True,
                               keys=["user_id"], exclude=["purchase"])
        dm.setup("fit")
        model = MMoE(dm.features, synthetic_tasks(), num_experts=4, expert_hidden=(256, 128), tower_hidden=(64,))
        module = MultiTaskLightningModule(model, lr=2e-3)
        precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
        writer = ParquetPredictionWriter(root / "predictions")
        devices = int(args.devices) if args.devices.isdigit() else args.devices
        trainer = L.Trainer(accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                            strategy=args.strategy, precision=precision, max_epochs=args.epochs, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[writer])
        start = time.perf_counter()
        trainer.fit(module, dm)
        seconds = time.perf_counter() - start
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        trainer.predict(module, datamodule=dm, return_predictions=False)
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            files = sorted((root / "predictions").glob("*.parquet"))
            ids = pa.concat_tables([pq.read_table(f, columns=["row_id"]) for f in files])["row_id"].to_pylist()
            assert sorted(ids) == list(range(rows // 8)), "prediction files must hold every predict row once"
            print(json.dumps({
                "device": str(trainer.strategy.root_device), "world_size": trainer.world_size,
                "precision": precision, "train_rows": rows, "epochs": args.epochs, "fit_seconds": round(seconds, 1),
                "train_rows_per_s": round(rows * args.epochs / seconds), **metrics,
                "prediction_files": len(files), "predicted_rows": len(ids),
            }))


if __name__ == "__main__":
    main()
