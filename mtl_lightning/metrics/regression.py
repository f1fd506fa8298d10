"""Regression metrics: (weighted) MSE / MAE from sums, and XAUC computed exactly.

``mse = sum_i w_i (v_i - y_i)^2 / sum_i w_i`` and ``mae = sum_i w_i |v_i - y_i| / sum_i w_i``
(``w_i = 1`` without sample weights); the sums are reduced over the ranks.

XAUC (the pairwise ordering accuracy used for watch time, e.g. Zhan et al.,
"Deconfounding Duration Bias in Watch-time Prediction", KDD 2022) over the
pairs of rows whose labels differ::

    XAUC = (#{(i, j): y_i < y_j, v_i < v_j} + 0.5 #{(i, j): y_i < y_j, v_i = v_j}) / #{(i, j): y_i < y_j}

with ``v`` the predictions. It is computed **exactly** (no sampling) in
``O(n log^2 n)`` by :func:`xauc` on the rows of every rank (gathered before
``compute``, as AUC's are). Undefined (not logged) when every label is equal.
Sample weights do not enter XAUC.

Per scenario (domain), :class:`ScenarioRegression` computes the three over the rows of each scenario id, from
the rows of every rank (gathered by ``metrics.scenario.ScenarioRows``), each value by the same formula as the
whole split's (weighted MSE/MAE, exact XAUC), so with one scenario they agree.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from .scenario import ScenarioRows


def _errors(preds: Tensor, target: Tensor, power: int) -> Tensor:
    """``|v_i - y_i|^power`` per row, in float64."""
    return (preds.detach().double() - target.double()).abs() ** power


def _ratio(total: Tensor, weight: Tensor) -> Tensor:
    """``total / weight`` as float32 (0 where ``weight`` is 0)."""
    return (total / weight.clamp(min=torch.finfo(torch.float64).tiny)).float()


class WeightedMeanError(Metric):
    """``sum_i w_i |v_i - y_i|^power / sum_i w_i`` (``power`` 2: MSE, 1: MAE), from float64 sums."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, power: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.power = power
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        w = torch.ones_like(target, dtype=torch.float64) if weight is None else weight.detach().double()
        self.total += (w * _errors(preds, target, self.power)).sum()
        self.weight += w.sum()

    def compute(self) -> Tensor:
        return _ratio(self.total, self.weight)


def _dense_rank(values: np.ndarray) -> np.ndarray:
    return np.unique(values, return_inverse=True)[1].astype(np.int64)


def _pairs_increasing(sequence: np.ndarray, strict: bool) -> int:
    """``#{i < j: a_i < a_j}`` (``strict``) or ``#{i < j: a_i <= a_j}`` for integer ranks ``a`` in ``[0, n)``.

    Bottom-up merge counting: at the level of width ``w`` every pair ``i < j`` lying in the two halves of one
    block of ``2w`` positions is counted once, by binary search of ``a_j`` in the sorted left half (a key
    ``block * (n + 1) + a`` keeps the blocks apart in one sorted array).
    """
    n = sequence.size
    positions = np.arange(n, dtype=np.int64)
    total, width = 0, 1
    side = "left" if strict else "right"
    while width < n:
        block = positions // (2 * width)
        left = (positions % (2 * width)) < width
        keys = block * (n + 1) + sequence
        left_keys = np.sort(keys[left])
        right_block = block[~left]
        total += int((np.searchsorted(left_keys, keys[~left], side) - np.searchsorted(left_keys, right_block * (n + 1),
                                                                                     "left")).sum())
        width *= 2
    return total


def xauc(preds: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
    """Exact XAUC (see the module docstring); ``nan`` when no two labels differ."""
    v = np.asarray(preds.detach().cpu() if isinstance(preds, Tensor) else preds, dtype=np.float64).ravel()
    y = np.asarray(target.detach().cpu() if isinstance(target, Tensor) else target, dtype=np.float64).ravel()
    if v.shape != y.shape:
        raise ValueError(f"xauc: {v.size} predictions for {y.size} labels")
    n = v.size
    if n < 2:
        return float("nan")
    rank_y, rank_v = _dense_rank(y), _dense_rank(v)
    # by label ascending, and within equal labels by prediction descending: then i < j with rank_v_i < rank_v_j
    # never pairs two equal labels
    order = np.lexsort((-rank_v, rank_y))
    sequence = rank_v[order]
    less = _pairs_increasing(sequence, strict=True)  # y_i < y_j and v_i < v_j
    less_or_equal = _pairs_increasing(sequence, strict=False)
    both_equal = _pairs_within(rank_y * (n + 1) + rank_v)  # i < j with v_i = v_j and y_i = y_j, counted in <=
    tied_predictions = less_or_equal - less - both_equal  # y_i < y_j and v_i = v_j
    pairs = n * (n - 1) // 2 - _pairs_within(rank_y)
    if pairs == 0:
        return float("nan")
    return (less + 0.5 * tied_predictions) / pairs


def _pairs_within(keys: np.ndarray) -> int:
    """Pairs of rows with equal keys: ``sum_k C(m_k, 2)``."""
    counts = np.unique(keys, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


class XAUC(Metric):
    """Exact XAUC over every row seen (the rows of all ranks are gathered before ``compute``)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.preds.append(preds.detach().double().flatten())
        self.target.append(target.detach().double().flatten())

    def compute(self) -> Tensor:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731  (a list before sync, a tensor after)
        preds, target = cat(self.preds), cat(self.target)
        return torch.tensor(xauc(preds, target), dtype=torch.float32, device=preds.device)


class ScenarioRegression(ScenarioRows):
    """MSE, MAE and XAUC of one regression task in every scenario (domain), over the rows of every rank.

    ``update(preds, target, scenarios, groups=None, weight=None)`` as ``metrics.ScenarioAUC`` (``preds`` the
    predicted values; ``groups`` are ignored). ``compute()`` returns ``{scenario id: {"mse": v, "mae": v,
    "xauc": v}}`` for every scenario seen: ``mse`` and ``mae`` weighted by the sample weights as
    :class:`WeightedMeanError`, ``xauc`` exact (:func:`xauc`, unweighted) and left out where every label of the
    scenario is equal.
    """

    higher_is_better = False
    ranking_metric = "xauc"

    def compute(self) -> dict[int, dict[str, Tensor]]:
        preds, target, scenarios, weights, _ = self.rows()
        ids, index = torch.unique(scenarios, return_inverse=True)  # ids ascending
        totals = {name: torch.zeros(ids.numel(), dtype=torch.float64, device=preds.device).index_add_(0, index, values)
                  for name, values in (("weight", weights), ("mse", weights * _errors(preds, target, 2)),
                                       ("mae", weights * _errors(preds, target, 1)))}
        out: dict[int, dict[str, Tensor]] = {}
        values, labels, scenario_of_row = preds.cpu().numpy(), target.cpu().numpy(), index.cpu().numpy()  # for xauc
        for position, scenario in enumerate(ids.tolist()):
            out[scenario] = {name: _ratio(totals[name][position], totals["weight"][position]) for name in ("mse", "mae")}
            rows = scenario_of_row == position
            value = xauc(values[rows], labels[rows])
            if not math.isnan(value):
                out[scenario]["xauc"] = torch.tensor(value, dtype=torch.float32, device=preds.device)
        return out


__all__ = ["WeightedMeanError", "XAUC", "ScenarioRegression", "xauc"]
