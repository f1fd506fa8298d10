"""Calibration metrics of binary tasks, kept as sums so they are exact under DDP.

Every metric here takes logits, 0/1 labels and optional per-row sample weights
``w_i >= 0`` (1 when not given), and keeps float64 sums whose states are summed
over the ranks (``dist_reduce_fx="sum"``): the value computed on 2 ranks with
uneven shards is the one-process value over all their rows. With ``p_i =
sigmoid(z_i)`` and ``W = sum_i w_i``:

* ``logloss = sum_i w_i BCE(y_i, p_i) / W`` (:class:`BinaryLogLoss`);
* ``ne = logloss / H(b)``, the normalised entropy (He et al., ADKDD 2014), where
  ``b = sum_i w_i y_i / W`` is the split's (weighted) base rate and
  ``H(b) = -b log b - (1 - b) log(1 - b)`` the log-loss of always predicting it:
  below 1 the model beats the base rate; undefined (not logged) when every
  valid label is of one class (``H(b) = 0``);
* ``pcoc = sum_i w_i p_i / sum_i w_i y_i``, predicted over observed positives:
  1.0 is calibrated on average, above 1 over-predicts; undefined without a positive;
* ``ece = sum_b (W_b / W) |mean_b(p) - mean_b(y)| = sum_b |sum_{i in b} w_i (p_i - y_i)| / W``
  over ``bins`` equal-width probability bins ``[k/bins, (k+1)/bins)`` (the last
  one closed at 1), the expected calibration error weighted by bin weight
  (bin count without sample weights).

:func:`reliability_table` returns, per bin, the rows, their weight, the mean
predicted probability and the observed positive rate: the numbers of a
reliability diagram (:func:`reliability_figure` draws one). The evaluation
keeps the last validation table of every binary task and writes the diagram to
TensorBoard (``mtl_lightning.evaluation``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

TABLE_COLUMNS = ("bin", "lower", "upper", "rows", "weight", "mean_predicted", "observed_rate")


def _weights(target: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return torch.ones_like(target, dtype=torch.float64)
    if weight.shape != target.shape:
        raise ValueError(f"sample weights of shape {tuple(weight.shape)} for labels of shape {tuple(target.shape)}")
    return weight.detach().double()


def binary_entropy(rate: Tensor) -> Tensor:
    """``H(b) = -b log b - (1 - b) log(1 - b)`` (natural log), 0 at ``b`` = 0 or 1."""
    return -(torch.xlogy(rate, rate) + torch.xlogy(1 - rate, 1 - rate))


class BinaryLogLoss(Metric):
    """(Weighted) mean binary cross-entropy computed from logits (exact for any logit, no clipping)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")  # sum of w

    def update(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        w = _weights(target, weight)
        loss = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        self.total += (w * loss).sum()
        self.count += w.sum()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=torch.finfo(torch.float64).tiny)).float()


class NormalizedEntropy(BinaryLogLoss):
    """``ne``: the (weighted) log-loss divided by the entropy of the split's (weighted) base rate; ``nan`` when
    that entropy is 0 (labels of one class)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("positive", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        super().update(logits, target, weight)
        self.positive += (_weights(target, weight) * target.double()).sum()

    def compute(self) -> Tensor:
        entropy = binary_entropy(self.positive / self.count)
        logloss = self.total / self.count
        return torch.where(entropy > 0, logloss / entropy, torch.full_like(entropy, float("nan"))).float()


class PCOC(Metric):
    """``pcoc``: (weighted) sum of predicted probabilities over (weighted) positives; ``nan`` without a positive."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("predicted", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("positive", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        w = _weights(target, weight)
        self.predicted += (w * torch.sigmoid(logits.double())).sum()
        self.positive += (w * target.double()).sum()

    def compute(self) -> Tensor:
        positive = self.positive
        return torch.where(positive > 0, self.predicted / positive, torch.full_like(positive, float("nan"))).float()


def bin_index(probabilities: Tensor, bins: int) -> Tensor:
    """The equal-width bin of each probability: ``floor(p * bins)``, with ``p = 1`` in the last bin."""
    return (probabilities * bins).floor().long().clamp(min=0, max=bins - 1)


class ExpectedCalibrationError(Metric):
    """``ece`` over ``bins`` equal-width bins (see the module docstring), from per-bin sums.

    :meth:`reliability` gives the per-bin table (synced over the ranks like ``compute``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"ExpectedCalibrationError: bins must be an integer >= 1, got {bins!r}")
        self.bins = bins
        for name in ("bin_weight", "bin_predicted", "bin_positive"):
            self.add_state(name, default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_rows", default=torch.zeros(bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        w = _weights(target, weight)
        p = torch.sigmoid(logits.detach().double())
        index = bin_index(p, self.bins)
        self.bin_weight.index_add_(0, index, w)
        self.bin_predicted.index_add_(0, index, w * p)
        self.bin_positive.index_add_(0, index, w * target.double())
        self.bin_rows.index_add_(0, index, torch.ones_like(index))

    def compute(self) -> Tensor:
        total = self.bin_weight.sum()
        return ((self.bin_predicted - self.bin_positive).abs().sum() / total).float()

    def reliability(self) -> pd.DataFrame:
        """The reliability table of every row seen (all ranks: a collective under DDP, like ``compute``)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            return _table(self.bins, self.bin_rows, self.bin_weight, self.bin_predicted, self.bin_positive)


def _table(bins: int, rows: Tensor, weight: Tensor, predicted: Tensor, positive: Tensor) -> pd.DataFrame:
    rows, weight, predicted, positive = (t.detach().cpu().numpy() for t in (rows, weight, predicted, positive))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(weight > 0, predicted / weight, np.nan)
        observed = np.where(weight > 0, positive / weight, np.nan)
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    return pd.DataFrame({"bin": np.arange(bins), "lower": edges[:-1], "upper": edges[1:], "rows": rows.astype(np.int64),
                         "weight": weight, "mean_predicted": mean_predicted, "observed_rate": observed},
                        columns=list(TABLE_COLUMNS))


def reliability_table(probabilities: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                      weights: Tensor | np.ndarray | None = None, bins: int = 10) -> pd.DataFrame:
    """Per equal-width probability bin: ``bin``, ``lower``, ``upper``, ``rows``, ``weight`` (sum of sample
    weights, ``rows`` without them), ``mean_predicted`` and ``observed_rate`` (weighted means; NaN for an empty bin).

    ``probabilities`` in [0, 1] and 0/1 ``labels`` (and ``weights``), all of one length. This is what
    ``ExpectedCalibrationError.reliability()`` returns for the same rows; ``ece`` is
    ``sum(|mean_predicted - observed_rate| * weight) / sum(weight)`` over the non-empty bins.
    """
    p = torch.as_tensor(np.asarray(probabilities), dtype=torch.float64).flatten()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64).flatten()
    if p.shape != y.shape:
        raise ValueError(f"reliability_table: {p.numel()} probabilities for {y.numel()} labels")
    if p.numel() and (p.min() < 0 or p.max() > 1 or torch.isnan(p).any()):
        raise ValueError("reliability_table: probabilities must lie in [0, 1] (give sigmoid(logits), not logits)")
    w = _weights(y, None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64).flatten())
    metric = ExpectedCalibrationError(bins=bins)
    metric.update(torch.logit(p), y, w)  # logit(p) then sigmoid gives p back (float64, p = 0 or 1 exactly too)
    return _table(bins, metric.bin_rows, metric.bin_weight, metric.bin_predicted, metric.bin_positive)


def calibration_values(logits: Tensor, target: Tensor, weight: Tensor | None = None,
                       bins: int = 10) -> dict[str, Tensor]:
    """``{"logloss", "ne", "pcoc", "ece"}`` of one set of rows, each as the metric class computes it; NE and PCOC
    are left out where undefined (see the module docstring), everything without a row."""
    if target.numel() == 0:
        return {}
    values = {}
    for name, metric in (("logloss", BinaryLogLoss()), ("ne", NormalizedEntropy()), ("pcoc", PCOC()),
                         ("ece", ExpectedCalibrationError(bins))):
        metric = metric.to(logits.device)
        metric.update(logits, target, weight)
        value = metric.compute()
        if not torch.isnan(value):
            values[name] = value
    return values


def reliability_figure(table: pd.DataFrame, title: str = "") -> Any:
    """A matplotlib figure of a reliability table: observed rate against mean predicted probability per
    non-empty bin (the diagonal is perfect calibration) above a bar chart of the rows per bin."""
    from matplotlib.figure import Figure  # no pyplot and no backend switch: a notebook keeps its inline plots

    figure = Figure(figsize=(4.2, 5.0), dpi=100)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = table[table["rows"] > 0]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    top.plot(filled["mean_predicted"], filled["observed_rate"], marker="o", color="C0", label="model")
    top.set_ylabel("observed positive rate")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    if title:
        top.set_title(title, fontsize=10)
    bottom.bar(table["lower"], table["rows"], width=table["upper"] - table["lower"], align="edge", color="C1",
               edgecolor="white")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("rows")
    figure.tight_layout()
    return figure


__all__ = ["calibration_values", "BinaryLogLoss", "NormalizedEntropy", "PCOC", "ExpectedCalibrationError", "binary_entropy", "bin_index",
           "reliability_table", "reliability_figure", "TABLE_COLUMNS"]
