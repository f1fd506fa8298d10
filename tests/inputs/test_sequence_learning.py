"""Learning on data with a known sequence signal: DIN and target attention beat mean pooling through the library.

``datamodules.synthetic_sequences`` writes impressions whose click depends on how many history items share the
candidate's category and whether the candidate itself is in the history: a model must compare each history
position with the candidate, which pooling the history first cannot do. The same MMoE is trained through
``ParquetDataModule`` + ``MultiTaskLightningModule`` + ``Trainer`` with the history group mean-pooled, read by
DIN, and read by target attention (the candidate ``item_id`` + ``category`` as the query).

Settings (20k training rows, histories of up to 10, both joint effects at weight 2, no ``user_id`` feature:
with 20k users a per-user table only memorises noise at this size; Adam lr 1e-2, ``embedding_lr=0.1``, batch
256, 4 epochs). Measured over seeds 0, 1, 2 on a 2-core machine, validation click AUC on 10k rows (the test validates on 5k):
mean 0.714 / 0.697 / 0.738, DIN 0.807 / 0.810 / 0.808, attention 0.803 / 0.806 / 0.777: the smallest margin
over mean pooling of any seed is 0.039, seed 0's (run here) 0.09. The test asks for 0.03.

The layers are tiny (batch 256, width 32), so the test trains on one torch thread: a second one only adds
synchronisation, which on a machine loaded by other processes made the same run 14 times slower.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic_sequences import sequence_features, sequence_tasks, write_sequence_synthetic
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE

MARGIN = 0.03
QUERY = {"hist_item": "item_id", "hist_category": "category"}


@pytest.fixture(scope="module")
def sequence_paths(tmp_path_factory) -> dict[str, Path]:
    return write_sequence_synthetic(tmp_path_factory.mktemp("sequences"), (20_000, 5_000, 10), seed=0,
                                    max_history=10, match_weight=2.0, seen_weight=2.0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(pooling: str) -> list:
    found = [f for f in sequence_features(embedding_dim=8, max_history=10) if f.name != "user_id"]
    if pooling == "mean":
        return found
    return [dataclasses.replace(f, pooling=pooling, query=QUERY[f.name], group="hist") if f.name in QUERY else f
            for f in found]


def click_auc(pooling: str, paths: dict[str, Path], quiet_trainer) -> float:
    L.seed_everything(0, verbose=False)
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], features=features(pooling),
                           tasks=sequence_tasks(), batch_size=256)
    model = MMoE(features(pooling), sequence_tasks(), num_experts=3, expert_hidden=(32,), tower_hidden=(16,))
    module = MultiTaskLightningModule(model, lr=1e-2, embedding_lr=0.1)
    trainer = quiet_trainer(max_epochs=4, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    return float(trainer.callback_metrics["val/click/auc"])


def test_din_and_attention_beat_mean_pooling(sequence_paths, quiet_trainer, one_thread):
    mean = click_auc("mean", sequence_paths, quiet_trainer)
    din = click_auc("din", sequence_paths, quiet_trainer)
    attention = click_auc("attention", sequence_paths, quiet_trainer)
    assert mean > 0.6, f"mean pooling learns the candidate's own effects too (click AUC {mean:.4f})"
    assert din > mean + MARGIN, f"DIN {din:.4f} vs mean pooling {mean:.4f}"
    assert attention > mean + MARGIN, f"attention {attention:.4f} vs mean pooling {mean:.4f}"
