"""DDP (2 CPU ranks x 2 workers, streaming) killed with SIGKILL mid-epoch, then resumed from ``last.ckpt``.

Run by ``tests/training/test_resume.py``. Usage: ``python ddp_resume.py DATA_DIR OUT_DIR PHASE`` with PHASE
``interrupt`` (checkpoints every ``STEPS`` steps, then every rank kills itself with SIGKILL before training
the next batch) or ``resume`` (``trainer.fit(..., ckpt_path=OUT_DIR/ckpt/last.ckpt)`` to the end). Every
rank appends the row ids of each batch it trained on to ``OUT_DIR/<PHASE>_rank<R>.jsonl`` as
``[epoch, [row ids]]`` lines, written as it goes (a killed process writes nothing at its end).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ParquetDataModule
from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import MMoE

STEPS = 2


def datamodule(data: Path) -> ParquetDataModule:
    return ParquetDataModule(
        train=data, tasks=[Task("click")], batch_size=16, streaming=True, shuffle_buffer=48, read_rows=20,
        num_workers=2, seed=5, embedding_dim=4, exclude=["conversion", "purchase", "dwell", "history"],
    )


class Record(L.Callback):
    def __init__(self, out: Path, phase: str) -> None:
        self.out, self.phase = out, phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with (self.out / f"{self.phase}_rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps([trainer.current_epoch, batch["row_id"].tolist()]) + "\n")


class Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == STEPS:  # the checkpoint of step STEPS is written (and the ranks met after it)
            os.kill(os.getpid(), signal.SIGKILL)


def main(data: Path, out: Path, phase: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    dm = datamodule(data)
    dm.setup("fit")
    module = MultiTaskLightningModule(MMoE(dm.features, [Task("click")], num_experts=2, expert_hidden=(8,),
                                           tower_hidden=(4,)))
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=STEPS, save_last=True)
    callbacks = [Record(out, phase)] + ([checkpoint, Kill()] if phase == "interrupt" else [])
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
        enable_checkpointing=phase == "interrupt", enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, dm, ckpt_path=out / "ckpt" / "last.ckpt" if phase == "resume" else None)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
