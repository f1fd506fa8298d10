"""Real data: MMoE on UCI Census-Income (income, never_married), protocol of shared/data/README.md."""

from __future__ import annotations

import pytest
import torch

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
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0)  # a fixed amount of work
    trainer.fit(module, dm)
    result = trainer.test(module, dm, verbose=False)[0]
    print(f"census MMoE test AUC: income {result['test/income/auc']:.4f}, "
          f"never_married {result['test/never_married/auc']:.4f}")
    assert result["test/income/auc"] >= 0.92
    assert result["test/never_married/auc"] >= 0.98
