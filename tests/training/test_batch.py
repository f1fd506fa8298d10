"""``mtl_lightning.batch.Batch`` is the layout the data module produces and the module reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, SparseFeature, Task
from mtl_lightning.batch import Batch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"


def test_parquet_batches_hold_the_declared_keys_with_their_types(tmp_path):
    train = shutil.copy(FIXTURES / "train.parquet", tmp_path / "train.parquet")
    features = [SparseFeature("user_id", 20, 4), DenseFeature("dense_0")]
    dm = ParquetDataModule(train=train, tasks=[Task("click"), Task("dwell", kind="regression")], features=features,
                           batch_size=16, group="user_id", scenario="item_id", keys=["item_id"], progress=False)
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert Batch.__required_keys__ <= set(batch) <= Batch.__required_keys__ | Batch.__optional_keys__
    assert set(batch) == {"features", "labels", "row_id", "group", "scenario", "keys"}
    assert set(batch["features"]) == {"user_id", "dense_0"} and set(batch["labels"]) == {"click", "dwell"}
    assert batch["features"]["user_id"].dtype == torch.int64 and batch["features"]["dense_0"].dtype == torch.float32
    assert all(v.dtype == torch.float32 and v.shape == (16,) for v in batch["labels"].values())
    assert batch["row_id"].dtype == batch["group"].dtype == batch["scenario"].dtype == torch.int64
