"""PCGrad: projecting conflicting gradients.

Yu, T., Kumar, S., Gupta, A., Levine, S., Hausman, K., Finn, C. "Gradient
Surgery for Multi-Task Learning." NeurIPS 2020.

On the shared parameters, each task's gradient ``g_i`` is visited against the
other tasks' original gradients ``g_j`` in a random order; whenever the current
``g_i^PC`` conflicts with ``g_j`` (negative inner product) its component along
``g_j`` is removed: ``g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j``. The
shared parameters' gradient is ``sum_i g_i^PC``; task-specific parameters get
their own task's gradient. Per-task gradients are of ``Task.weight_i * L_i``.
Under DDP the per-task gradients are averaged across ranks first, and the random
order comes from the strategy's own seeded generator (same on every rank,
checkpointed), so every rank computes the same update.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .base import GradientStrategy, register_weighting


def project_conflicting(gradients: Tensor, orders: Sequence[Sequence[int]] | None = None) -> Tensor:
    """PCGrad's combined gradient ``sum_i g_i^PC`` from per-task gradients ``(T, P)``.

    ``orders[i]`` is the order in which task ``i`` visits the other tasks (default ``0..T-1``).
    """
    num_tasks = gradients.shape[0]
    squared_norms = (gradients * gradients).sum(dim=1)
    projected = gradients.clone()
    for i in range(num_tasks):
        for j in (orders[i] if orders is not None else range(num_tasks)):
            if j == i or squared_norms[j] == 0:
                continue
            dot = projected[i] @ gradients[j]
            if dot < 0:
                projected[i] -= dot / squared_norms[j] * gradients[j]
    return projected.sum(dim=0)


@register_weighting("pcgrad")
class PCGrad(GradientStrategy):
    """Yu et al. (NeurIPS 2020) gradient surgery on the architecture's ``shared_parameters()``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        orders = [torch.randperm(self.num_tasks, generator=self.generator).tolist() for _ in range(self.num_tasks)]
        return project_conflicting(gradients, orders)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())


__all__ = ["PCGrad", "project_conflicting"]
