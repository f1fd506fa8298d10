"""Train MMoE with ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` on a streamed Parquet split.

Run by ``tests/distributed/test_ddp.py`` (Lightning's DDP re-launches this script once per
rank, which it cannot do from inside pytest). Usage:
``python ddp_stream.py DATA_DIR OUT_DIR``. Writes to OUT_DIR, per rank ``R``:
``train_ids_rank<R>.json`` (row ids of every training batch, in order),
``metrics_rank<R>.json`` (``trainer.validate`` metrics, synced over ranks; per scenario too: the
column ``city``, not a feature, is the scenario),
and ``predictions/predictions-rank<R>.parquet`` (``ParquetPredictionWriter``
over the validation files).
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


class RecordTrainRows(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.ids: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(batch["row_id"].tolist())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        (self.out / f"train_ids_rank{trainer.global_rank}.json").write_text(json.dumps(self.ids))


def main(data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    tasks = [Task("click"), Task("conversion")]
    dm = ParquetDataModule(
        train=data / "train", val=data / "val", predict=data / "val", tasks=tasks, batch_size=128,
        streaming=True, shuffle_buffer=512, read_rows=200, num_workers=2, embedding_dim=4,
        categorical={"city_name": {"min_freq": 5}}, normalize=True, keys=["user_id"], scenario="city",
        exclude=["purchase", "dwell", "city"],
    )
    dm.setup("fit")
    model = MMoE(dm.features, tasks, num_experts=2, expert_hidden=(16,), tower_hidden=(8,))
    module = MultiTaskLightningModule(model, lr=3e-3)
    writer = ParquetPredictionWriter(out / "predictions")
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordTrainRows(out), writer],
    )
    trainer.fit(module, dm)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    (out / f"metrics_rank{trainer.global_rank}.json").write_text(json.dumps(metrics))
    trainer.predict(module, datamodule=dm, return_predictions=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
