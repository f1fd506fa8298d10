"""DB-MTL: dual-balancing multi-task learning.

Lin, B., Jiang, W., Ye, F., Zhang, Y., Chen, P., Chen, Y.-C., Liu, S.,
Kwok, J. T. "Dual-Balancing for Multi-Task Learning." arXiv:2308.12029, 2023.

Two balancing steps. Loss scale: every task optimises ``log(L_i + eps)``
instead of ``L_i`` (so a task's scale does not matter). Gradient magnitude: on
the shared parameters, with ``g_i`` the gradient of ``log(L_i + eps)``, an
exponential moving average ``h_i(t) = g_i + (beta / t^beta_sigma) (h_i(t-1) - g_i)``
is kept, and the update direction is ``sum_i (max_j ||h_j|| / ||h_i||) h_i``:
every task's averaged gradient scaled to the largest norm. Task-specific
parameters get the gradient of ``log(L_i + eps)``. The logged weight of task
``i`` is its scale ``max_j ||h_j|| / ||h_i||``. The moving averages ``(T, P)``
(``P`` = number of shared parameters) and the step count are checkpointed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting


@register_weighting("dbmtl")
class DBMTL(GradientStrategy):
    """Lin et al. (2023) DB-MTL on the architecture's ``shared_parameters()``."""

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"DBMTL: beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("gradient_average", torch.zeros(self.num_tasks, self.num_shared))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def objective(self, index: int, loss: Tensor) -> Tensor:
        return torch.log(loss + self.eps)

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        self.num_steps += 1
        decay = self.beta / float(self.num_steps) ** self.beta_sigma
        self.gradient_average.copy_(gradients + decay * (self.gradient_average - gradients))
        norms = self.gradient_average.norm(dim=1)  # (T,)
        scales = norms.max() / (norms + self.eps)
        self.last_weights = scales.to(self.last_weights.device)
        return (scales[:, None] * self.gradient_average).sum(dim=0)


__all__ = ["DBMTL"]
