"""Post-hoc calibration on data with a known miscalibration: a model trained on negatives kept at rate 0.25 (and not
told) over-predicts on unsampled data; isotonic and Platt maps fitted on the validation split bring the test PCOC
back to 1, halve the ECE and keep the AUC; predict_step, validation and checkpoints apply them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.calibration import Calibrate, TaskCalibrator, calibrate, fit_isotonic, fit_platt

FEATURES = [SparseFeature("user", 20, 4), SparseFeature("domain", 3, 2), DenseFeature("x")]
TASKS = [Task("click"), Task("dwell", kind="regression")]


def table(n: int, seed: int, keep_negatives: float = 1.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x, domain, user = rng.normal(size=n), rng.integers(0, 3, n), rng.integers(0, 20, n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * x - 1.0 + 0.5 * domain)))).astype(np.int64)
    kept = (click == 1) | (rng.random(n) < keep_negatives)
    data = pa.table({"user": user, "domain": domain, "x": x, "click": click, "dwell": x + rng.normal(size=n)})
    return data.filter(pa.array(kept))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, quiet_trainer):
    root = tmp_path_factory.mktemp("calibration")
    pq.write_table(table(6000, 0, keep_negatives=0.25), root / "train.parquet")
    pq.write_table(table(6000, 1), root / "val.parquet")
    pq.write_table(table(6000, 2), root / "test.parquet")
    data = ParquetDataModule(train=root / "train.parquet", val=root / "val.parquet", test=root / "test.parquet",
                             tasks=TASKS, features=FEATURES, batch_size=256, scenario="domain")
    torch.manual_seed(0)
    module = MultiTaskLightningModule(SharedBottom(FEATURES, TASKS, bottom_hidden=(16,), tower_hidden=(8,)), lr=0.02)
    trainer = quiet_trainer(max_epochs=4, default_root_dir=root, enable_checkpointing=True)
    trainer.fit(module, data)
    return root, module, data, trainer


def test_isotonic_and_platt_fits_by_hand():
    # labels increasing with p except one violation, pooled: blocks (0.1 | 0.2, 0.3 | 0.4) with means 0, 0.5, 1
    x, f = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]), np.ones(4))
    np.testing.assert_allclose(x, [0.0, 0.1, 0.25, 0.4, 1.0])
    np.testing.assert_allclose(f, [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
    # weights: the 0.3 negative weighs 3, so the block (0.2, 0.3) has mean 1/4 and x (0.2 + 0.9) / 4
    x, f = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 1.0, 3.0, 1.0]))
    np.testing.assert_allclose(x[2], 1.1 / 4)
    np.testing.assert_allclose(f[2], 0.25)
    calibrator = TaskCalibrator("isotonic", [{"x": [0.0, 0.1, 0.25, 0.4, 1.0], "y": [0.0, 0.0, 0.5, 1.0, 1.0]}])
    out = calibrator(torch.tensor([0.05, 0.1, 0.175, 0.3, 0.4, 0.7, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.25, 2 / 3, 1.0, 1.0, 1.0]))
    # Platt recovers the map that generated the labels: y ~ Bernoulli(sigmoid(2 logit(p) - 1))
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 200_000)
    y = (rng.random(p.size) < 1 / (1 + np.exp(-(2 * np.log(p / (1 - p)) - 1)))).astype(float)
    a, b = fit_platt(p, y, np.ones(p.size))
    assert a == pytest.approx(2.0, abs=0.05) and b == pytest.approx(-1.0, abs=0.05)
    platt = TaskCalibrator("platt", [{"a": 2.0, "b": -1.0}])
    torch.testing.assert_close(platt(torch.tensor([0.5, 0.8])), torch.sigmoid(torch.tensor([-1.0, 2 * float(np.log(4)) - 1])))
    with pytest.warns(UserWarning, match="do not rank the labels"):
        a, b = fit_platt(np.array([0.2, 0.8, 0.3, 0.7]), np.array([1.0, 0.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 2.0]))
    assert a == 1e-3 and 1 / (1 + np.exp(-b)) == pytest.approx(0.4, abs=1e-3)  # about the base rate 2 / 5


def test_per_scenario_maps_pick_their_row_and_fall_back_to_the_global_one():
    calibrator = TaskCalibrator("platt", [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": -1.0}, {"a": 1.0, "b": 0.0}],
                                scenario_ids=[4, 7])
    out = calibrator(torch.full((4,), 0.5), torch.tensor([4, 7, 5, 0]))
    torch.testing.assert_close(out, torch.sigmoid(torch.tensor([1.0, -1.0, 0.0, 0.0])))


def metrics(module, data, trainer_factory) -> dict[str, float]:
    return trainer_factory().test(module, data, verbose=False)[0]


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibration_fixes_a_known_miscalibration_and_keeps_the_auc(trained, quiet_trainer, method):
    _, module, data, _ = trained
    before = metrics(module, data, quiet_trainer)
    assert before["test/click/pcoc"] > 1.5  # trained on a quarter of the negatives: over-predicts
    calibrate(module, data, method=method)
    fitted_on = quiet_trainer().validate(module, data, verbose=False)[0]
    assert fitted_on["val/click/pcoc"] == pytest.approx(1.0, abs=0.01)  # on the rows it was fitted on
    after = metrics(module, data, quiet_trainer)
    assert after["test/click/pcoc"] == pytest.approx(1.0, abs=0.05)  # held-out rows: their own base rate differs
    assert after["test/click/ece"] <= before["test/click/ece"] / 2
    assert after["test/click/ne"] < before["test/click/ne"]
    assert after["test/click/auc"] == pytest.approx(before["test/click/auc"], abs=1e-3)
    assert after["test/dwell/mse"] == before["test/dwell/mse"]  # regression tasks are not calibrated
    module.calibration = None


def test_by_scenario_calibration_fits_each_scenario(trained, quiet_trainer):
    _, module, data, _ = trained
    calibrate(module, data, method="platt", by_scenario=True)
    calibrator = module.calibration.tasks["click"]
    assert calibrator.scenario_ids.tolist() == [0, 1, 2] and calibrator.scale.numel() == 4
    assert module.calibration.scenario_feature == "domain"
    after = metrics(module, data, quiet_trainer)
    for domain in (0, 1, 2):
        assert after[f"test/click/pcoc/domain={domain}"] == pytest.approx(1.0, abs=0.08)
    module.calibration = None


def test_predict_step_and_checkpoints_carry_the_calibration(trained, quiet_trainer, tmp_path):
    root, module, data, trainer = trained
    calibrate(module, data, method="isotonic")
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        raw = module.model.predictions(module.model(batch["features"]))["click"]
        predicted = module.predict_step(batch, 0)["click"]
    torch.testing.assert_close(predicted, module.calibration.tasks["click"](raw))
    assert (predicted - raw).abs().max() > 0.05
    trainer.save_checkpoint(tmp_path / "calibrated.ckpt")
    loaded = MultiTaskLightningModule.load_from_checkpoint(tmp_path / "calibrated.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_step(batch, 0)["click"], predicted)
    assert "calibration" in torch.load(tmp_path / "calibrated.ckpt", weights_only=True)
    module.calibration = None
    uncalibrated = MultiTaskLightningModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert uncalibrated.calibration is None


def test_calibrate_refuses_bad_arguments(trained):
    _, module, data, _ = trained
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(module, data, method="beta")
    with pytest.raises(ValueError, match=r"\['dwell'\] are not binary tasks"):
        calibrate(module, data, tasks=["dwell"])
    with pytest.raises(ValueError, match="by_scenario=True needs the scenario id among the model's features"):
        plain = ParquetDataModule(val=data.paths["val"], tasks=TASKS, features=FEATURES)
        calibrate(module, plain, by_scenario=True)
    one_class = [{"features": {"user": torch.zeros(4, dtype=torch.long), "domain": torch.zeros(4, dtype=torch.long),
                               "x": torch.zeros(4)}, "labels": {"click": torch.ones(4), "dwell": torch.zeros(4)}}]
    with pytest.raises(ValueError, match="task 'click' needs positive and negative rows"):
        calibrate(module, one_class)
    assert module.calibration is None


def test_calibrate_callback_writes_a_calibrated_checkpoint(tmp_path, quiet_trainer, trained):
    root = trained[0]
    data = ParquetDataModule(train=root / "val.parquet", val=root / "test.parquet", tasks=TASKS, features=FEATURES,
                             batch_size=512)
    callback = Calibrate(method="platt")
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True, callbacks=[callback])
    module = MultiTaskLightningModule(SharedBottom(FEATURES, TASKS, bottom_hidden=(8,), tower_hidden=(4,)))
    trainer.fit(module, data)
    assert callback.path is not None and callback.path.name == "calibrated.ckpt" and callback.path.exists()
    loaded = MultiTaskLightningModule.load_from_checkpoint(callback.path)
    assert loaded.calibration.tasks["click"].method == "platt"
    torch.testing.assert_close(loaded.calibration.tasks["click"].scale, module.calibration.tasks["click"].scale)
