"""A module loaded from a checkpoint brings its encoders: a data module that refitted its own is overruled, loudly."""

from __future__ import annotations

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import MultiTaskLightningModule, Task, registry
from mtl_lightning.features import DenseFeature


def _write(path, cities: np.ndarray, seed: int) -> str:
    rng = np.random.default_rng(seed)
    names = np.array([f"city-{c}" for c in range(12)])[cities]
    x = rng.normal(size=len(cities)).astype(np.float32)
    y = (rng.random(len(cities)) < 1 / (1 + np.exp(-(cities - 5) / 2 - x))).astype(np.float32)
    pq.write_table(pa.table({"city": pa.array(names), "x": pa.array(x), "y": pa.array(y)}), path)
    return str(path)


def _datamodule(train: str | None, predict: str) -> ParquetDataModule:
    return ParquetDataModule(train=train, predict=predict, tasks=[Task("y")], features=[DenseFeature("x")],
                             categorical=["city"], batch_size=256, shuffle=False)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def test_loaded_module_uses_its_checkpoint_encoders_and_warns(tmp_path):
    rng = np.random.default_rng(0)
    # day 1: cities 0..9, frequent ones first; day 2: other frequencies and two new cities -> another vocabulary
    day1 = _write(tmp_path / "day1.parquet", rng.choice(10, 2_000, p=np.arange(10, 0, -1) / 55), seed=1)
    day2 = _write(tmp_path / "day2.parquet", rng.choice(12, 2_000, p=np.arange(1, 13) / 78), seed=2)
    predict = _write(tmp_path / "predict.parquet", rng.integers(0, 10, 500), seed=3)

    torch.manual_seed(0)
    dm = _datamodule(day1, predict)
    dm.setup("fit")
    model = registry.create("shared_bottom", features=dm.features, tasks=[Task("y")], bottom_hidden=(8,),
                            tower_hidden=(4,))
    trainer = _trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(MultiTaskLightningModule(model, lr=0.05), dm)
    checkpoint = trainer.checkpoint_callback.best_model_path
    expected = torch.cat([p["y"] for p in _trainer().predict(
        MultiTaskLightningModule.load_from_checkpoint(checkpoint), _datamodule(None, predict), ckpt_path=checkpoint)])

    refitted = _datamodule(day2, predict)
    refitted.setup("predict")  # fits its encoders on day 2
    assert refitted.encoders["city"].state_dict() != dm.encoders["city"].state_dict()
    loaded = MultiTaskLightningModule.load_from_checkpoint(checkpoint)
    with pytest.warns(UserWarning, match="differ from those this model was trained with"):
        got = torch.cat([p["y"] for p in _trainer().predict(loaded, refitted)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert refitted.encoders["city"].state_dict() == dm.encoders["city"].state_dict()
