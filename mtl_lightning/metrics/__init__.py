"""Per-task metrics built on torchmetrics.

Binary tasks: AUROC, log-loss, NE, PCOC and ECE (``metrics.calibration``, which
also has the reliability table); regression tasks: MSE, MAE and XAUC
(``metrics.regression``); multi-class tasks: accuracy, macro one-vs-rest AUC and
log-loss (``metrics.multiclass``, also per scenario; no NE, PCOC, ECE or group
AUC). Every metric takes the model's raw output (logits for binary and
multi-class tasks), so log-loss is computed stably from logits. Rows whose label is
ignored are filtered out before ``update``; per-row sample weights weigh
log-loss, NE, PCOC, ECE, MSE, MAE and accuracy (never AUC, GAUC or XAUC).

Undefined values are skipped, not reported as numbers: :func:`compute_task_metrics`
leaves out every metric of a task that had no row with a valid label in the
split (AUROC would crash, the means would be 0/0), and AUC of a binary task
whose valid labels are all of one class (AUROC would return 0.0; NE divides
by the base rate's entropy, 0 there; PCOC by the positives, when they are 0), AUC of a
multi-class task whose valid labels hold fewer than two classes, and XAUC of a
regression task whose valid labels are all equal. The decision
is made on :class:`LabelCounts`, whose ``compute`` returns the counts summed over
every rank (``dist_reduce_fx="sum"``), so under DDP every rank skips the same
metrics and calls the same collectives.

Group AUC (``GroupAUC``, logged as ``<stage>/<task>/gauc`` for binary tasks
when the batches carry a ``group`` column) is the impression-weighted mean of
per-group AUC: ``GAUC = sum_u n_u AUC_u / sum_u n_u`` over the groups
(users) ``u`` that have both a positive and a negative row, with ``n_u`` the
group's number of rows; groups with a single class are skipped.

Per-scenario AUC, GAUC, log-loss, NE, PCOC and ECE (``ScenarioAUC``, logged as
``<stage>/<task>/auc/domain=<id>``, ``<stage>/<task>/pcoc/domain=<id>`` ... for
binary tasks) are the same metrics over the rows of one scenario (domain)
``id``: the scenario ids come from a multi-scenario architecture's domain
feature or from the data module's ``scenario=`` column. Regression tasks get MSE, MAE and XAUC per scenario
(``ScenarioRegression``, ``<stage>/<task>/mse/domain=<id>`` ...), multi-class tasks accuracy, AUC and log-loss
(``ScenarioMulticlass``); all three keep the rows with their scenario ids (``metrics.scenario.ScenarioRows``),
gathered over the ranks before ``compute``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchmetrics.wrappers import MultitaskWrapper

from ..tasks import Task
from .calibration import (
    PCOC, BinaryLogLoss, ExpectedCalibrationError, NormalizedEntropy, calibration_values, reliability_figure,
    reliability_table,
)
from .multiclass import ClassCounts, ScenarioMulticlass, multiclass_metrics
from .regression import XAUC, ScenarioRegression, WeightedMeanError, xauc
from .scenario import ScenarioRows


class LabelCounts(Metric):
    """Rows seen and, of them, positive labels (``target.long() == 1``, as AUROC reads them).

    ``compute`` returns ``tensor([rows, positives])`` (int64), summed over every
    rank under DDP. It is part of every task's collection in
    :func:`task_metrics` under the key :data:`COUNTS`; :func:`compute_task_metrics`
    reads it to decide which metrics are defined and never returns it.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("rows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("positives", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.rows += target.numel()
        self.positives += (target.long() == 1).sum()

    def compute(self) -> Tensor:
        return torch.stack([self.rows, self.positives])


COUNTS = "_counts"
"""The key of :class:`LabelCounts` in each task's ``MetricCollection``."""


class BinaryAUROCFromLogits(BinaryAUROC):
    """``BinaryAUROC`` fed with logits: they are turned into probabilities before every update.

    (torchmetrics applies a sigmoid only when a batch has values outside [0, 1],
    a per-batch decision that would mix scales across batches.)
    """

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(torch.sigmoid(preds.float()), target.long())


def per_group_auc(preds: Tensor, target: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AUC of every group: ``(group ids, rows, auc, defined)``, one entry per distinct group, ids ascending.

    ``auc`` is ``nan`` where ``defined`` is false (a group whose labels are of
    one class). Within a group, AUC is the Mann-Whitney statistic
    ``(R_+ - P(P+1)/2) / (P N)`` with ``R_+`` the sum of the positives' ranks,
    tied scores sharing their mean rank. Inputs as in :func:`group_auc`.
    """
    if not (preds.shape == target.shape == groups.shape) or preds.dim() != 1:
        raise ValueError(f"group_auc needs three (N,) tensors, got {tuple(preds.shape)}, {tuple(target.shape)}, "
                         f"{tuple(groups.shape)}")
    n = preds.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=preds.device)
        return groups.long(), empty, empty, empty.bool()
    preds, target, groups = preds.double(), target.double(), groups.long()
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # sorted by (group, score)
    g, p, y = groups[order], preds[order], target[order]
    position = torch.arange(n, device=preds.device)
    new_group = torch.ones(n, dtype=torch.bool, device=preds.device)
    new_group[1:] = g[1:] != g[:-1]
    new_block = new_group.clone()  # a block = equal scores within one group
    new_block[1:] |= p[1:] != p[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1
    block_id = torch.cumsum(new_block.long(), 0) - 1
    group_start = position[new_group][group_id]
    block_start = position[new_block]
    block_end = torch.cat([block_start[1:], block_start.new_tensor([n])]) - 1
    rank = (block_start[block_id] + block_end[block_id]).double() / 2 - group_start + 1  # 1-based, ties averaged
    num_groups = int(group_id[-1]) + 1
    size = torch.zeros(num_groups, dtype=torch.float64, device=preds.device).index_add_(0, group_id, torch.ones_like(y))
    positives = torch.zeros_like(size).index_add_(0, group_id, y)
    rank_sum = torch.zeros_like(size).index_add_(0, group_id, rank * y)
    negatives = size - positives
    both = (positives > 0) & (negatives > 0)
    auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return g[new_group], size, torch.where(both, auc, torch.full_like(auc, float("nan"))), both


def group_auc(preds: Tensor, target: Tensor, groups: Tensor) -> Tensor:
    """Impression-weighted mean of per-group AUC (see the module docstring); ``nan`` when no group has both classes.

    ``preds`` are scores (logits or probabilities: AUC only uses their order),
    ``target`` is 0/1 and ``groups`` integer group ids, all ``(N,)``; the
    per-group AUC is :func:`per_group_auc`'s.
    """
    _, size, auc, both = per_group_auc(preds, target, groups)
    if not both.any():
        return torch.tensor(float("nan"), dtype=torch.float64, device=preds.device)
    return (size[both] * auc[both]).sum() / size[both].sum()


class GroupAUC(Metric):
    """Group AUC over every row seen (all ranks under DDP: the states are gathered before ``compute``)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        self.preds.append(preds.detach().double().flatten())
        self.target.append(target.detach().double().flatten())
        self.groups.append(groups.detach().long().flatten())

    def compute(self) -> Tensor:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731  (a list before sync, a tensor after)
        return group_auc(cat(self.preds), cat(self.target), cat(self.groups)).float()


class ScenarioAUC(ScenarioRows):
    """AUC, group AUC and calibration of one binary task in every scenario (domain), over every row seen on every rank.

    ``update(preds, target, scenarios, groups=None, weight=None)`` takes logits, 0/1 labels,
    integer scenario ids and, optionally, group (user) ids and sample weights, all ``(N,)``. The
    rows are kept (``metrics.scenario.ScenarioRows``: gathered over the ranks before ``compute``, like
    :class:`GroupAUC`), so every rank computes the same numbers for the same
    scenarios. ``compute()`` returns ``{scenario id: {"auc": v, "gauc": v, "logloss": v, "ne": v, "pcoc": v,
    "ece": v}}`` for every scenario seen; ``auc`` and ``ne`` are left out where the scenario's labels
    are of one class, ``pcoc`` where it has no positive, ``gauc`` where no group of the scenario has both classes
    or where some batch came without groups. The calibration values are ``metrics.calibration.calibration_values``
    of the scenario's rows (``bins`` equal-width bins for ``ece``).
    """

    higher_is_better = True
    keeps_groups = True

    def __init__(self, bins: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins = bins

    def compute(self) -> dict[int, dict[str, Tensor]]:
        preds, target, scenarios, weights, groups = self.rows()
        # AUC on float32 probabilities, exactly what ``auc`` ranks (BinaryAUROCFromLogits), so one scenario's AUC is
        # the split's; GAUC on the logits, as GroupAUC
        ids, _, auc, defined = per_group_auc(torch.sigmoid(preds.float()), target, scenarios)
        with_groups = groups.numel() == preds.numel()
        out: dict[int, dict[str, Tensor]] = {}
        for scenario, value, ok in zip(ids.tolist(), auc, defined.tolist()):
            out[scenario] = {"auc": value.float()} if ok else {}
            rows = scenarios == scenario
            out[scenario].update(calibration_values(preds[rows], target[rows], weights[rows], self.bins))
            if with_groups:
                gauc = group_auc(preds[rows], target[rows], groups[rows])
                if not torch.isnan(gauc):
                    out[scenario]["gauc"] = gauc.float()
        return out


def scenario_auc_metrics(tasks: Sequence[Task], bins: int = 10) -> torch.nn.ModuleDict:
    """The per-scenario metrics of every task: a ``ScenarioAUC`` per binary task, a
    ``metrics.multiclass.ScenarioMulticlass`` per multi-class task, a ``metrics.regression.ScenarioRegression``
    per regression task."""
    def metric(task: Task) -> ScenarioRows:
        if task.kind == "binary":
            return ScenarioAUC(bins)
        return ScenarioMulticlass(task.output_dim) if task.kind == "multiclass" else ScenarioRegression()

    return torch.nn.ModuleDict({t.name: metric(t) for t in tasks})


def group_auc_metrics(tasks: Sequence[Task]) -> torch.nn.ModuleDict:
    """One ``GroupAUC`` per binary task."""
    return torch.nn.ModuleDict({t.name: GroupAUC() for t in tasks if t.kind == "binary"})


def task_metrics(tasks: Sequence[Task], bins: int = 10) -> MultitaskWrapper:
    """``MultitaskWrapper`` with, per task, ``auc``/``logloss``/``ne``/``pcoc``/``ece`` (binary, ``ece`` over
    ``bins`` equal-width bins), ``mse``/``mae``/``xauc`` (regression) or ``accuracy``/``auc``/``logloss``
    (multiclass, ``metrics.multiclass``).

    Each task's collection also holds a :class:`LabelCounts` (multiclass: ``ClassCounts``) under :data:`COUNTS`;
    compute with :func:`compute_task_metrics`, which skips undefined metrics.
    ``update(preds, target, weight=w)`` passes per-row sample weights to the
    metrics that take them (all but ``auc`` and ``xauc``).
    """
    collections = {}
    for task in tasks:
        if task.kind == "binary":
            metrics = {"auc": BinaryAUROCFromLogits(validate_args=False), "logloss": BinaryLogLoss(),
                       "ne": NormalizedEntropy(), "pcoc": PCOC(), "ece": ExpectedCalibrationError(bins)}
        elif task.kind == "multiclass":
            metrics = multiclass_metrics(task.output_dim)
        else:
            metrics = {"mse": WeightedMeanError(2), "mae": WeightedMeanError(1), "xauc": XAUC()}
        metrics[COUNTS] = ClassCounts(task.output_dim) if task.kind == "multiclass" else LabelCounts()
        collections[task.name] = MetricCollection(metrics, compute_groups=False)
    return MultitaskWrapper(collections)


class Skipped(NamedTuple):
    """Metrics of one task left out by :func:`compute_task_metrics`, and why (a phrase for a warning)."""

    metrics: tuple[str, ...]
    reason: str
    empty: bool  # True when the task had no row with a valid label


def compute_task_metrics(
    metrics: MultitaskWrapper, tasks: Sequence[Task]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Skipped]]:
    """Compute the defined metrics of every task: ``({task: {metric: value}}, {task: Skipped})``.

    A task with no valid row gets ``{}`` and all its metrics in ``Skipped``; a
    binary task whose valid labels are all 0 or all 1 gets no ``auc``, nor does a multi-class task whose valid
    labels are of one class (``ClassCounts`` counts classes where ``LabelCounts`` counts positives). Every
    metric computed is synced over ranks by torchmetrics, and the decision uses
    the synced :class:`LabelCounts`, so all ranks compute the same metrics.
    Does not reset the metrics.
    """
    computed: dict[str, dict[str, Tensor]] = {}
    skipped: dict[str, Skipped] = {}
    for task in tasks:
        collection = metrics.task_metrics[task.name]
        rows, positives = (int(v) for v in collection[COUNTS].compute())
        names = [name for name in collection.keys(keep_base=True) if name != COUNTS]
        if rows == 0:
            skipped[task.name] = Skipped(tuple(names), "has no row with a valid label", True)
        elif task.kind == "binary" and positives in (0, rows):
            undefined = ("auc", "ne") if positives else ("auc", "ne", "pcoc")
            skipped[task.name] = Skipped(
                undefined, f"has labels of one class only (all {rows} valid labels are {int(positives > 0)}), "
                f"so {', '.join(m.upper() for m in undefined)} {'is' if len(undefined) == 1 else 'are'} undefined",
                False)
        elif task.kind == "multiclass" and positives < 2:  # ClassCounts: (rows, distinct classes)
            skipped[task.name] = Skipped(("auc",), f"has labels of one class only (all {rows} valid labels), so its "
                                         "one-vs-rest AUC is undefined", False)
        left_out = skipped[task.name].metrics if task.name in skipped else ()
        computed[task.name] = {name: collection[name].compute() for name in names if name not in left_out}
        # values synced over the ranks, so every rank drops the same: XAUC of equal labels, NE/PCOC whose
        # weighted base rate is 0 or 1 (sample weights 0 on every row of one class)
        undefined = tuple(name for name in ("xauc", "ne", "pcoc") if name in computed[task.name]
                          and torch.isnan(computed[task.name][name]))
        if undefined and task.name not in skipped:
            for name in undefined:
                del computed[task.name][name]
            reason = ("has one label value on every valid row, so XAUC is undefined" if task.kind == "regression"
                      else "has sample weights 0 on every row of one class, so NE/PCOC are undefined")
            skipped[task.name] = Skipped(undefined, reason, False)
    return computed, skipped


def flatten_metrics(stage: str, computed: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{task: {metric: v}}`` -> ``{"<stage>/<task>/<metric>": v}``."""
    return {f"{stage}/{task}/{name}": value for task, values in computed.items() for name, value in values.items()}


__all__ = [
    "COUNTS", "LabelCounts", "Skipped", "BinaryAUROCFromLogits", "BinaryLogLoss", "NormalizedEntropy", "PCOC",
    "ExpectedCalibrationError", "WeightedMeanError", "XAUC", "xauc", "reliability_table", "reliability_figure",
    "calibration_values", "GroupAUC", "ScenarioAUC", "group_auc", "per_group_auc", "group_auc_metrics", "scenario_auc_metrics",
    "task_metrics", "compute_task_metrics", "flatten_metrics", "ClassCounts", "ScenarioMulticlass",
    "ScenarioRegression", "ScenarioRows",
]
