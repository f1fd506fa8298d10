"""Real data: MMoE on UCI Census-Income (income, never_married), protocol of shared/data/README.md."""

from __future__ import annotations

import time

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from datamodules import ParquetDataModule
from datamodules.census import prepare_census
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE

from conftest import SHARED_DATA, quiet_trainer

SOURCE = SHARED_DATA / "census-income" / "census-income.test.gz"


@pytest.mark.skipif(not SOURCE.exists(), reason="shared/data/census-income is not beside the project")
def test_mmoe_census_income_auc(tmp_path):
    torch.manual_seed(0)
    paths, features, tasks = prepare_census(SOURCE, tmp_path)
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], test=paths["test"], tasks=tasks,
                           features=features, batch_size=512)
    model = MMoE(features, tasks, num_experts=4, expert_hidden=(64,), tower_hidden=(32,))
    module = MultiTaskLightningModule(model, lr=2e-3)
    started = time.monotonic()
    trainer = quiet_trainer(max_epochs=6, max_time="00:00:02:00",
                            callbacks=[EarlyStopping("val/loss", patience=1)])
    trainer.fit(module, dm)
    assert time.monotonic() - started < 150  # max_time bounds training to 2 minutes
    result = trainer.test(module, dm, verbose=False)[0]
    print(f"census MMoE test AUC: income {result['test/income/auc']:.4f}, "
          f"never_married {result['test/never_married/auc']:.4f}")
    assert result["test/income/auc"] >= 0.92
    assert result["test/never_married/auc"] >= 0.98
