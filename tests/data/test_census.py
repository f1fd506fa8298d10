"""Real data: MMoE on UCI Census-Income (income, never_married), protocol of datamodules/census.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.census import CENSUS_ENV, CENSUS_FILE, census_dir, census_missing_message, prepare_census
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE


ROOT = Path(__file__).resolve().parents[2]
MISSING = census_missing_message(os.environ.get(CENSUS_ENV) or "data/census") + ", then rerun this test"


@pytest.fixture
def census_source(shared_data) -> Path:
    """$MTL_CENSUS_DIR's file, else the repository's data/census (what `python -m datamodules.census download
    data/census` fills), else the development machine's shared copy; the test is skipped, saying what to run,
    when none is there."""
    if os.environ.get(CENSUS_ENV):
        source = census_dir() / CENSUS_FILE
        if not source.is_file():
            pytest.skip(MISSING)
        return source
    if (ROOT / "data" / "census" / CENSUS_FILE).is_file():
        return ROOT / "data" / "census" / CENSUS_FILE
    return shared_data(f"census-income/{CENSUS_FILE}", reason=MISSING)


def test_mmoe_census_income_auc(tmp_path, quiet_trainer, census_source):
    torch.manual_seed(0)
    paths, features, tasks = prepare_census(census_source, tmp_path)
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
