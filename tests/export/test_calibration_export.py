"""A calibrated module's ONNX and TorchScript exports return predict_step's calibrated probabilities within 1e-5
(isotonic and Platt maps, global and per scenario), and ``python -m mtl_lightning.calibration`` writes a calibrated
checkpoint that the export command serves."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtl_lightning import DenseFeature, MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import HMoE, SharedBottom
from mtl_lightning.calibration import calibrate
from mtl_lightning.calibration.__main__ import main as calibration_main
from mtl_lightning.export import example_features, export_onnx, export_torchscript, main as export_main

FEATURES = [SparseFeature("user", 30, 4), SparseFeature("domain", 3, 2), DenseFeature("x")]
TASKS = [Task("click"), Task("like"), Task("dwell", kind="regression")]


def labelled(model, n: int = 600, seed: int = 0) -> list[dict]:
    """Batches whose labels follow sigmoid(3 * logit - 1): the model's own probabilities are miscalibrated."""
    features = example_features(model.features, batch_size=n, seed=seed)
    features["domain"] = features["domain"] % 3
    with torch.no_grad():
        logits = model(features)
    g = torch.Generator().manual_seed(seed)
    labels = {name: (torch.rand(n, generator=g) < torch.sigmoid(3 * logits[name] - 1)).float()
              for name in ("click", "like")}
    labels["dwell"] = logits["dwell"]
    return [{"features": {k: v[i:i + 100] for k, v in features.items()},
             "labels": {k: v[i:i + 100] for k, v in labels.items()}} for i in range(0, n, 100)]


def spread(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", ["isotonic", "platt"])
@pytest.mark.parametrize("by_scenario", [False, True])
def test_exports_apply_the_calibration_within_1e_5(tmp_path, method, by_scenario):
    torch.manual_seed(0)
    model = spread(HMoE(FEATURES, TASKS, num_experts=2, expert_hidden=(8,), tower_hidden=(4,)))
    module = MultiTaskLightningModule(model).eval()
    calibrate(module, labelled(model), method=method, by_scenario=by_scenario)
    batch = example_features(model.features, batch_size=57, seed=5)
    batch["domain"] = batch["domain"] % 3
    with torch.no_grad():
        expected = module.predict_step({"features": batch}, 0)
        raw = model.predictions(model(batch))
    assert (expected["click"] - raw["click"]).abs().max() > 0.02  # the calibration changes the numbers
    torch.testing.assert_close(expected["dwell"], raw["dwell"])
    session = ort.InferenceSession(str(export_onnx(module, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    served = dict(zip([o.name for o in session.get_outputs()],
                      session.run(None, {name: batch[name].numpy() for name in [f.name for f in model.features]})))
    scripted = torch.jit.load(str(export_torchscript(module, tmp_path / "m.pt")))(batch)
    for name in ("click", "like", "dwell"):
        np.testing.assert_allclose(served[name], expected[name].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(scripted[name].numpy(), expected[name].numpy(), atol=1e-5, rtol=0)
    # calibrated probabilities keep the order of the raw ones (a monotone map; per scenario, within each)
    for domain in (0, 1, 2) if by_scenario else (None,):
        rows = batch["domain"] == domain if by_scenario else torch.ones(57, dtype=torch.bool)
        order = torch.argsort(raw["click"][rows])
        assert (expected["click"][rows][order].diff() >= 0).all()


def test_calibration_command_writes_a_checkpoint_the_export_serves(tmp_path, quiet_trainer):
    rng = np.random.default_rng(0)
    n = 800
    x = rng.normal(size=n)
    frame = {"user": rng.integers(0, 30, n), "domain": rng.integers(0, 3, n), "x": x,
             "click": (rng.random(n) < 1 / (1 + np.exp(-(2 * x - 1)))).astype(np.int64),
             "like": (rng.random(n) < 0.3).astype(np.int64), "dwell": rng.normal(size=n)}
    pq.write_table(pa.table(frame), tmp_path / "data.parquet")
    from datamodules import ParquetDataModule

    data = ParquetDataModule(train=tmp_path / "data.parquet", val=tmp_path / "data.parquet", tasks=TASKS,
                             features=FEATURES, batch_size=200)
    module = MultiTaskLightningModule(SharedBottom(FEATURES, TASKS, bottom_hidden=(8,), tower_hidden=(4,)))
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, data)
    checkpoint = trainer.checkpoint_callback.best_model_path
    calibration_main([checkpoint, "--val", str(tmp_path / "data.parquet"), "--output", str(tmp_path / "cal.ckpt"),
                      "--method", "platt"])
    calibrated = MultiTaskLightningModule.load_from_checkpoint(tmp_path / "cal.ckpt")
    assert set(calibrated.calibration.tasks) == {"click", "like"}
    expected = calibrate(module, data, method="platt").calibration.tasks["click"]
    torch.testing.assert_close(calibrated.calibration.tasks["click"].scale, expected.scale)
    export_main([str(tmp_path / "cal.ckpt"), "--onnx", str(tmp_path / "cal.onnx")])
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        predicted = calibrated.eval().predict_step(batch, 0)
    session = ort.InferenceSession(str(tmp_path / "cal.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(["click"], {f.name: batch["features"][f.name].numpy() for f in FEATURES})[0]
    np.testing.assert_allclose(served, predicted["click"].numpy(), atol=1e-5, rtol=0)
