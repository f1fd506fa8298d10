"""Metrics of multi-class tasks (``Task(kind="multiclass", num_classes=K)``), correct under DDP.

Every metric takes the model's ``(N, K)`` logits ``z``, the class ids ``y`` (``(N,)``, floats or integers
in ``[0, K)``; the evaluation filters ignored rows out first) and optional per-row sample weights ``w_i >= 0``
(1 when not given). With ``p_i = softmax(z_i)`` and ``W = sum_i w_i``:

* ``accuracy = sum_i w_i [argmax_c z_ic = y_i] / W`` (:class:`MulticlassAccuracyFromLogits`, micro average:
  the share of rows whose most probable class is their label; without weights torchmetrics'
  ``MulticlassAccuracy(average="micro")``). A tie between classes picks the lowest class id (``argmax``);
* ``logloss = sum_i w_i (logsumexp(z_i) - z_iy_i) / W``, the softmax cross-entropy (:class:`MulticlassLogLoss`);
* ``auc``: the macro one-vs-rest AUC, the mean over the classes ``c`` of the AUC of ``p_ic`` separating the rows of
  class ``c`` from the others (:class:`MulticlassAUROCFromLogits`: torchmetrics' exact per-class
  ``MulticlassAUROC`` fed softmax probabilities). A class without rows (or with every row) has no AUC and is left
  out of the mean; with fewer than two classes among the split's labels it is undefined and not logged.
  Unweighted, like every AUC here.

Accuracy and log-loss keep float64 sums summed over the ranks; AUC keeps the rows, gathered over the ranks. So
the value computed on 2 ranks with uneven shards is the one-process value over all their rows.

:class:`ClassCounts` (the task's :data:`metrics.COUNTS` entry) counts the rows and the distinct classes among
them, which decide what is undefined. :class:`ScenarioMulticlass` computes the three per scenario (domain) from
gathered rows, as ``metrics.ScenarioAUC`` does for binary tasks.

The binary-only metrics (NE, PCOC, ECE, the reliability diagram, group AUC) have no multi-class meaning here
and are not computed for a multi-class task.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAUROC
from torchmetrics.utilities import dim_zero_cat

from .calibration import _weights
from .scenario import ScenarioRows


def _check(logits: Tensor, target: Tensor, num_classes: int) -> None:
    if logits.dim() != 2 or logits.shape[1] != num_classes or logits.shape[0] != target.shape[0]:
        raise ValueError(f"a multiclass metric of {num_classes} classes takes (N, {num_classes}) logits and (N,) class "
                         f"ids, got {tuple(logits.shape)} and {tuple(target.shape)}")


class ClassCounts(Metric):
    """Rows seen and how many distinct classes they hold: ``compute()`` is ``tensor([rows, classes])`` (int64).

    Keeps the rows (``rows``, as ``metrics.LabelCounts``) and the rows of each class (``(K,)``), summed over the
    ranks, so every rank decides alike.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("rows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("per_class", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.rows += target.numel()
        self.per_class += torch.bincount(target.long().flatten(), minlength=self.num_classes)[: self.num_classes]

    def compute(self) -> Tensor:
        return torch.stack([self.rows, (self.per_class > 0).sum()])


class _WeightedRowMean(Metric):
    """The (weighted) mean over rows of ``row_values(logits, target)`` (a subclass's static method), as float64 sums
    reduced over the ranks."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    row_values: Callable[[Tensor, Tensor], Tensor]  # each subclass's static method: what a row contributes

    def update(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        _check(logits, target, self.num_classes)
        w = _weights(target, weight)
        self.total += (w * self.row_values(logits, target.long())).sum()
        self.count += w.sum()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=torch.finfo(torch.float64).tiny)).float()


class MulticlassAccuracyFromLogits(_WeightedRowMean):
    """(Weighted) share of rows whose highest logit is their class (micro accuracy; see the module docstring)."""

    higher_is_better = True

    @staticmethod
    def row_values(logits: Tensor, target: Tensor) -> Tensor:
        return (logits.argmax(dim=-1) == target).double()


class MulticlassLogLoss(_WeightedRowMean):
    """(Weighted) mean softmax cross-entropy computed from logits (``logsumexp(z) - z_y``, no clipping)."""

    higher_is_better = False

    @staticmethod
    def row_values(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.double(), target, reduction="none")


class MulticlassAUROCFromLogits(MulticlassAUROC):
    """Macro one-vs-rest AUC from torchmetrics' exact per-class ``MulticlassAUROC`` fed with logits: they become
    softmax probabilities before every update (torchmetrics decides that per batch, from the values' range).

    The mean is over the classes that have both positive and negative rows among the (gathered) labels; a class
    without rows would get an AUC of 0 from torchmetrics and is left out instead (``nan`` when no class is left).
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, average="none", thresholds=None, validate_args=False, **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(torch.softmax(preds.float(), dim=-1), target.long())

    def compute(self) -> Tensor:  # type: ignore[override]
        with warnings.catch_warnings():  # about classes without positive rows, left out below
            warnings.simplefilter("ignore")
            per_class = super().compute()  # (K,), on the states gathered over the ranks
        return mean_over_present_classes(per_class, dim_zero_cat(self.target))


def mean_over_present_classes(per_class: Tensor, target: Tensor) -> Tensor:
    """The mean of the per-class one-vs-rest AUCs ``per_class`` (``(K,)``) over the classes with both positive and
    negative rows in ``target``; ``nan`` when there is none."""
    target = target.long().flatten()
    counts = torch.bincount(target, minlength=per_class.numel())[: per_class.numel()]
    both = (counts > 0) & (counts < target.numel())
    return per_class[both].mean() if bool(both.any()) else torch.tensor(float("nan"), device=per_class.device)


def macro_auroc(probabilities: Tensor, target: Tensor) -> Tensor:
    """The macro one-vs-rest AUC of ``(N, K)`` probabilities against class ids, as ``auc`` computes it (module
    docstring): torchmetrics' exact per-class AUROC, averaged over the classes present with another."""
    from torchmetrics.functional.classification import multiclass_auroc

    with warnings.catch_warnings():  # about classes without positive rows, left out of the mean
        warnings.simplefilter("ignore")
        per_class = multiclass_auroc(probabilities.float(), target.long(), probabilities.shape[1], average="none",
                                     thresholds=None, validate_args=False)
    return mean_over_present_classes(per_class, target)


def macro_auc(probabilities: Tensor, target: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Macro one-vs-rest AUC of every group: ``(group ids, auc, defined)``, ids ascending; ``auc`` is ``nan`` where
    ``defined`` is false (fewer than two classes among the group's rows). Per class, the AUC is
    ``metrics.per_group_auc``'s (ties share their mean rank, as torchmetrics' exact AUROC counts them)."""
    from . import per_group_auc  # the binary per-group AUC, applied one class against the rest

    per_class = []
    ids = torch.unique(groups)
    for c in range(probabilities.shape[1]):
        _, _, auc, _ = per_group_auc(probabilities[:, c], (target == c).double(), groups)
        per_class.append(auc)
    if not per_class or ids.numel() == 0:
        return ids, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    aucs = torch.stack(per_class, dim=1)  # (groups, K), nan where a class has no positive or no negative
    defined = (~torch.isnan(aucs)).sum(1) > 0
    return ids, torch.nanmean(aucs, dim=1), defined


class ScenarioMulticlass(ScenarioRows):
    """Accuracy, macro AUC and log-loss of one multi-class task in every scenario, over the rows of every rank.

    ``update(preds, target, scenarios, groups=None, weight=None)`` as ``metrics.ScenarioAUC`` (``preds`` the
    ``(N, K)`` logits; ``groups`` are ignored: group AUC is a binary metric); the rows are gathered by
    ``metrics.scenario.ScenarioRows``. ``compute()`` returns
    ``{scenario id: {"accuracy": v, "auc": v, "logloss": v}}`` for every scenario seen, ``auc`` left out where
    the scenario's labels are of one class.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def check_preds(self, preds: Tensor, target: Tensor) -> Tensor:
        if preds.numel() == 0 and preds.dim() == 1:  # an empty rank's typed placeholder (evaluation._joined)
            preds = preds.reshape(0, self.num_classes)
        _check(preds, target, self.num_classes)
        return preds  # kept flat, (N * K,): the gathered states are flat

    def compute(self) -> dict[int, dict[str, Tensor]]:
        preds, target, scenarios, weights, _ = self.rows()
        logits = preds.reshape(-1, self.num_classes)
        classes = target.long()
        correct = (logits.argmax(dim=-1) == classes).double()
        losses = F.cross_entropy(logits, classes, reduction="none")
        # AUC on float32 probabilities, as MulticlassAUROCFromLogits ranks them
        ids, auc, defined = macro_auc(torch.softmax(logits.float(), dim=-1), target, scenarios)
        out: dict[int, dict[str, Tensor]] = {}
        for scenario, value, ok in zip(ids.tolist(), auc, defined.tolist()):
            rows = scenarios == scenario
            w = weights[rows]
            total = w.sum().clamp(min=torch.finfo(torch.float64).tiny)
            out[scenario] = {"accuracy": ((w * correct[rows]).sum() / total).float(),
                             "logloss": ((w * losses[rows]).sum() / total).float()}
            if ok:
                out[scenario]["auc"] = value.float()
        return out


def multiclass_metrics(num_classes: int) -> dict[str, Metric]:
    """A multi-class task's metrics, by the names they are logged under, and its :class:`ClassCounts`."""
    return {"accuracy": MulticlassAccuracyFromLogits(num_classes), "auc": MulticlassAUROCFromLogits(num_classes),
            "logloss": MulticlassLogLoss(num_classes)}


__all__ = ["ClassCounts", "MulticlassAccuracyFromLogits", "MulticlassLogLoss", "MulticlassAUROCFromLogits",
           "ScenarioMulticlass", "macro_auc", "macro_auroc", "mean_over_present_classes", "multiclass_metrics"]
