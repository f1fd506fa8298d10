"""GradNorm under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)``; run by tests/test_weighting_training.py.

Usage: ``python tests/scripts/ddp_gradnorm.py DATA_DIR OUT_DIR`` where ``DATA_DIR`` holds
``train.parquet``. Lightning re-launches this script once per extra rank; every rank
writes its GradNorm state and a digest of its model to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.weighting import GradNorm


def main(data_dir: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    tasks = synthetic_tasks()
    dm = ParquetDataModule(train=data_dir / "train.parquet", features=synthetic_features(embedding_dim=4),
                           val=data_dir / "val.parquet", tasks=tasks, batch_size=256)
    model = MMoE(dm.features, tasks, num_experts=2, expert_hidden=(16,), tower_hidden=(8,))
    module = MultiTaskLightningModule(model, lr=1e-2, weighting=GradNorm(alpha=1.5, lr=0.05))
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    gradnorm = module.weighting
    torch.save(
        {
            "weights": gradnorm.weights.detach().clone(),
            "initial_losses": gradnorm.initial_losses.clone(),
            "num_steps": int(gradnorm.num_steps),
            "model": torch.cat([p.detach().reshape(-1) for p in module.model.parameters()]),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
