"""The per-row losses a ``Task(loss=...)`` can name, as pure functions, and the one map from a task's kind and loss
name to its function.

Every function takes the prediction (a logit for binary tasks, the value for regression tasks, ``(B, K)`` logits for
multi-class tasks), the target with the ignored rows already replaced by 0, the mask of valid rows and the rows'
group (session) ids or ``None``, plus the task's ``loss_options``, and returns one loss per row (``(B,)``);
``masked_loss`` averages them over the valid rows.

Binary tasks (``z`` the logit, ``p = sigmoid(z)``, ``y`` the label):

* ``"bce"`` (default): ``-[y log p + (1 - y) log(1 - p)]``, from the logit.
* ``"focal"`` (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
  ``FL = -alpha_t (1 - p_t)^gamma log p_t`` with ``p_t = p`` for a positive and ``1 - p`` for a negative,
  ``alpha_t = alpha`` for a positive and ``1 - alpha`` for a negative. Options ``gamma`` (>= 0, default 2) and
  ``alpha`` (in [0, 1], or ``None`` for ``alpha_t = 1``; default 0.25, the paper's). Computed as
  ``alpha_t * m^gamma * BCE(z, y)`` with ``-log p_t = BCE(z, y)`` from the logit and
  ``m = 1 - p_t = y sigmoid(-z) + (1 - y) sigmoid(z)``, so no probability is rounded to 0 or 1 before a log.
  With soft targets (label smoothing) the same expression is used with ``y`` the smoothed target.
* ``"jrc"`` (Sheng et al., "Joint Optimization of Ranking and Calibration with Contextualized Hybrid Model",
  KDD 2023): see :func:`jrc_loss`. Options ``alpha`` (weight of the calibration term, in [0, 1], default 0.5) and
  ``session`` (``"group"``, default: the sessions are the batch's ``group`` ids, the column of group AUC; ``"batch"``:
  the whole batch is one session).

``label_smoothing=eps`` (option of ``bce`` and ``focal``, in [0, 1)) trains on the target ``y (1 - eps) + eps / 2``:
a positive on ``1 - eps/2``, a negative on ``eps/2``.

Regression tasks (``r = prediction - y``):

* ``"mse"`` (default): ``r^2``;
* ``"huber"``: ``r^2 / 2`` where ``|r| <= delta``, ``delta (|r| - delta / 2)`` elsewhere (option ``delta`` > 0,
  default 1).

Multi-class tasks (``Task(kind="multiclass", num_classes=K)``; the prediction is ``(B, K)`` logits ``z``, the target
the class id ``y`` in ``[0, K)``, stored as a float like every label):

* ``"cross_entropy"`` (default): the softmax cross-entropy ``-log softmax(z)_y = logsumexp(z) - z_y``; option
  ``label_smoothing=eps`` (in [0, 1)) trains on the target distribution ``(1 - eps) onehot(y) + eps / K``
  (PyTorch's ``cross_entropy(label_smoothing=eps)``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

RowLoss = Callable[..., Tensor]


def bce_loss(logits: Tensor, target: Tensor, mask: Tensor, groups: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
    """Per-row binary cross-entropy on logits, on the target smoothed by ``label_smoothing``."""
    return F.binary_cross_entropy_with_logits(logits, smooth_target(target, label_smoothing), reduction="none")


def focal_loss(logits: Tensor, target: Tensor, mask: Tensor, groups: Tensor | None = None, gamma: float = 2.0,
               alpha: float | None = 0.25, label_smoothing: float = 0.0) -> Tensor:
    """Per-row focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (see the module docstring)."""
    y = smooth_target(target, label_smoothing)
    log_loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # -log p_t
    one_minus_pt = y * torch.sigmoid(-logits) + (1 - y) * torch.sigmoid(logits)
    # pow(0, gamma < 1) has an infinite derivative: keep the base off 0 (only reached at |z| > ~100).
    modulating = one_minus_pt.clamp(min=1e-30) ** gamma if gamma != 0 else torch.ones_like(logits)
    losses = modulating * log_loss
    if alpha is not None:
        losses = (alpha * y + (1 - alpha) * (1 - y)) * losses
    return losses


def jrc_loss(logits: Tensor, target: Tensor, mask: Tensor, groups: Tensor | None = None, alpha: float = 0.5,
             session: str = "group") -> Tensor:
    """Per-row JRC loss ``alpha * L_calib + (1 - alpha) * L_rank`` for one logit per row.

    JRC gives each row two logits, ``z1`` (click) and ``z0`` (no click), predicts ``p = sigmoid(z1 - z0)``, and
    trains them with the cross-entropy of that prediction (calibration) plus, within each session, a softmax of
    each row's logit of its own label against the same logit of the rows of its session with the other label
    (ranking, the paper's "contrasting the logit value for the sample with different labels"):

    * a positive row i: ``-log( exp(z1_i) / (exp(z1_i) + sum_{j in S(i), y_j = 0} exp(z1_j)) )``;
    * a negative row i: ``-log( exp(z0_i) / (exp(z0_i) + sum_{j in S(i), y_j = 1} exp(z0_j)) )``;

    a row with no row of the other label in its session has a ranking term of 0.

    This library's architectures give one logit ``z`` per binary task, and predictions, metrics, calibration and
    exports read ``sigmoid(z)``. The loss therefore splits it symmetrically, ``z1 = z / 2`` and ``z0 = -z / 2``:
    ``z1 - z0 = z``, so the calibration term is exactly BCE(z, y) and the served probability is unchanged, and the
    ranking term becomes ``softplus(logsumexp_j(z_j / 2) - z_i / 2)`` for a positive (j the session's negatives)
    and ``softplus(logsumexp_j(-z_j / 2) + z_i / 2)`` for a negative (j the session's positives).

    Only valid rows (``mask``) take part, as rows and as competitors. ``groups`` are the rows' session ids
    (``session="group"``; required) or ignored (``session="batch"``: one session).
    """
    if session == "group":
        if groups is None:
            raise ValueError("loss 'jrc' with session='group' ranks within the batch's groups, but the batch has no "
                             "'group' tensor: give the data module a group column (the one group AUC reads), or set "
                             "loss_options={'session': 'batch'} to rank within the whole batch")
        if groups.shape != logits.shape:
            raise ValueError(f"group ids of shape {tuple(groups.shape)} for logits of shape {tuple(logits.shape)}")
        session_ids = torch.unique(groups, return_inverse=True)[1]
    else:
        session_ids = torch.zeros_like(logits, dtype=torch.long)
    calibration = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    positive = mask & (target > 0.5)
    negative = mask & ~(target > 0.5)
    sessions = int(session_ids.max()) + 1 if logits.numel() else 0
    half = logits / 2
    # Positives compete with their session's negatives on z1 = z/2, negatives with its positives on z0 = -z/2.
    lse_negatives, has_negatives = _segment_logsumexp(half, negative, session_ids, sessions)
    lse_positives, has_positives = _segment_logsumexp(-half, positive, session_ids, sessions)
    rank_positive = torch.where(has_negatives[session_ids], F.softplus(lse_negatives[session_ids] - half),
                                torch.zeros_like(half))
    rank_negative = torch.where(has_positives[session_ids], F.softplus(lse_positives[session_ids] + half),
                                torch.zeros_like(half))
    ranking = torch.where(positive, rank_positive, torch.where(negative, rank_negative, torch.zeros_like(half)))
    return alpha * calibration + (1 - alpha) * ranking


def _segment_logsumexp(values: Tensor, members: Tensor, segments: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``(logsumexp of values over the member rows of each segment, whether the segment has a member)``; a segment
    without members gets 0 (not -inf, so no NaN reaches a gradient)."""
    has = torch.zeros(count, dtype=torch.bool, device=values.device).index_fill(0, segments[members], True)
    member_values = values[members]
    member_segments = segments[members]
    peak = torch.full((count,), -math.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, member_segments, member_values.detach(), reduce="amax", include_self=True)
    peak = torch.where(has, peak, torch.zeros_like(peak))
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(
        0, member_segments, torch.exp(member_values - peak[member_segments]))
    return torch.log(torch.where(has, sums, torch.ones_like(sums))) + peak, has


def mse_loss(prediction: Tensor, target: Tensor, mask: Tensor, groups: Tensor | None = None) -> Tensor:
    """Per-row squared error."""
    return (prediction - target) ** 2


def huber_loss(prediction: Tensor, target: Tensor, mask: Tensor, groups: Tensor | None = None,
               delta: float = 1.0) -> Tensor:
    """Per-row Huber loss: ``r^2 / 2`` for ``|r| <= delta``, ``delta (|r| - delta / 2)`` beyond."""
    return F.huber_loss(prediction, target, reduction="none", delta=delta)


def cross_entropy_loss(logits: Tensor, target: Tensor, mask: Tensor, groups: Tensor | None = None,
                       label_smoothing: float = 0.0) -> Tensor:
    """Per-row softmax cross-entropy of ``(B, K)`` logits against class ids ``target`` (``(B,)``, float or integer).

    The class ids of the valid rows (``mask``) must be integers in ``[0, K)``. Labels read by ``ParquetDataModule``
    are checked there (naming the file and column); a batch built by hand is checked here when it is on the CPU
    (``ValueError``). On an accelerator the check would stop the step for a host sync, so it is left to PyTorch's
    own (a device-side assertion).
    """
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"a multiclass loss takes (B, K) logits and (B,) class ids, got logits of shape "
                         f"{tuple(logits.shape)} and labels of shape {tuple(target.shape)}")
    classes = logits.shape[1]
    if target.device.type == "cpu":
        bad = mask & ((target < 0) | (target >= classes) | (target != torch.floor(target)))
        if bool(bad.any()):
            raise ValueError(f"multiclass labels must be class ids 0..{classes - 1} (or the ignore label), got "
                             f"{target[bad][:5].tolist()}")
    return F.cross_entropy(logits, target.long(), reduction="none", label_smoothing=label_smoothing)


def smooth_target(target: Tensor, label_smoothing: float) -> Tensor:
    """``y (1 - eps) + eps / 2``."""
    return target if label_smoothing == 0 else target * (1 - label_smoothing) + label_smoothing / 2


# The one map: task kind -> loss name -> (function, option name -> validator). The first loss is the kind's default.
def _probability(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_SMOOTHING = ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
LOSSES: dict[str, dict[str, tuple[RowLoss, dict[str, tuple[str, Callable[[Any], bool]]]]]] = {
    "binary": {
        "bce": (bce_loss, {"label_smoothing": _SMOOTHING}),
        "focal": (focal_loss, {"gamma": ("a number >= 0", lambda v: _number(v) and v >= 0),
                               "alpha": ("a number in [0, 1] or None", lambda v: v is None or _probability(v)),
                               "label_smoothing": _SMOOTHING}),
        "jrc": (jrc_loss, {"alpha": ("a number in [0, 1]", _probability),
                           "session": ("'group' or 'batch'", lambda v: v in ("group", "batch"))}),
    },
    "regression": {
        "mse": (mse_loss, {}),
        "huber": (huber_loss, {"delta": ("a number > 0", lambda v: _number(v) and v > 0)}),
    },
    "multiclass": {
        "cross_entropy": (cross_entropy_loss, {"label_smoothing": _SMOOTHING}),
    },
}


def default_loss(kind: str) -> str:
    """The loss a task of ``kind`` trains with when it names none: ``bce`` (binary), ``mse`` (regression),
    ``cross_entropy`` (multiclass)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown task kind {kind!r}; choose from {tuple(LOSSES)}")
    return next(iter(LOSSES[kind]))


def check_loss(task_name: str | None, kind: str, loss: str, options: Mapping[str, Any]) -> None:
    """``ValueError`` (naming the task when ``task_name`` is given) unless ``loss`` is a loss of ``kind`` and ``options`` are its options with
    valid values."""
    where = "" if task_name is None else f"Task {task_name!r}: "
    losses = LOSSES[kind]
    if loss not in losses:
        raise ValueError(f"{where}loss {loss!r} is not a loss of {kind} tasks; choose from "
                         f"{tuple(losses)}")
    accepted = losses[loss][1]
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(f"{where}loss {loss!r} has no option {key!r}; its options: "
                             f"{sorted(accepted) or 'none'}")
        meaning, valid = accepted[key]
        if not valid(value):
            raise ValueError(f"{where}loss option {key!r} must be {meaning}, got {value!r}")


def row_losses(prediction: Tensor, target: Tensor, mask: Tensor, kind: str, loss: str | None = None,
               options: Mapping[str, Any] | None = None, groups: Tensor | None = None) -> Tensor:
    """Per-row losses of a task of ``kind`` trained with ``loss`` (its kind's default when ``None``)."""
    loss = default_loss(kind) if loss is None else loss
    options = dict(options or {})
    check_loss(None, kind, loss, options)
    return LOSSES[kind][loss][0](prediction, target, mask, groups, **options)


__all__ = ["LOSSES", "bce_loss", "focal_loss", "jrc_loss", "mse_loss", "huber_loss", "cross_entropy_loss",
           "smooth_target", "default_loss", "check_loss", "row_losses"]
