"""Uncertainty weighting: task weights from learned homoscedastic uncertainty.

Kendall, A., Gal, Y., Cipolla, R. "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics." CVPR 2018.

Each task has a learned log-variance ``s_i = log sigma_i^2`` (initially 0),
trained jointly with the model by the model's optimizer. The loss is the
negative log-likelihood form of the paper: a regression task contributes
``1/(2 sigma^2) L + log sigma = 0.5 exp(-s) L + 0.5 s``, a classification
(binary) task ``1/sigma^2 L + log sigma = exp(-s) L + 0.5 s``. The logged
weight is the factor in front of ``L`` (``0.5 exp(-s)`` or ``exp(-s)``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, register_weighting


@register_weighting("uncertainty")
class Uncertainty(WeightingStrategy):
    """Kendall et al. (CVPR 2018) uncertainty weighting, one learned ``log sigma^2`` per task."""

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.log_variances = nn.Parameter(torch.zeros(self.num_tasks))
        self.register_buffer("scale", torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in tasks]),
                             persistent=False)

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        weights = self.scale * torch.exp(-self.log_variances)  # (T,)
        self.last_weights = weights.detach()
        return (weights * losses).sum() + 0.5 * self.log_variances.sum()


__all__ = ["Uncertainty"]
