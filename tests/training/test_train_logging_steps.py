"""Which training steps hand their values to ``log_dict`` (read from Lightning's public Trainer state)."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE


@pytest.fixture(scope="module")
def small_paths(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("logging_steps"), (1_000, 200, 200))


def fit_and_record(paths, tmp_path, **trainer_kwargs):
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(4), synthetic_tasks(), num_experts=2,
                                           expert_hidden=(8,), tower_hidden=()))
    calls = []
    original = module.log_dict
    module.log_dict = lambda values, **kw: (calls.append(module.trainer.global_step), original(values, **kw))[1]
    trainer = L.Trainer(accelerator="cpu", limit_val_batches=0, logger=CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, **trainer_kwargs)
    dm = ParquetDataModule(train=paths["train"], tasks=synthetic_tasks(), features=synthetic_features(4),
                           batch_size=100, progress=False)
    trainer.fit(module, dm)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        written = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return calls, written


def test_logs_on_written_steps_with_gradient_accumulation(small_paths, tmp_path):
    # 10 batches an epoch, 2 micro-batches an optimizer step: 5 optimizer steps; the logger writes steps 2 and 4
    # (0-based 1 and 3), logged on both micro-batches of each; the last micro-batch logs for callbacks
    calls, written = fit_and_record(small_paths, tmp_path, max_epochs=1, accumulate_grad_batches=2,
                                    log_every_n_steps=2)
    assert calls == [1, 1, 3, 3, 4]
    assert written == [1, 3]  # the CSV logger writes one row per step


def test_logs_on_written_steps_and_the_last_of_max_steps(small_paths, tmp_path):
    calls, written = fit_and_record(small_paths, tmp_path, max_steps=7, log_every_n_steps=3)
    assert calls == [2, 5, 6] and written == [2, 5]
