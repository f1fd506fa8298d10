"""NE, PCOC, ECE, the reliability table, weighted MSE/MAE and exact XAUC: hand-computed values, sample weights,
what the module logs (and writes to TensorBoard), and the same numbers on 2 DDP ranks with uneven shards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtl_lightning.evaluation import SplitEvaluation
from mtl_lightning.metrics import (
    PCOC, XAUC, BinaryLogLoss, ExpectedCalibrationError, NormalizedEntropy, WeightedMeanError, reliability_table, xauc,
)

# four rows: probability, label, weight
P = [0.25, 0.65, 0.95, 0.45]
Y = [0.0, 1.0, 1.0, 0.0]
W = [1.0, 2.0, 1.0, 0.5]


def logits(p=P) -> torch.Tensor:
    return torch.logit(torch.tensor(p, dtype=torch.float64))


def updated(metric, weights=W):
    metric.update(logits(), torch.tensor(Y), None if weights is None else torch.tensor(weights))
    return float(metric.compute())


def test_weighted_logloss_ne_pcoc_ece_by_hand():
    total = 4.5
    logloss = (-math.log(0.75) - 2 * math.log(0.65) - math.log(0.95) - 0.5 * math.log(0.55)) / total
    base = 3 / total
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert updated(BinaryLogLoss()) == pytest.approx(logloss, rel=1e-6)
    assert updated(NormalizedEntropy()) == pytest.approx(logloss / entropy, rel=1e-6)
    assert updated(PCOC()) == pytest.approx((0.25 + 2 * 0.65 + 0.95 + 0.5 * 0.45) / 3, rel=1e-6)
    # bins of width 0.1: 0.25 -> 2 |0.25 - 0|, 0.65 -> 6 |1.3 - 2|, 0.95 -> 9 |0.95 - 1|, 0.45 -> 4 |0.225 - 0|
    assert updated(ExpectedCalibrationError()) == pytest.approx((0.25 + 0.7 + 0.05 + 0.225) / total, rel=1e-6)
    # 2 bins: [0, .5): 0.25 (w 1), 0.45 (w .5), no positive: |0.475 - 0|; [.5, 1]: |1.3 + 0.95 - 3|
    assert updated(ExpectedCalibrationError(bins=2)) == pytest.approx((0.475 + 0.75) / total, rel=1e-6)
    # unweighted
    assert updated(PCOC(), None) == pytest.approx((0.25 + 0.65 + 0.95 + 0.45) / 2, rel=1e-6)
    assert updated(ExpectedCalibrationError(), None) == pytest.approx((0.25 + 0.35 + 0.05 + 0.45) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="bins must be an integer >= 1"):
        ExpectedCalibrationError(bins=0)


def test_ne_is_one_for_the_base_rate_and_undefined_for_one_class():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    metric = NormalizedEntropy()
    metric.update(torch.full((4,), math.log(0.25 / 0.75)), labels)  # always predicting the base rate 1/4
    assert float(metric.compute()) == pytest.approx(1.0, rel=1e-6)
    metric = NormalizedEntropy()
    metric.update(torch.zeros(3), torch.ones(3))
    assert math.isnan(float(metric.compute()))
    metric = PCOC()
    metric.update(torch.zeros(3), torch.zeros(3))
    assert math.isnan(float(metric.compute()))


def test_reliability_table_by_hand():
    table = reliability_table(np.array(P), np.array(Y), np.array(W), bins=2)
    assert list(table.columns) == ["bin", "lower", "upper", "rows", "weight", "mean_predicted", "observed_rate"]
    assert table["rows"].tolist() == [2, 2]
    np.testing.assert_allclose(table["weight"], [1.5, 3.0])
    np.testing.assert_allclose(table["mean_predicted"], [(0.25 + 0.5 * 0.45) / 1.5, (1.3 + 0.95) / 3])
    np.testing.assert_allclose(table["observed_rate"], [0.0, 1.0])
    np.testing.assert_allclose(table["lower"], [0.0, 0.5])
    empty = reliability_table(np.array([0.0, 1.0]), np.array([0, 1]), bins=4)  # 0 and 1 exactly: first and last bin
    assert empty["rows"].tolist() == [1, 0, 0, 1] and math.isnan(empty["observed_rate"][1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        reliability_table(np.array([2.0]), np.array([1]))
    # the table's ECE is the metric's
    ece = (table["weight"] * (table["mean_predicted"] - table["observed_rate"]).abs()).sum() / table["weight"].sum()
    assert ece == pytest.approx(updated(ExpectedCalibrationError(bins=2)), rel=1e-6)


def brute_force_xauc(v, y) -> float:
    num = den = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] < y[j]:
                den += 1
                num += 1.0 if v[i] < v[j] else 0.5 if v[i] == v[j] else 0.0
    return num / den


def test_xauc_exact_by_hand_and_against_every_pair():
    # labels 1 < 2 < 3; predictions order (1, 3) and (2, 3) right, (1, 2) wrong: 2 of 3 pairs
    assert xauc(np.array([0.5, 0.1, 0.9]), np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    # a tie in prediction counts 1/2; pairs of equal labels do not count
    assert xauc(np.array([0.5, 0.5, 0.7]), np.array([1.0, 2.0, 2.0])) == pytest.approx((0.5 + 1) / 2)
    assert math.isnan(xauc(np.array([1.0, 2.0]), np.array([3.0, 3.0])))
    rng = np.random.default_rng(0)
    for n in (2, 5, 33, 120):
        v, y = rng.integers(0, 6, n).astype(float), rng.integers(0, 4, n).astype(float)
        if len(set(y)) > 1:
            assert xauc(v, y) == pytest.approx(brute_force_xauc(v, y), abs=1e-12)
    metric = XAUC()
    v, y = torch.tensor(rng.normal(size=50)), torch.tensor(rng.integers(0, 5, 50).astype(float))
    metric.update(v[:20], y[:20])
    metric.update(v[20:], y[20:])
    assert float(metric.compute()) == pytest.approx(brute_force_xauc(v.numpy(), y.numpy()), abs=1e-6)


def test_weighted_mse_and_mae():
    preds, target, weight = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1.0, 5.0, 2.0])
    mse, mae = WeightedMeanError(2), WeightedMeanError(1)
    mse.update(preds, target, weight)
    mae.update(preds, target, weight)
    assert float(mse.compute()) == pytest.approx((1 + 0 + 2 * 9) / 8)
    assert float(mae.compute()) == pytest.approx((1 + 0 + 2 * 3) / 8)


def evaluation_batches() -> tuple:
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        import ddp_calibration_metrics as script
    finally:
        sys.path.pop(0)
    return script, [b for shard in script.shards() for b in shard]


def test_module_logs_weighted_calibration_and_writes_a_reliability_image(tmp_path, quiet_trainer):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script, batches = evaluation_batches()
    module = script.module()
    trainer = quiet_trainer(logger=TensorBoardLogger(tmp_path, name="run", version=0))
    logged = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    with torch.no_grad():
        z = torch.cat([module.model(b["features"])["click"] for b in batches]).double()
    y = torch.cat([b["labels"]["click"] for b in batches]).double()
    w = torch.cat([b["weights"]["click"] for b in batches]).double()
    keep = y != -1
    z, y, w = z[keep], y[keep], w[keep]
    p = torch.sigmoid(z)
    logloss = float((w * -(y * torch.log(p) + (1 - y) * torch.log(1 - p))).sum() / w.sum())
    base = float((w * y).sum() / w.sum())
    assert logged["val/click/logloss"] == pytest.approx(logloss, rel=1e-5)
    assert logged["val/click/ne"] == pytest.approx(
        logloss / -(base * math.log(base) + (1 - base) * math.log(1 - base)), rel=1e-5)
    assert logged["val/click/pcoc"] == pytest.approx(float((w * p).sum() / (w * y).sum()), rel=1e-5)
    table = reliability_table(p.numpy(), y.numpy(), w.numpy(), bins=5)
    ece = float(np.nansum(table["weight"] * (table["mean_predicted"] - table["observed_rate"]).abs()) / w.sum())
    assert logged["val/click/ece"] == pytest.approx(ece, rel=1e-5)
    kept = module.val_evaluation.reliability_tables["click"]
    np.testing.assert_allclose(kept["weight"], table["weight"], rtol=1e-6)
    np.testing.assert_array_equal(kept["rows"], table["rows"])
    assert sum(kept["rows"]) == int(keep.sum())
    dwell_v = torch.cat([module.model(b["features"])["dwell"].detach() for b in batches])
    dwell_y = torch.cat([b["labels"]["dwell"] for b in batches])
    labelled = dwell_y != -1  # -1 is the ignore label, for regression tasks too
    assert logged["val/dwell/xauc"] == pytest.approx(
        brute_force_xauc(dwell_v[labelled].numpy(), dwell_y[labelled].numpy()), abs=1e-6)
    assert logged["val/click/pcoc/domain=1"] > 0
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["val/click/reliability"]
    image = events.Images("val/click/reliability")[0]
    assert image.width > 100 and image.height > 100


def test_evaluation_values_do_not_depend_on_how_rows_are_batched():
    script, batches = evaluation_batches()
    module = script.module()
    merged = {"features": {k: torch.cat([b["features"][k] for b in batches]) for k in batches[0]["features"]},
              "labels": {k: torch.cat([b["labels"][k] for b in batches]) for k in batches[0]["labels"]},
              "weights": {k: torch.cat([b["weights"][k] for b in batches]) for k in batches[0]["weights"]},
              "scenario": torch.cat([b["scenario"] for b in batches])}
    results = []
    for split in (batches, [merged]):
        evaluation = SplitEvaluation("val", module.tasks, bins=5)
        with torch.no_grad():
            for b in split:
                evaluation.update(module.model(b["features"]), b)
        results.append({k: float(v) for k, v in evaluation.compute().items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-7), key


def test_ddp_uneven_shards_give_the_one_process_values(tmp_path):
    """Rank 0 validates 65 rows in 2 batches, rank 1 17 rows in 1: every rank logs the values of one process
    over all 82 rows (sums reduced for NE/PCOC/ECE/log-loss/MSE, rows gathered for AUC/XAUC and per scenario)."""
    script_path = Path(__file__).parents[1] / "scripts" / "ddp_calibration_metrics.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script_path), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"metrics_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    script, batches = evaluation_batches()
    module = script.module()
    evaluation = SplitEvaluation("val", module.tasks, bins=5)
    with torch.no_grad():
        for b in batches:
            evaluation.update(module.model(b["features"]), b)
    expected = {k: float(v) for k, v in evaluation.compute().items()}
    assert set(ranks[0]) == set(expected)
    for name in ("ne", "pcoc", "ece", "logloss", "auc"):
        assert f"val/click/{name}/domain=0" in expected
    for name in ("accuracy", "auc", "logloss"):  # the multi-class task: sums reduced (weighted), rows gathered
        assert f"val/genre/{name}" in expected and f"val/genre/{name}/domain=1" in expected
    # the regression task per scenario (rows gathered): weighted MSE / MAE and exact XAUC of each scenario's rows
    with torch.no_grad():
        v = torch.cat([module.model(b["features"])["dwell"] for b in batches]).double()
    y, w = (torch.cat([b[part]["dwell"] for b in batches]).double() for part in ("labels", "weights"))
    scenario = torch.cat([b["scenario"] for b in batches])
    for s in (0, 1):
        rows = (scenario == s) & (y != -1)  # -1 is the ignore label
        assert expected[f"val/dwell/mse/domain={s}"] == pytest.approx(
            float((w[rows] * (v[rows] - y[rows]) ** 2).sum() / w[rows].sum()), rel=1e-5)
        assert expected[f"val/dwell/mae/domain={s}"] == pytest.approx(
            float((w[rows] * (v[rows] - y[rows]).abs()).sum() / w[rows].sum()), rel=1e-5)
        assert expected[f"val/dwell/xauc/domain={s}"] == pytest.approx(
            brute_force_xauc(v[rows].numpy(), y[rows].numpy()), abs=1e-6)
    for key, value in expected.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    tables = [json.loads((tmp_path / f"reliability_rank{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1]
    assert [row["rows"] for row in tables[0]] == evaluation.reliability_tables["click"]["rows"].tolist()
    assert sum(row["rows"] for row in tables[0]) == 82 - 3 * 2  # two ignored rows per batch
