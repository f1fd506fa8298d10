"""Funnel consistency of entire-space models: the share of rows whose predicted CTCVR exceeds the predicted CTR."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mtl_lightning import MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import ESCM, ESMM, MMoE
from mtl_lightning.evaluation import SplitEvaluation, funnel_outputs

TASKS = [Task("ctr", label="click"), Task("ctcvr", label="purchase")]


def test_share_of_rows_above_the_click_probability_by_hand_and_summed_over_ranks():
    evaluation = SplitEvaluation("val", TASKS, funnel=("ctr", "ctcvr"))
    # batch 1: rows 0 and 2 have CTCVR above CTR (row 1 equal: not above); batch 2: none of 2 rows. Labels (one
    # ignored, one NaN) do not matter: the funnel holds on every row.
    batches = [({"ctr": torch.tensor([0.0, 1.0, -2.0]), "ctcvr": torch.tensor([0.5, 1.0, -1.0])},
                {"ctr": torch.tensor([1.0, -1.0, 0.0]), "ctcvr": torch.tensor([1.0, 0.0, float("nan")])}),
               ({"ctr": torch.tensor([3.0, 2.0]), "ctcvr": torch.tensor([-1.0, 1.0])},
                {"ctr": torch.tensor([1.0, 0.0]), "ctcvr": torch.tensor([0.0, 1.0])})]
    for outputs, labels in batches:
        evaluation.update(outputs, {"features": {}, "labels": labels})
    assert evaluation.compute()["val/ctcvr/exceeds_ctr"].item() == pytest.approx(2 / 5)
    # another rank saw 5 rows, 1 above: (2 + 1) / (5 + 5); the counts were reset by the first compute
    for outputs, labels in batches:
        evaluation.update(outputs, {"features": {}, "labels": labels})
    other_rank = torch.tensor([1.0, 5.0], dtype=torch.float64)

    def reduce_sum(value: torch.Tensor) -> torch.Tensor:  # the other rank took part in no other metric
        return value + other_rank if value.shape == (2,) else value

    assert evaluation.compute(reduce_sum)["val/ctcvr/exceeds_ctr"].item() == pytest.approx(0.3)
    # no funnel: no key
    plain = SplitEvaluation("val", TASKS)
    plain.update(batches[0][0], {"features": {}, "labels": batches[0][1]})
    assert not any("exceeds" in key for key in plain.compute())


def _batches(n: int = 3, size: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"features": {"u": torch.randint(0, 50, (size,), generator=generator)},
             "labels": {"ctr": (torch.rand(size, generator=generator) < 0.5).float(),
                        "ctcvr": (torch.rand(size, generator=generator) < 0.2).float()}} for _ in range(n)]


def test_entire_space_models_log_zero_and_others_log_nothing(quiet_trainer):
    features = [SparseFeature("u", 50, 8)]
    torch.manual_seed(0)
    esmm = ESMM(features, TASKS, tower_hidden=(8,))
    with torch.no_grad():  # large weights: probabilities near 0 and 1, where rounding could break the order
        for parameter in esmm.parameters():
            parameter.mul_(30)
    assert funnel_outputs(esmm) == ("ctr", "ctcvr")
    assert funnel_outputs(ESCM(features, TASKS, tower_hidden=(8,))) == ("ctr", "ctcvr")
    mmoe = MMoE(features, TASKS, num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    assert funnel_outputs(mmoe) is None
    loader = DataLoader(_batches(), batch_size=None)
    trainer = quiet_trainer()
    trainer.validate(MultiTaskLightningModule(esmm), dataloaders=loader, verbose=False)
    assert trainer.callback_metrics["val/ctcvr/exceeds_ctr"].item() == 0.0
    trainer = quiet_trainer()
    trainer.validate(MultiTaskLightningModule(mmoe), dataloaders=loader, verbose=False)
    assert "val/ctcvr/exceeds_ctr" not in trainer.callback_metrics and "val/ctr/auc" in trainer.callback_metrics
