"""Per-task losses with ignore-label masking, as pure functions.

A row takes part in a task's loss only when its label is neither
``ignore_label`` nor NaN. The loss is the mean over those rows; when a batch
has none, the loss is an exact ``0`` that still depends on the prediction (so
the autograd graph, and DDP's gradient buckets, see the parameters).

With per-row sample ``weights`` (a batch's ``weights[task]``, see
``mtl_lightning.batch``) the loss is the weighted mean over the valid rows,
``sum_i w_i l_i / sum_i w_i``, and an exact ``0`` when those weights sum to 0.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .task_losses import LOSSES, row_losses

LOSS_KINDS = tuple(LOSSES)


def valid_mask(labels: Tensor, ignore_label: float | None = -1) -> Tensor:
    """``True`` where a label counts: not NaN and not ``ignore_label``."""
    mask = ~torch.isnan(labels)
    if ignore_label is not None:
        mask &= labels != ignore_label
    return mask


def elementwise_loss(prediction: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-row loss of the kind's default: BCE on logits for ``binary``, squared error for ``regression``."""
    if kind not in LOSSES:
        raise ValueError(f"unknown task kind {kind!r}; choose from {LOSS_KINDS}")
    return row_losses(prediction, target, torch.ones_like(target, dtype=torch.bool), kind)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; an exact 0 (with graph) when the mask is empty."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def masked_loss(prediction: Tensor, labels: Tensor, kind: str, ignore_label: float | None = -1,
                weights: Tensor | None = None, loss: str | None = None, options: Mapping[str, Any] | None = None,
                groups: Tensor | None = None) -> Tensor:
    """Mean loss of one task over its valid rows, weighted by ``weights`` (``(B,)``, >= 0) when given.

    ``loss`` and ``options`` are a ``Task``'s ``loss`` and ``loss_options`` (the kind's default loss when
    ``None``; see ``mtl_lightning.losses.task_losses``), ``groups`` the batch's group ids (JRC's sessions).
    See the module docstring. ``weights`` of another shape than ``labels``
    raise ``ValueError``; their values are not checked here (a data source that
    produces them checks them when it reads them).
    """
    prediction = prediction.float()
    labels = labels.to(prediction.dtype)
    mask = valid_mask(labels, ignore_label)
    # Replace ignored labels before the loss: NaN * 0 would still be NaN.
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    if kind not in LOSSES:
        raise ValueError(f"unknown task kind {kind!r}; choose from {LOSS_KINDS}")
    losses = row_losses(prediction, safe, mask, kind, loss, options, groups)
    if weights is None:
        return masked_mean(losses, mask)
    if weights.shape != labels.shape:
        raise ValueError(f"sample weights of shape {tuple(weights.shape)} for labels of shape {tuple(labels.shape)}; "
                         "a batch's weights[task] holds one weight per row")
    weights = torch.where(mask, weights.to(losses.dtype), torch.zeros_like(losses))
    total = weights.sum()
    return (losses * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))
