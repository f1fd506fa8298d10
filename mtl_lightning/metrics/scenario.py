"""The rows of one task kept with their scenario ids and gathered over the ranks: the base of per-scenario metrics.

:class:`ScenarioRows` keeps, per ``update(preds, target, scenarios, groups=None, weight=None)``, the rows'
predictions, labels, integer scenario (domain) ids, sample weights (1 when not given) and, for a metric that
reads them (``keeps_groups``), group ids. Its states are lists concatenated over the ranks before ``compute``
(``dist_reduce_fx="cat"``), so a subclass computes from :meth:`ScenarioRows.rows` the values one process would
over every rank's rows, uneven shards included, and every rank returns the same scenarios and values.

The per-scenario metrics built on it: ``metrics.ScenarioAUC`` (binary tasks), ``metrics.multiclass.
ScenarioMulticlass`` and ``metrics.regression.ScenarioRegression``. Each ``compute()`` returns
``{scenario id: {metric: value}}`` and names in ``ranking_metric`` the metric it leaves out of a scenario whose
labels cannot be ordered (one class, or one label value), which the evaluation warns about.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from .calibration import _weights


class Rows(NamedTuple):
    """The gathered rows of a :class:`ScenarioRows`: all ``(N,)`` (float64, ``scenarios`` and ``groups`` int64);
    ``preds`` flat (a multi-class task's ``(N * K,)``); ``groups`` empty unless every update had groups."""

    preds: Tensor
    target: Tensor
    scenarios: Tensor
    weights: Tensor
    groups: Tensor


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A list state before the sync, one tensor after it."""
    return torch.cat(state) if isinstance(state, list) else state


class ScenarioRows(Metric):
    """Rows with their scenario ids, gathered over the ranks; subclasses implement ``compute`` (module docstring)."""

    is_differentiable = False
    full_state_update = False
    keeps_groups = False
    """Whether the group ids of the rows are kept (group AUC per scenario)."""
    ranking_metric = "auc"
    """The metric left out of a scenario whose labels cannot be ordered."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("preds", "target", "scenarios", "weights") + (("groups",) if self.keeps_groups else ()):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def check_preds(self, preds: Tensor, target: Tensor) -> Tensor:
        """The predictions to keep for ``target``'s rows (``ValueError`` when their shape does not fit)."""
        if preds.shape != target.shape:
            raise ValueError(f"{type(self).__name__} needs (N,) preds, target, scenarios (and groups), got "
                             f"{tuple(preds.shape)}, {tuple(target.shape)}")
        return preds

    def update(self, preds: Tensor, target: Tensor, scenarios: Tensor, groups: Tensor | None = None,
               weight: Tensor | None = None) -> None:
        preds = self.check_preds(preds, target)
        for what, values in (("scenarios", scenarios), ("groups", groups)):
            if values is not None and values.shape != target.shape:
                raise ValueError(f"{type(self).__name__} needs (N,) preds, target, scenarios (and groups): {what} of "
                                 f"shape {tuple(values.shape)} for labels of shape {tuple(target.shape)}")
        if scenarios.is_floating_point():
            raise ValueError(f"{type(self).__name__} needs integer scenario ids, got {scenarios.dtype}")
        self.preds.append(preds.detach().double().flatten())
        self.target.append(target.detach().double().flatten())
        self.scenarios.append(scenarios.detach().long().flatten())
        self.weights.append(_weights(target, weight).flatten())  # 1 without weights; refuses another shape
        if self.keeps_groups:
            # without groups an empty tensor, so the gathered groups are shorter than the rows (see Rows)
            self.groups.append(scenarios.new_zeros(0, dtype=torch.long) if groups is None
                               else groups.detach().long().flatten())

    def rows(self) -> Rows:
        """Every row seen (on every rank, once synced), in one tensor per column."""
        preds, target, scenarios, weights = (_cat(x) for x in (self.preds, self.target, self.scenarios, self.weights))
        groups = _cat(self.groups) if self.keeps_groups else scenarios.new_zeros(0)
        return Rows(preds, target, scenarios, weights, groups)


__all__ = ["Rows", "ScenarioRows"]
