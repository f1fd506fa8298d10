"""Per-scenario evaluation: AUC and GAUC per domain against hand counts, across batches and DDP ranks, as the module
logs them for multi-scenario architectures and for any model given a scenario column."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from mtl_lightning import MultiTaskLightningModule, SparseFeature, DenseFeature, Task
from mtl_lightning.architectures import HMoE, SharedBottom
from mtl_lightning.evaluation import SplitEvaluation
from mtl_lightning.metrics import ScenarioAUC, ScenarioRegression, group_auc, xauc


# (scenario, group, score, label); the expected values are worked out beside each block
HAND_ROWS = [
    # scenario 0: positives 0.9, 0.6; negatives 0.2, 0.5, 0.7. 0.9 beats 3, 0.6 beats 2 of 3: AUC 5/6.
    # groups: user 1 {0.9+, 0.2-} AUC 1 (n 2); user 2 {0.5-, 0.6+, 0.7-} AUC 1/2 (n 3): GAUC (2 + 1.5) / 5 = 0.7
    (0, 1, 0.9, 1), (0, 1, 0.2, 0), (0, 2, 0.5, 0), (0, 2, 0.6, 1), (0, 2, 0.7, 0),
    # scenario 2: {0.3+, 0.3-, 0.1-}: the tie counts 1/2: AUC (0.5 + 1) / 2 = 0.75; one user: GAUC 0.75
    (2, 3, 0.3, 1), (2, 3, 0.3, 0), (2, 3, 0.1, 0),
    # scenario 5: positives only: no AUC, no GAUC
    (5, 4, 0.4, 1), (5, 4, 0.8, 1),
]
HAND_AUC = {0: 5 / 6, 2: 0.75}
HAND_GAUC = {0: 0.7, 2: 0.75}


def hand_tensors(seed: int = 0):
    order = torch.randperm(len(HAND_ROWS), generator=torch.Generator().manual_seed(seed))  # scenarios interleaved
    scenario, group, score, label = zip(*[HAND_ROWS[i] for i in order])
    return torch.tensor(score), torch.tensor(label, dtype=torch.float32), torch.tensor(scenario), torch.tensor(group)


def check_hand_values(result: dict) -> None:
    assert sorted(result) == [0, 2, 5]
    for scenario in (0, 2):
        assert result[scenario]["auc"].item() == pytest.approx(HAND_AUC[scenario], abs=1e-6)
        assert result[scenario]["gauc"].item() == pytest.approx(HAND_GAUC[scenario], abs=1e-6)
    # scenario 5 (positives 0.4, 0.8): no AUC, NE or GAUC; log-loss, PCOC and ECE are defined
    assert set(result[5]) == {"logloss", "pcoc", "ece"}
    assert result[5]["logloss"].item() == pytest.approx(-(math.log(0.4) + math.log(0.8)) / 2, abs=1e-6)
    assert result[5]["pcoc"].item() == pytest.approx((0.4 + 0.8) / 2, abs=1e-6)
    assert result[5]["ece"].item() == pytest.approx((0.6 + 0.2) / 2, abs=1e-6)  # bins 4 and 8: |0.4-1|, |0.8-1|
    # scenario 2 (0.3+, 0.3-, 0.1-): base rate 1/3, PCOC 0.7 / 1
    entropy = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    logloss = -(math.log(0.3) + math.log(0.7) + math.log(0.9)) / 3
    assert result[2]["ne"].item() == pytest.approx(logloss / entropy, abs=1e-6)
    assert result[2]["pcoc"].item() == pytest.approx(0.7, abs=1e-6)
    # bins: 0.1 -> bin 1 (|0.1 - 0|), 0.3 and 0.3 -> bin 3 (|0.6 - 1|): (0.1 + 0.4) / 3
    assert result[2]["ece"].item() == pytest.approx(0.5 / 3, abs=1e-6)


def test_scenario_auc_hand_count_across_batches():
    scores, labels, scenarios, groups = hand_tensors()
    metric = ScenarioAUC()
    for chunk in torch.arange(len(scores)).split(3):  # scenarios and users straddle batches
        metric.update(torch.logit(scores[chunk]), labels[chunk], scenarios[chunk], groups[chunk])  # order only
    check_hand_values(metric.compute())
    metric.reset()
    metric.update(scores, labels, scenarios)  # without groups: AUC only
    calibration = {"logloss", "ne", "pcoc", "ece"}
    assert {s: set(v) for s, v in metric.compute().items()} == {
        0: {"auc"} | calibration, 2: {"auc"} | calibration, 5: calibration - {"ne"}}
    with pytest.raises(ValueError, match="integer scenario ids"):
        metric.update(scores, labels, scenarios.float())
    with pytest.raises(ValueError, match=r"\(N,\) preds, target, scenarios"):
        metric.update(scores, labels[:3], scenarios)


# (scenario, prediction, label, weight) of a regression task; the expected values are worked out in REGRESSION_BY_HAND
REGRESSION_ROWS = [
    (0, 1.0, 0.0, 1.0), (0, 2.0, 2.0, 5.0), (0, 4.0, 1.0, 2.0),
    (3, 0.5, 1.0, 2.0), (3, 0.5, 3.0, 1.0), (3, 2.0, 3.0, 1.0),
    (7, 1.0, 2.0, 1.0), (7, 4.0, 2.0, 3.0),
]
REGRESSION_BY_HAND = {  # (weighted, unweighted)
    # errors 1, 0, 3 (weights 1, 5, 2); labels 0 < 1 < 2 ordered by the predictions 1, 4, 2: (0,1) and (0,2) right,
    # (1,2) wrong: XAUC 2/3
    0: {"mse": ((1 + 0 + 2 * 9) / 8, 10 / 3), "mae": ((1 + 0 + 2 * 3) / 8, 4 / 3), "xauc": (2 / 3, 2 / 3)},
    # errors 0.5, 2.5, 1 (weights 2, 1, 1); pairs of labels 1 < 3: one tied prediction (1/2), one right (1); the two
    # labels 3 are no pair: XAUC 1.5 / 2
    3: {"mse": ((2 * 0.25 + 6.25 + 1) / 4, 7.5 / 3), "mae": ((2 * 0.5 + 2.5 + 1) / 4, 4 / 3), "xauc": (0.75, 0.75)},
    # errors 1, 2 (weights 1, 3); both labels 2: no pair, so no XAUC
    7: {"mse": ((1 + 3 * 4) / 4, 5 / 2), "mae": ((1 + 3 * 2) / 4, 3 / 2)},
}


def regression_tensors(seed: int = 0):
    order = torch.randperm(len(REGRESSION_ROWS), generator=torch.Generator().manual_seed(seed))
    scenario, prediction, label, weight = zip(*[REGRESSION_ROWS[i] for i in order])
    return torch.tensor(prediction), torch.tensor(label), torch.tensor(scenario), torch.tensor(weight)


@pytest.mark.parametrize("weighted", [True, False])
def test_scenario_regression_by_hand_across_batches(weighted):
    predictions, labels, scenarios, weights = regression_tensors()
    metric = ScenarioRegression()
    for chunk in torch.arange(len(labels)).split(3):  # scenarios straddle batches
        metric.update(predictions[chunk], labels[chunk], scenarios[chunk], weight=weights[chunk] if weighted else None)
    result = metric.compute()
    assert sorted(result) == [0, 3, 7]
    for scenario, expected in REGRESSION_BY_HAND.items():
        assert set(result[scenario]) == set(expected)
        for name, values in expected.items():
            assert result[scenario][name].item() == pytest.approx(values[0 if weighted else 1], rel=1e-6), name
    with pytest.raises(ValueError, match="sample weights of shape"):
        metric.update(predictions, labels, scenarios, weight=weights[:3])
    with pytest.raises(ValueError, match="integer scenario ids"):
        metric.update(predictions, labels, scenarios.float())


def test_evaluation_logs_regression_metrics_per_scenario_and_warns_about_equal_labels():
    """The split's evaluation: sample weights from the batch, ignored labels left out, one scenario = the split."""
    predictions, labels, scenarios, weights = regression_tensors(seed=1)
    ignored = torch.tensor([9.0, -1.0])  # an extra row in scenario 0 whose label is the ignore label
    batch = {"labels": {"dwell": torch.cat([labels, ignored[1:]])}, "weights": {"dwell": torch.cat([weights, ignored[:1]])},
             "scenario": torch.cat([scenarios, torch.tensor([0])])}
    evaluation = SplitEvaluation("val", [Task("dwell", kind="regression")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluation.update({"dwell": torch.cat([predictions, torch.tensor([100.0])])}, batch)
        logged = evaluation.compute()
    expected = {f"val/dwell/{name}/domain={scenario}": values[0]
                for scenario, by_name in REGRESSION_BY_HAND.items() for name, values in by_name.items()}
    assert {k: float(v) for k, v in logged.items() if "domain=" in k} == pytest.approx(expected, rel=1e-6)
    assert [str(w.message) for w in caught if "XAUC" in str(w.message)] == [
        "val split: task 'dwell' has one label value only in scenarios [7], so their XAUC is undefined and "
        "val/dwell/xauc/domain=7 not logged; the other scenarios' are (warned once per task and split)."]
    batch["scenario"] = torch.zeros_like(batch["scenario"])  # one scenario: the split's values
    evaluation.update({"dwell": torch.cat([predictions, torch.tensor([100.0])])}, batch)
    logged = evaluation.compute()
    for name in ("mse", "mae", "xauc"):
        assert float(logged[f"val/dwell/{name}/domain=0"]) == pytest.approx(float(logged[f"val/dwell/{name}"]),
                                                                           rel=1e-6), name


# Under DDP: tests/scripts/ddp_stream.py (values over both ranks), ddp_empty_shard.py (a rank without rows) and
# ddp_calibration_metrics.py (every per-scenario metric on 2 ranks with uneven shards against one process).


# ------------------------------------------------------------------------------------------------- the module
FEATURES = [SparseFeature("user", 12, 4), SparseFeature("domain", 4, 4), DenseFeature("x")]
TASKS = [Task("click"), Task("dwell", kind="regression")]


def scenario_batches(n: int = 3, size: int = 48, one_class_domain: int | None = 3, seed: int = 0) -> list[dict]:
    """Domains 0..3 interleaved; ``one_class_domain`` has clicks of 1 only; a few click labels are ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        domain = torch.randint(0, 4, (size,), generator=g)
        click = (torch.rand(size, generator=g) < 0.4).float()
        if one_class_domain is not None:
            click[domain == one_class_domain] = 1.0
        click[:3] = -1.0
        features = {"user": torch.randint(0, 12, (size,), generator=g), "domain": domain,
                    "x": torch.randn(size, generator=g)}
        batches.append({"features": features, "labels": {"click": click, "dwell": torch.randn(size, generator=g)},
                        "group": features["user"] % 5})
    return batches


def by_domain(module, batches):
    """(logits, labels, domains, groups) of every valid click row."""
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module.model(b["features"])["click"] for b in batches])
    labels = torch.cat([b["labels"]["click"] for b in batches])
    domains = torch.cat([b["features"]["domain"] for b in batches])
    groups = torch.cat([b["group"] for b in batches])
    keep = labels != -1
    return logits[keep], labels[keep], domains[keep], groups[keep]


def test_multi_scenario_model_logs_auc_gauc_and_regression_per_domain(quiet_trainer):
    torch.manual_seed(0)
    model = HMoE(FEATURES, TASKS, num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    module = MultiTaskLightningModule(model)
    batches = scenario_batches()
    with warnings.catch_warnings(record=True) as caught:  # validate, then fit below: metric states stay usable
        warnings.simplefilter("always")
        logged = quiet_trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    logits, labels, domains, groups = by_domain(module, batches)
    for d in (0, 1, 2):
        rows = domains == d
        auc = binary_auroc(torch.sigmoid(logits[rows]), labels[rows].long()).item()
        assert logged[f"val/click/auc/domain={d}"] == pytest.approx(auc, abs=1e-5)
        gauc = group_auc(logits[rows], labels[rows], groups[rows]).item()
        assert logged[f"val/click/gauc/domain={d}"] == pytest.approx(gauc, abs=1e-5)
        assert 0.0 < auc < 1.0 and abs(auc - logged["val/click/auc"]) > 1e-4  # not the overall AUC
    # domain 3 has one click class: no AUC, NE or GAUC, warned; the regression task's metrics are all there
    assert sorted(k for k in logged if "domain=3" in k) == [
        "val/click/ece/domain=3", "val/click/logloss/domain=3", "val/click/pcoc/domain=3",
        "val/dwell/mae/domain=3", "val/dwell/mse/domain=3", "val/dwell/xauc/domain=3"]
    assert any("scenarios [3]" in str(w.message) and "val/click/auc/domain=3" in str(w.message) for w in caught)
    check_dwell_by_domain(logged, module, batches, (0, 1, 2, 3))

    # an epoch whose split lacks domain 1 drops domain 1's values of the epoch before from callback_metrics
    without_1 = [{"features": {k: v[b["features"]["domain"] != 1] for k, v in b["features"].items()},
                  "labels": {k: v[b["features"]["domain"] != 1] for k, v in b["labels"].items()},
                  "group": b["group"][b["features"]["domain"] != 1]} for b in batches]
    seen = []
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Record(seen)])
    trainer.fit(module, DataLoader(batches, batch_size=None), EpochSplits(trainer, batches, without_1))
    assert "val/click/auc/domain=1" in seen[0] and "val/click/auc/domain=0" in seen[0]
    assert {f"val/dwell/{m}/domain={d}" for m in ("mse", "mae", "xauc") for d in range(4)} <= seen[0]
    for task in ("click", "dwell"):
        assert f"val/{task}/{HEADLINE[task]}/domain=1" not in trainer.callback_metrics
        assert f"val/{task}/{HEADLINE[task]}/domain=0" in trainer.callback_metrics
    # the last epoch's values are those of the trained model on its split
    check_dwell_by_domain({k: float(v) for k, v in trainer.callback_metrics.items()}, module, without_1, (0, 2, 3))


HEADLINE = {"click": "auc", "dwell": "mse"}


def check_dwell_by_domain(logged: dict, module, batches: list[dict], domains: tuple[int, ...]) -> None:
    """``val/dwell/{mse,mae,xauc}/domain=<d>`` are the model's MSE, MAE and exact XAUC over domain ``d``'s rows."""
    module.eval()
    with torch.no_grad():
        values = torch.cat([module.model(b["features"])["dwell"] for b in batches]).double()
    labels = torch.cat([b["labels"]["dwell"] for b in batches]).double()
    domain = torch.cat([b["features"]["domain"] for b in batches])
    for d in domains:
        v, y = values[domain == d], labels[domain == d]
        assert logged[f"val/dwell/mse/domain={d}"] == pytest.approx(float(((v - y) ** 2).mean()), rel=1e-5)
        assert logged[f"val/dwell/mae/domain={d}"] == pytest.approx(float((v - y).abs().mean()), rel=1e-5)
        assert logged[f"val/dwell/xauc/domain={d}"] == pytest.approx(xauc(v, y), abs=1e-6)
        assert abs(logged[f"val/dwell/mse/domain={d}"] - logged["val/dwell/mse"]) > 1e-4  # not the split's MSE


class EpochSplits:
    """A validation iterable whose batches in epoch ``e`` are ``splits[e]`` (the last split from then on)."""

    def __init__(self, trainer: L.Trainer, *splits: list[dict]) -> None:
        self.trainer, self.splits = trainer, splits

    def __iter__(self):
        return iter(self.splits[min(self.trainer.current_epoch, len(self.splits) - 1)])

    def __len__(self) -> int:
        return len(self.splits[0])


class Record(L.Callback):
    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen.append(set(trainer.callback_metrics))


def test_any_model_logs_per_scenario_with_a_scenario_tensor_and_only_then(quiet_trainer):
    torch.manual_seed(0)
    module = MultiTaskLightningModule(SharedBottom(FEATURES, TASKS, bottom_hidden=(8,), tower_hidden=(4,)))
    batches = scenario_batches(one_class_domain=None)
    plain = quiet_trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    assert not [k for k in plain if "domain=" in k]  # SharedBottom is not multi-scenario
    # the scenario tensor need not be a feature: here user % 2
    tagged = [{**b, "scenario": b["features"]["user"] % 2} for b in batches]
    logged = quiet_trainer().validate(module, DataLoader(tagged, batch_size=None), verbose=False)[0]
    logits, labels, _, groups = by_domain(module, batches)
    scenario = torch.cat([b["scenario"] for b in tagged])[torch.cat([b["labels"]["click"] for b in batches]) != -1]
    assert sorted(k for k in logged if "domain=" in k) == [
        f"val/click/{m}/domain={s}" for m in ("auc", "ece", "gauc", "logloss", "ne", "pcoc") for s in (0, 1)] + [
        f"val/dwell/{m}/domain={s}" for m in ("mae", "mse", "xauc") for s in (0, 1)]
    for s in (0, 1):
        rows = scenario == s
        assert logged[f"val/click/auc/domain={s}"] == pytest.approx(
            binary_auroc(torch.sigmoid(logits[rows]), labels[rows].long()).item(), abs=1e-5)
    # one scenario: its AUC is the split's AUC (both rank the same float32 probabilities, ties included)
    single = [{**b, "scenario": torch.zeros_like(b["features"]["user"])} for b in batches]
    one = quiet_trainer().validate(module, DataLoader(single, batch_size=None), verbose=False)[0]
    assert one["val/click/auc/domain=0"] == pytest.approx(one["val/click/auc"], abs=1e-6)
    for key in [f"click/{m}" for m in ("gauc", "logloss", "ne", "pcoc", "ece")] + ["dwell/mse", "dwell/mae", "dwell/xauc"]:
        assert one[f"val/{key}/domain=0"] == pytest.approx(one[f"val/{key}"], abs=1e-6), key
    # test split too
    tested = quiet_trainer().test(module, DataLoader(tagged, batch_size=None), verbose=False)[0]
    assert tested["test/click/auc/domain=1"] == pytest.approx(logged["val/click/auc/domain=1"], abs=1e-6)


def test_datamodule_scenario_column(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, batch_size=1000, group="user_id", scenario="city", keys=["item_id"])
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.dataset("val"))), 0)
    assert torch.equal(batch["scenario"], batch["features"]["city"])
    assert torch.equal(batch["group"], batch["features"]["user_id"])
    assert list(batch["keys"]) == ["item_id"]  # the group and scenario columns are not left among the keys
    same = synthetic_datamodule(synthetic_paths, batch_size=1000, group="city", scenario="city")
    same.setup("fit")
    batch = same.on_before_batch_transfer(next(iter(same.dataset("val"))), 0)
    assert torch.equal(batch["scenario"], batch["group"]) and "keys" not in batch
    with pytest.raises(ValueError, match=r"train.parquet: scenario column 'dense_0' has type float.*integer ids"):
        synthetic_datamodule(synthetic_paths, scenario="dense_0").setup("fit")
    with pytest.raises(ValueError, match="missing scenario column 'scene'"):
        synthetic_datamodule(synthetic_paths, scenario="scene").setup("fit")
