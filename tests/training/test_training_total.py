"""The training step's total, recomputed by hand: ``sum_k Task.weight_k L_k + auxiliary + imputation``.

Every expected value below is computed from the model's outputs with plain Python arithmetic (BCE, the IPS/DR
formulas, AITM's calibrator), never with the library's loss functions, and the task weights are not 1.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mtl_lightning import MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import AITM, ESCM
from mtl_lightning.losses import CounterfactualCVR

FEATURES = [SparseFeature("u", 10, 4)]
CLICKS = [1.0, 0.0, 1.0, 1.0, -1.0, 1.0, 0.0, 1.0]
CONVERSIONS = [1.0, -1.0, 0.0, 1.0, -1.0, 0.0, -1.0, 1.0]
PURCHASES = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(logit: float, label: float) -> float:
    return -(label * math.log(sigmoid(logit)) + (1 - label) * math.log(1 - sigmoid(logit)))


def mean_bce(logits: list[float], labels: list[float]) -> float:
    rows = [i for i, y in enumerate(labels) if y != -1]
    return sum(bce(logits[i], labels[i]) for i in rows) / len(rows)


def training_total(module: MultiTaskLightningModule, batch: dict) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: nothing is logged
        return module.training_step(batch, 0)


def escm_module(mode: str) -> MultiTaskLightningModule:
    torch.manual_seed(0)
    tasks = [Task("ctr", weight=0.7), Task("cvr", weight=2.5), Task("ctcvr", weight=0.3)]
    model = ESCM(FEATURES, tasks, tower_hidden=(8,))
    return MultiTaskLightningModule(model, counterfactual=CounterfactualCVR(mode, imputation_weight=0.4))


def by_hand_dr(outputs: dict[str, list[float]], clip: float = 0.01) -> tuple[float, float, float]:
    """IPS, DR and L_IMP over D (rows with a valid click label)."""
    rows = [i for i, o in enumerate(CLICKS) if o != -1]
    ctr, cvr, imputed = outputs["ctr"], outputs["cvr"], outputs["imputation"]
    ps = [min(max(sigmoid(x), clip), 1.0) for x in ctr]
    e = [bce(cvr[i], CONVERSIONS[i]) if CLICKS[i] == 1 else 0.0 for i in range(len(CLICKS))]
    ips = sum(CLICKS[i] * e[i] / ps[i] for i in rows) / len(rows)
    dr = sum(imputed[i] + CLICKS[i] * (e[i] - imputed[i]) / ps[i] for i in rows) / len(rows)
    imputation = sum(CLICKS[i] * (e[i] - imputed[i]) ** 2 / ps[i] for i in rows) / len(rows)
    return ips, dr, imputation


def escm_batch() -> dict:
    labels = {"ctr": torch.tensor(CLICKS), "cvr": torch.tensor(CONVERSIONS), "ctcvr": torch.tensor(PURCHASES)}
    return {"features": {"u": torch.arange(8) % 10}, "labels": labels}


@pytest.mark.parametrize("mode", ["ips", "dr"])
def test_total_is_the_weighted_sum_plus_the_imputation_term(mode):
    module = escm_module(mode)
    batch = escm_batch()
    total = training_total(module, batch)
    with torch.no_grad():
        outputs = {k: v.tolist() for k, v in module.model(batch["features"]).items()}
    ips, dr, imputation = by_hand_dr(outputs)
    expected = (0.7 * mean_bce(outputs["ctr"], CLICKS) + 2.5 * (ips if mode == "ips" else dr)
                + 0.3 * mean_bce(outputs["ctcvr"], PURCHASES) + (0.4 * imputation if mode == "dr" else 0.0))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert imputation > 0.05 and ips != pytest.approx(dr, rel=1e-2)  # each term moves the total visibly


def test_dr_imputation_tower_gets_exactly_the_gradient_of_its_weighted_loss():
    """L_CVR(DR) holds ê constant, so the imputation tower learns only from ``imputation_weight * L_IMP``."""
    module = escm_module("dr")
    batch = escm_batch()
    tower = list(module.model.imputation_tower.parameters())
    training_total(module, batch).backward()
    outputs = module.model(batch["features"])
    rows = [i for i, o in enumerate(CLICKS) if o != -1]
    ps = [min(max(sigmoid(x), 0.01), 1.0) for x in outputs["ctr"].tolist()]
    cvr = outputs["cvr"].tolist()
    imputation = sum(  # e_i are constants (floats), ê_i the tower's output
        CLICKS[i] * (bce(cvr[i], CONVERSIONS[i]) - outputs["imputation"][i]) ** 2 / ps[i]
        for i in rows if CLICKS[i] == 1) / len(rows)
    expected = torch.autograd.grad(0.4 * imputation, tower)
    for p, g in zip(tower, expected):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, g)


def test_total_adds_the_architectures_auxiliary_loss():
    torch.manual_seed(0)
    model = AITM(FEATURES, [Task("a", weight=0.5), Task("b", weight=2.0)], bottom_hidden=(6,), calibrator_weight=0.6)
    with torch.no_grad():  # b's probabilities above a's on some rows, so the calibrator is not 0
        model.towers["b"].last_linear().bias.add_(0.5)
    module = MultiTaskLightningModule(model)
    labels = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), "b": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, -1.0])}
    batch = {"features": {"u": torch.arange(6)}, "labels": labels}
    total = training_total(module, batch)
    with torch.no_grad():
        out = {k: v.tolist() for k, v in model(batch["features"]).items()}
    calibrator = 0.6 * sum(max(sigmoid(b) - sigmoid(a), 0.0) for a, b in zip(out["a"], out["b"])) / 6
    expected = 0.5 * mean_bce(out["a"], labels["a"].tolist()) + 2.0 * mean_bce(out["b"], labels["b"].tolist())
    assert total.item() == pytest.approx(expected + calibrator, rel=1e-5)
    assert calibrator > 1e-3
