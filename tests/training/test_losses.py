"""Masked per-task losses against hand-computed numbers."""

from __future__ import annotations

import math

import torch

from mtl_lightning import MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.losses import masked_loss


def bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_masked_bce_and_mse_by_hand():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.7, 1.5], requires_grad=True)
    labels = torch.tensor([1.0, -1.0, 0.0, float("nan"), 1.0, -1.0])
    expected = (bce(0.5, 1) + bce(2.0, 0) + bce(-0.7, 1)) / 3
    loss = masked_loss(logits, labels, "binary", ignore_label=-1)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[[1, 3, 5]].abs().sum() == 0  # ignored rows get no gradient
    values = torch.tensor([1.0, 2.0, 3.0])
    targets = torch.tensor([1.5, float("nan"), 1.0])
    assert abs(masked_loss(values, targets, "regression").item() - (0.25 + 4.0) / 2) < 1e-6


def test_module_compute_losses_mixed_batch_and_all_ignored_batch():
    tasks = [Task("click"), Task("dwell", kind="regression", weight=0.5)]
    model = SharedBottom([SparseFeature("u", 4, 2)], tasks, bottom_hidden=(4,), tower_hidden=())
    module = MultiTaskLightningModule(model)
    outputs = {"click": torch.tensor([0.2, -0.4, 1.0, 3.0], requires_grad=True),
               "dwell": torch.tensor([1.0, 0.0, -1.0, 2.0], requires_grad=True)}
    labels = {"click": torch.tensor([1.0, -1.0, float("nan"), 0.0]),
              "dwell": torch.tensor([0.5, float("nan"), -1.5, 2.0])}
    losses = module.compute_losses(outputs, labels)
    assert abs(losses["click"].item() - (bce(0.2, 1) + bce(3.0, 0)) / 2) < 1e-6
    # ignore_label=-1 applies to every task kind: dwell -1.5 counts, NaN does not
    assert abs(losses["dwell"].item() - (0.25 + 0.25 + 0.0) / 3) < 1e-6

    ignored = {"click": torch.tensor([-1.0, float("nan"), -1.0, -1.0]), "dwell": torch.full((4,), float("nan"))}
    losses = module.compute_losses(outputs, ignored)
    total = module.weighting(torch.stack([losses["click"], losses["dwell"]]))
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert outputs["click"].grad is not None and torch.isfinite(outputs["click"].grad).all()
    assert outputs["click"].grad.abs().sum() == 0
