"""Evaluation of one split (validation or test): metric updates, the values to log, and the warnings.

``MultiTaskLightningModule`` holds one :class:`SplitEvaluation` per split
(``val``, ``test``), updates it in ``validation_step`` / ``test_step`` and logs
what :meth:`SplitEvaluation.compute` returns at the end of the epoch.

Logged: ``<stage>/<task>/auc``, ``logloss``, ``ne``, ``pcoc``, ``ece`` (binary),
``<stage>/<task>/mse``, ``mae``, ``xauc`` (regression; formulas in
``mtl_lightning.metrics.calibration`` and ``metrics.regression``), ``<stage>/<task>/accuracy``,
``auc`` (macro one-vs-rest), ``logloss`` (multiclass, ``metrics.multiclass``) and ``<stage>/loss``
(the ``Task.weight``-weighted sum of per-task log-loss/MSE over the whole epoch; a multi-class task's
log-loss is its cross-entropy),
``<stage>/<task>/gauc`` (binary, when the batches carry a ``group`` tensor: see
``metrics.GroupAUC``).

Per scenario (domain): ``<stage>/<task>/<metric>/domain=<id>`` for ``auc``,
``logloss``, ``ne``, ``pcoc`` and ``ece`` of every binary task and every scenario
id in the split (``metrics.ScenarioAUC``), and ``<stage>/<task>/gauc/domain=<id>`` when the batches also
carry a ``group``; ``accuracy``, ``auc`` and ``logloss`` of every multi-class task
(``metrics.multiclass.ScenarioMulticlass``); ``mse``, ``mae`` (weighted) and ``xauc`` (exact) of every
regression task (``metrics.regression.ScenarioRegression``). The scenario ids are the batch's
``scenario`` tensor (``ParquetDataModule(scenario=...)``, any architecture) or
else, for a multi-scenario architecture (``model.multi_scenario``), its domain
feature ``model.domain_feature``. The rows of every rank are gathered first
(``metrics.scenario.ScenarioRows``), so under DDP every rank logs the same scenarios and
values, uneven shards included. A scenario whose valid labels are of one class gets no AUC, one whose
regression labels are all equal no XAUC (warned once per task and split).

Sample weights (a batch's ``weights[task]``, ``Task(sample_weight=...)``) weigh
log-loss, NE, PCOC, ECE, MSE, MAE and accuracy as they weigh the training loss.

Multi-class tasks get no NE, PCOC, ECE, reliability diagram or group AUC: those
are defined on one probability per row (``metrics.multiclass``).

Funnel consistency (entire-space models: architectures that declare ``click_task``
and ``ctcvr_task`` outputs, ESMM, ESCM and DCMT, see :func:`funnel_outputs`):
``<stage>/<ctcvr>/exceeds_<ctr>``, the share of the split's rows (every row,
whatever its labels: the funnel holds on the entire space) whose predicted CTCVR
is above the predicted CTR, compared on the evaluated probabilities (after the
negative-sampling correction and any attached calibration). A click-then-buy
probability cannot exceed the click probability, so it is 0 for a consistent
model (ESMM's product construction guarantees it); a per-task calibration or a
model predicting both independently can break it. Counts are summed over every
rank.

Reliability. At the end of each split :meth:`SplitEvaluation.compute` keeps, for
every binary task with valid rows, the reliability table of the epoch (rows of
every rank; ``metrics.calibration.reliability_table``'s columns) in
``reliability_tables[task]``; :func:`log_reliability_figures` draws them
(``metrics.calibration.reliability_figure``) into a TensorBoard logger as the
images ``<stage>/<task>/reliability``.

Undefined metrics are skipped, never logged as numbers that look real (and
never NaN, so a ``ModelCheckpoint`` monitoring another key is not disturbed):
every metric of a task with no row with a valid label in the split (e.g. the
CVR task when every row is unclicked, its labels all ``ignore_label``), and
AUC/GAUC of a task whose valid labels are all of one class (GAUC also when no
group has both classes). ``<stage>/loss`` is the weighted sum over the tasks
that have valid rows (not logged when none has). Each case is warned about once
per task and split (the sanity check counts as a split of its own) for the
module's lifetime; validation, training and ``trainer.test`` go on with the
other metrics. The decision uses label counts summed over every rank, so under
DDP all ranks log the same keys. A key skipped in an epoch is also dropped
from ``trainer.callback_metrics``, where Lightning would otherwise keep an
earlier epoch's value (possible when the split changes between epochs): a
callback monitoring it finds it missing (a ``ModelCheckpoint`` then says so)
rather than a stale number. Monitor ``val/loss`` to be safe from this.

A metric that is defined but not finite (``inf`` or NaN: regression labels or
predictions so large that their squared error overflows float32, above about
1.8e19, or a model that diverged) is logged as it is and warned about once per
key and split, naming the task.
"""

from __future__ import annotations

import math
from typing import Callable, MutableMapping, Sequence

import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric

from .batch import Batch
from .losses import valid_mask
from .metrics import (
    COUNTS, Skipped, compute_task_metrics, flatten_metrics, group_auc_metrics, reliability_figure,
    scenario_auc_metrics, task_metrics,
)
from .tasks import Task

LOSS_METRIC = {"binary": "logloss", "multiclass": "logloss", "regression": "mse"}
"""The metric of each task kind that ``<stage>/loss`` sums (weighted by ``Task.weight``)."""
HEADLINE_METRIC = {"binary": "auc", "multiclass": "accuracy", "regression": "mse"}
"""The metric of each task kind the progress bar shows."""

ReduceSum = Callable[[Tensor], Tensor]
"""Sums a tensor over every rank (``trainer.strategy.reduce(t, reduce_op="sum")``); the identity in one process."""


def _reset(metric: nn.Module) -> None:
    """``metric.reset()`` outside inference mode: the fresh states are normal tensors, so a later ``fit`` (whose
    validation runs under ``no_grad``, not inference mode) can update them in place after ``trainer.validate``."""
    with torch.inference_mode(False):
        metric.reset()


def _no_reduce(value: Tensor) -> Tensor:
    return value


class SplitEvaluation(nn.Module):
    """The metrics of one evaluation split: per-task metrics, group AUC, per-scenario metrics (module docstring).

    Args:
        stage: the split's name, the prefix of every logged key (``"val"``, ``"test"``).
        tasks: the tasks evaluated.
        ignore_label: the label value that means "no label" (NaN always does).
        domain_feature: the feature holding the scenario ids of a multi-scenario
            architecture, used when a batch has no ``scenario`` tensor; ``None``
            for other architectures.
        bins: the number of equal-width probability bins of ``ece`` and the reliability tables.
        funnel: ``(click output, ctcvr output)`` whose funnel consistency is logged (see the module
            docstring), or ``None``.

    The metric states are not part of the module's ``state_dict``.
    """

    def __init__(self, stage: str, tasks: Sequence[Task], ignore_label: float | None = -1,
                 domain_feature: str | None = None, bins: int = 10, funnel: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.funnel = funnel  # (click output, ctcvr output), or None: see funnel_outputs
        self._funnel_counts = torch.zeros(2, dtype=torch.float64)  # rows with CTCVR > CTR, rows
        self.stage = stage
        self.tasks = tuple(tasks)
        self.ignore_label = ignore_label
        self.domain_feature = domain_feature
        self.task_metrics = task_metrics(self.tasks, bins)
        self.reliability_tables: dict[str, pd.DataFrame] = {}  # the last epoch's, per binary task
        self.group_auc = group_auc_metrics(self.tasks)
        self.scenario_auc = scenario_auc_metrics(self.tasks, bins)
        self._warned: set[tuple[str, str, str]] = set()  # (split, task or key, reason): warned for this lifetime

    def scenario_ids(self, batch: Batch) -> Tensor | None:
        """The batch's scenario ids: the data module's ``scenario`` tensor, else the domain feature's ids."""
        scenario = batch.get("scenario")
        if scenario is None and self.domain_feature is not None:
            scenario = batch["features"][self.domain_feature]
        return scenario

    def update(self, outputs: dict[str, Tensor], batch: Batch) -> None:
        """Add one batch: the model's ``outputs`` (logits / values per task) against the batch's labels."""
        group = batch.get("group")
        scenario = self.scenario_ids(batch)
        weights = batch.get("weights") or {}
        if self.funnel is not None:
            click, ctcvr = (outputs[name].detach().float() for name in self.funnel)
            # sigmoid is monotone: CTCVR's probability exceeds CTR's exactly where its logit does
            above = (ctcvr > click).sum().double()
            self._funnel_counts = self._funnel_counts.to(above.device) + torch.stack([above, above.new_tensor(click.numel())])
        for t in self.tasks:
            labels = task_labels(batch["labels"], t)
            mask = valid_mask(labels, self.ignore_label)
            weight = weights.get(t.name)
            self.task_metrics.task_metrics[t.name].update(outputs[t.name][mask].float(), labels[mask].float(),
                                                          weight=None if weight is None else weight[mask])
            if group is not None and t.name in self.group_auc:
                self.group_auc[t.name].update(outputs[t.name][mask], labels[mask], group[mask])
            if scenario is not None and t.name in self.scenario_auc:
                self.scenario_auc[t.name].update(outputs[t.name][mask], labels[mask], scenario[mask],
                                                 None if group is None else group[mask],
                                                 None if weight is None else weight[mask])

    def compute(self, reduce_sum: ReduceSum = _no_reduce, sanity_checking: bool = False,
                callback_metrics: MutableMapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The epoch's defined metrics as ``{key: value}``, warning about what is skipped; resets every metric.

        Every decision reads values computed from states synced over the ranks
        (``compute_task_metrics``' label counts, GAUC itself, ``reduce_sum``),
        so every rank returns the same keys and runs the same collectives.
        Keys skipped this epoch are removed from ``callback_metrics`` (the
        Trainer's) so no earlier epoch's value stays there.
        """
        stage = self.stage
        split = f"{stage} (sanity check)" if sanity_checking else stage
        computed, skipped = compute_task_metrics(self.task_metrics, self.tasks)
        logged = flatten_metrics(stage, computed)
        self.reliability_tables = {  # a collective per task, run by every rank (the decision reads synced counts)
            t.name: self.task_metrics.task_metrics[t.name]["ece"].reliability()
            for t in self.tasks if t.kind == "binary" and "ece" in computed[t.name]}
        device = self.task_metrics.task_metrics[self.tasks[0].name][COUNTS].rows.device
        empty = torch.zeros(0, device=device)
        for name, metric in self.group_auc.items():
            if not _joined(metric, reduce_sum, device, empty, empty, empty.long()):  # no rank saw a group column
                continue
            if name in skipped:  # no valid row, or one class: no group can have both classes
                skipped[name] = skipped[name]._replace(metrics=(*skipped[name].metrics, "gauc"))
            else:
                value = metric.compute()
                if torch.isnan(value):
                    skipped[name] = Skipped(("gauc",), "has no group (user) with both a positive and a "
                                            "negative label, so GAUC is undefined", False)
                else:
                    logged[f"{stage}/{name}/gauc"] = value
            _reset(metric)
        for name, metric in self.scenario_auc.items():
            if not _joined(metric, reduce_sum, device, empty, empty, empty.long()):  # no scenario ids on any rank
                continue
            one_class = []
            for scenario, values in metric.compute().items():
                logged.update({f"{stage}/{name}/{m}/domain={scenario}": value for m, value in values.items()})
                if metric.ranking_metric not in values:
                    one_class.append(scenario)
            _reset(metric)
            if one_class:
                self._warn_one_class_scenarios(split, name, one_class, metric.ranking_metric)
        if self.funnel is not None:  # every rank reduces, so every rank logs the same key
            above, rows = reduce_sum(self._funnel_counts.to(device)).tolist()
            self._funnel_counts = torch.zeros(2, dtype=torch.float64)
            if rows > 0:
                logged[f"{stage}/{self.funnel[1]}/exceeds_{self.funnel[0]}"] = torch.tensor(above / rows)
        terms = [t.weight * computed[t.name][LOSS_METRIC[t.kind]] for t in self.tasks
                 if LOSS_METRIC[t.kind] in computed[t.name]]
        if terms:
            logged[f"{stage}/loss"] = torch.as_tensor(sum(terms))
        for name, skip in skipped.items():
            self._warn_skipped(split, name, skip, loss_skipped=not terms)
        self._warn_non_finite(split, logged)
        if callback_metrics is not None:  # no stale value of an earlier epoch for callbacks to mistake for this one's
            stale = [f"{stage}/{name}/{m}" for name, skip in skipped.items() for m in skip.metrics]
            for key in stale + ([] if terms else [f"{stage}/loss"]):
                callback_metrics.pop(key, None)
            for key in [k for k in callback_metrics if "/domain=" in k and k.startswith(f"{stage}/")]:
                if key not in logged:  # a scenario absent (or undefined) this epoch
                    callback_metrics.pop(key)
        _reset(self.task_metrics)
        return logged

    # ---------------------------------------------------------------- warnings
    def _once(self, split: str, subject: str, reason: str) -> bool:
        """Whether this warning is new for this split (and records it)."""
        key = (split, subject, reason)
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def _warn_skipped(self, split: str, task: str, skip: Skipped, loss_skipped: bool) -> None:
        """One warning per task, split and reason for the module's lifetime (the sanity check counts apart)."""
        if not self._once(split, task, skip.reason):
            return
        stage = self.stage
        keys = ", ".join(f"{stage}/{task}/{m}" for m in skip.metrics)
        verb = "is" if len(skip.metrics) == 1 else "are"
        if skip.empty:
            detail = f"every label is ignore_label={self.ignore_label!r} or NaN"
            loss = (f"nor is {stage}/loss (no task has a valid row)" if loss_skipped
                    else f"and {stage}/loss sums the other tasks only")
            message = f"{split} split: task {task!r} {skip.reason} ({detail}); {keys} {verb} not logged, {loss}"
        else:
            message = f"{split} split: task {task!r} {skip.reason}; {keys} {verb} not logged"
        rank_zero_warn(message + ". Training and the other metrics go on (warned once per task and split).")

    def _warn_one_class_scenarios(self, split: str, task: str, scenarios: list[int], metric: str) -> None:
        """``metric`` (``auc``, or a regression task's ``xauc``) is undefined in ``scenarios``."""
        if not self._once(split, task, "one-class scenarios"):
            return
        keys = ", ".join(f"{self.stage}/{task}/{metric}/domain={s}" for s in scenarios[:5]) + (
            ", ..." if len(scenarios) > 5 else "")
        labels = "one label value" if metric == "xauc" else "labels of one class"
        rank_zero_warn(f"{split} split: task {task!r} has {labels} only in scenarios {scenarios[:20]}, "
                       f"so their {metric.upper()} is undefined and {keys} not logged; the other scenarios' are "
                       "(warned once per task and split).")

    def _warn_non_finite(self, split: str, logged: dict[str, Tensor]) -> None:
        """Warn once per key and split about a logged value that is inf or NaN, naming the task."""
        values = [torch.as_tensor(v).float().reshape(()) for v in logged.values()]
        if not values or bool(torch.stack([v.to(values[0].device) for v in values]).isfinite().all()):
            return  # the usual case: one check, one host sync
        tasks = {t.name: t for t in self.tasks}
        for key, value in logged.items():
            number = float(value)
            if math.isfinite(number) or not self._once(split, key, "non-finite"):
                continue
            task = key.split("/")[1]
            if task in tasks:
                owner = f"task {task!r} ({tasks[task].kind})"
                hint = ("its labels or predictions are so large that their squared error overflows float32 (above "
                        "about 1.8e19): scale the labels (e.g. log or standardise them)"
                        if tasks[task].kind == "regression" else "its predictions are not finite")
            else:
                owner = "the weighted sum over the tasks"
                hint = "some task's metric is not finite (see that task's keys)"
            rank_zero_warn(f"{split} split: {key} of {owner} is {number}: {hint}, or the model diverged (check "
                           "the learning rate). It is logged as it is (warned once per key and split).")


def funnel_outputs(model: nn.Module) -> tuple[str, str] | None:
    """``(click output, ctcvr output)`` of an entire-space architecture (one that declares ``click_task`` and
    ``ctcvr_task`` among its ``output_names``: ESMM, ESCM, DCMT), else ``None``."""
    names = getattr(model, "click_task", None), getattr(model, "ctcvr_task", None)
    outputs = getattr(model, "output_names", ())
    return names if all(isinstance(n, str) and n in outputs for n in names) else None  # type: ignore[return-value]


def task_labels(labels: dict[str, Tensor], task: Task) -> Tensor:
    """The labels of ``task`` in a batch's ``labels``; ``ValueError`` naming the task and the keys there are."""
    try:
        return labels[task.name]
    except KeyError:
        raise ValueError(f"the batch has no label for task {task.name!r}; it has {sorted(labels)}") from None


def _joined(metric: Metric, reduce_sum: ReduceSum, device: torch.device, *empty_args: Tensor) -> bool:
    """Whether any rank updated ``metric`` this epoch; a rank that did not (an empty shard, a split smaller than
    the world size) updates it with ``empty_args`` (typed empty states, so the gather matches the other ranks'
    dtypes) and then joins the collective of ``compute()`` that the other ranks run."""
    used = reduce_sum(torch.tensor(float(metric.update_called), device=device))
    if not used:
        return False
    if not metric.update_called:
        metric.update(*empty_args)
    return True


def log_reliability_figures(loggers: Sequence[object], evaluation: SplitEvaluation, step: int) -> list[str]:
    """Write ``evaluation.reliability_tables`` as images ``<stage>/<task>/reliability`` to every TensorBoard
    logger in ``loggers`` (other loggers are left alone); returns the tags written. Call it on rank 0 only."""
    from lightning.pytorch.loggers import TensorBoardLogger

    boards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    tags = []
    for task, table in evaluation.reliability_tables.items() if boards else ():
        tag = f"{evaluation.stage}/{task}/reliability"
        figure = reliability_figure(table, title=f"{tag} (step {step})")
        for logger in boards:
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        tags.append(tag)
    return tags


__all__ = ["SplitEvaluation", "task_labels", "log_reliability_figures", "funnel_outputs", "LOSS_METRIC",
           "HEADLINE_METRIC"]
