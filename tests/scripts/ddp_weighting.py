"""Weighting strategies under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)``, one after another in
the same two processes; run by tests/weighting/test_weighting_training.py.

Usage: ``python tests/scripts/ddp_weighting.py DATA_DIR OUT_DIR SPECS_JSON`` where ``DATA_DIR`` holds
``train.parquet`` and ``SPECS_JSON`` maps a label to a weighting spec (a name or a ``{"name": ...}`` dict).
Lightning re-launches this script once per extra rank; every rank writes, per label, its strategy's
``state_dict`` tensors, its last logged weights and its model's parameters to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE


def main(data_dir: Path, out_dir: Path, specs: dict) -> None:
    torch.set_num_threads(1)
    tasks = synthetic_tasks()
    results = {}
    for label, spec in specs.items():
        L.seed_everything(0, verbose=False)
        dm = ParquetDataModule(train=data_dir / "train.parquet", features=synthetic_features(embedding_dim=4),
                               tasks=tasks, batch_size=128)
        model = MMoE(dm.features, tasks, num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
        module = MultiTaskLightningModule(model, lr=1e-2, weighting=spec)
        trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, limit_train_batches=1,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, dm)
        state = {}
        for key, value in module.weighting.state_dict().items():  # buffers, and tensors in the extra state
            items = value.items() if isinstance(value, dict) else [("", value)]
            state.update({f"{key}.{k}" if k else key: v.clone() for k, v in items if isinstance(v, torch.Tensor)})
        results[label] = {
            "state": state,
            "weights": module.weighting.last_weights.detach().clone(),
            "model": torch.cat([p.detach().reshape(-1) for p in module.model.parameters()]),
        }
    torch.save(results, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
