"""DDP (2 CPU ranks) whose validation and predict splits have a single row: one rank's shard is empty.

Run by ``tests/distributed/test_ddp.py``. Usage: ``python ddp_empty_shard.py DATA_DIR OUT_DIR``. For each of in-memory
and streaming reading (``OUT_DIR/memory``, ``OUT_DIR/streaming``): trains one epoch (validating at its end,
after the sanity check), then validates and predicts. Writes per rank ``R``: ``metrics_rank<R>.json``
(``trainer.validate``, synced over ranks) and ``predictions/predictions-rank<R>.parquet``
(``ParquetPredictionWriter``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import ParquetDataModule
from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import MMoE
from mtl_lightning.callbacks import ParquetPredictionWriter


def run(data: Path, out: Path, streaming: bool) -> None:
    L.seed_everything(0, verbose=False)
    tasks = [Task("click"), Task("dwell", kind="regression")]  # per-scenario rows of both kinds join on the empty rank
    dm = ParquetDataModule(
        train=data / "train", val=data / "one", predict=data / "one", tasks=tasks, batch_size=16,
        streaming=streaming, num_workers=1, embedding_dim=4, keys=["user_id"], group="user_id", scenario="city",
        exclude=["conversion", "purchase", "history"],
    )
    dm.setup("fit")
    module = MultiTaskLightningModule(MMoE(dm.features, tasks, num_experts=2, expert_hidden=(8,), tower_hidden=(4,)))
    # the default DDP strategy: buffers (the embedding's offsets) are broadcast before the first validation forward
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ParquetPredictionWriter(out / "predictions")],
    )
    trainer.fit(module, dm)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    (out / f"metrics_rank{trainer.global_rank}.json").write_text(json.dumps(metrics))
    trainer.predict(module, datamodule=dm, return_predictions=False)


def main(data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    for mode in ("memory", "streaming"):
        (out / mode).mkdir(parents=True, exist_ok=True)
        run(data, out / mode, streaming=mode == "streaming")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
