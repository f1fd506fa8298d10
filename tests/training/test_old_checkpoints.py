"""Checkpoints written by an earlier version load, predict and resume exactly as they did then.

``tests/fixtures/checkpoints/`` holds three small checkpoints written by
``make_checkpoints.py`` with the code of commit ``807107a`` (MMoE + GradNorm with
an encoded and a normalised column, ESCM with the DR counterfactual loss,
SharedBottom with ``sparse_embeddings=True`` and a step scheduler), a fixed
feature batch and the predictions that code made on it: from the loaded
checkpoint, and after ``trainer.fit(ckpt_path=...)`` resumed one more step (which
restores the optimizer, scheduler, GradNorm and data module states). Any later
code must reproduce both.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
_spec = importlib.util.spec_from_file_location("make_checkpoints", FIXTURES / "make_checkpoints.py")
make_checkpoints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_checkpoints)
SETUPS = sorted(make_checkpoints.DATA)


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def batch() -> dict:
    return torch.load(FIXTURES / "batch.pt", weights_only=True)


def assert_same_predictions(predicted: dict, stored: dict) -> None:
    assert set(predicted) == set(stored)
    for name, value in stored.items():
        torch.testing.assert_close(predicted[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_every_setup_has_a_fixture(expected):
    assert SETUPS == sorted(expected) == ["escm_dr", "mmoe_gradnorm", "shared_bottom_sparse"]
    for name in SETUPS:
        assert load_checkpoint(FIXTURES / f"{name}.ckpt")["global_step"] == make_checkpoints.STEPS  # plain data


@pytest.mark.parametrize("name", SETUPS)
def test_old_checkpoint_loads_and_predicts_the_same(name, expected, batch):
    module = MultiTaskLightningModule.load_from_checkpoint(FIXTURES / f"{name}.ckpt")
    assert_same_predictions(make_checkpoints.predictions(module, batch), expected[name]["loaded"])


@pytest.mark.parametrize("name", SETUPS)
def test_old_checkpoint_resumes_one_step_exactly(name, expected, batch, tmp_path):
    train = tmp_path / "train.parquet"  # a copy: the fixture folder stays as it is
    shutil.copy(FIXTURES / "train.parquet", train)
    predicted = make_checkpoints.resumed_predictions(FIXTURES / f"{name}.ckpt", train, make_checkpoints.DATA[name],
                                                     batch)
    assert_same_predictions(predicted, expected[name]["resumed"])
    # the resumed step moved the model: the comparison above is not the loaded model's again
    assert not all(torch.allclose(predicted[k].float(), v.float()) for k, v in expected[name]["loaded"].items())
