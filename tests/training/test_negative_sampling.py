"""``Task(negative_sampling_rate=r)``: predictions, metrics and exports give ``p / (p + (1 - p) / r)``; a model
trained on negatives kept at rate r and told so predicts the unsampled click rate."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.export import example_features, export_onnx, export_torchscript

FEATURES = [SparseFeature("user", 20, 4), DenseFeature("x")]


def tasks(rate: float = 1.0) -> list[Task]:
    return [Task("click", negative_sampling_rate=rate), Task("dwell", kind="regression")]


def test_the_corrected_probability_is_the_closed_form_in_predictions_and_exports(tmp_path):
    torch.manual_seed(0)
    sampled = SharedBottom(FEATURES, tasks(0.1), bottom_hidden=(8,), tower_hidden=(4,)).eval()
    plain = SharedBottom(FEATURES, tasks(), bottom_hidden=(8,), tower_hidden=(4,)).eval()
    plain.load_state_dict(sampled.state_dict())
    batch = example_features(sampled.features, batch_size=33, seed=3)
    module = MultiTaskLightningModule(sampled)
    with torch.no_grad():
        p = plain.predictions(plain(batch))["click"].double()
        corrected = module.predict_step({"features": batch}, 0)
    expected = p / (p + (1 - p) / 0.1)
    torch.testing.assert_close(corrected["click"].double(), expected, atol=1e-6, rtol=0)
    assert (corrected["click"] < p.float()).all()  # fewer positives in the unsampled world
    torch.testing.assert_close(corrected["dwell"], plain.predictions(plain(batch))["dwell"])
    session = ort.InferenceSession(str(export_onnx(module, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    served = session.run(["click"], {name: batch[name].numpy() for name in ("user", "x")})[0]
    np.testing.assert_allclose(served, corrected["click"].numpy(), atol=1e-6, rtol=0)
    scripted = torch.jit.load(str(export_torchscript(module, tmp_path / "m.pt")))(batch)["click"]
    np.testing.assert_allclose(scripted.numpy(), corrected["click"].numpy(), atol=1e-6, rtol=0)


def test_rates_are_checked():
    with pytest.raises(ValueError, match=r"negative_sampling_rate must be a number in \(0, 1\]"):
        Task("click", negative_sampling_rate=0)
    with pytest.raises(ValueError, match=r"negative_sampling_rate must be a number in \(0, 1\]"):
        Task("click", negative_sampling_rate=1.5)
    with pytest.raises(ValueError, match="applies to binary tasks"):
        Task("dwell", kind="regression", negative_sampling_rate=0.5)
    model = SharedBottom(FEATURES, tasks(), bottom_hidden=(8,), tower_hidden=(4,))
    with pytest.raises(ValueError, match="the architecture's task has 1.0"):
        MultiTaskLightningModule(model, tasks=tasks(0.5))


def table(n: int, seed: int, keep_negatives: float = 1.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * x - 1.5)))).astype(np.int64)
    data = pa.table({"user": rng.integers(0, 20, n), "x": x, "click": click, "dwell": x})
    return data.filter(pa.array((click == 1) | (rng.random(n) < keep_negatives)))


def test_training_on_sampled_negatives_with_the_rate_predicts_the_unsampled_rate(tmp_path, quiet_trainer):
    pq.write_table(table(8000, 0, keep_negatives=0.25), tmp_path / "train.parquet")
    pq.write_table(table(6000, 1), tmp_path / "val.parquet")
    results = {}
    for rate in (1.0, 0.25):
        data = ParquetDataModule(train=tmp_path / "train.parquet", val=tmp_path / "val.parquet", tasks=tasks(rate),
                                 features=FEATURES, batch_size=256)
        torch.manual_seed(0)
        module = MultiTaskLightningModule(SharedBottom(FEATURES, tasks(rate), bottom_hidden=(16,), tower_hidden=(8,)),
                                          lr=0.02)
        trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0)
        trainer.fit(module, data)
        results[rate] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert results[1.0]["val/click/pcoc"] > 1.5  # not told: over-predicts on unsampled data
    assert results[0.25]["val/click/pcoc"] == pytest.approx(1.0, abs=0.08)
    assert results[0.25]["val/click/ece"] < results[1.0]["val/click/ece"] / 3
    # the correction is a shift of every logit: it changes no order
    assert results[0.25]["val/click/auc"] == pytest.approx(results[1.0]["val/click/auc"], abs=0.01)
    assert math.isfinite(results[0.25]["val/click/ne"]) and results[0.25]["val/click/ne"] < 1
