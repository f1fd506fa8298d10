"""GLS: the geometric loss strategy.

Chennupati, S., Sistu, G., Yogamani, S., Rawashdeh, S. A. "MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning." CVPR Workshops 2019.

The total loss is the geometric mean of the task losses, ``L = (prod_i L_i)^(1/T)``, computed as
``exp(sum_i log(L_i) / T)``. Its gradient weighs each task by ``L / (T L_i)``: a task whose loss is
small gets a large weight, and rescaling one loss by a constant changes no direction (only
``log L_i`` enters). One backward; no state.

With ``Task.weight`` the exponents are ``Task.weight_i / sum_j Task.weight_j`` (a weighted geometric
mean; all 1 gives the paper's ``1/T``). A task whose loss is exactly 0 in a batch (no valid row:
the ignore label) is left out of that batch's product and the exponents are renormalised over the
others (its ``log 0`` would make the product 0 and the gradients infinite). The logged weight of
task ``i`` is ``dL/dL_i = L e_i / L_i`` (``e_i`` its exponent). Under DDP the weights come from the
losses averaged across ranks, so the update is the gradient of the geometric mean of the global
batch's losses (not an average of each rank's own geometric mean) and every rank logs the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import WeightingStrategy, register_weighting, scalarize


@register_weighting("gls")
class GLS(WeightingStrategy):
    """Chennupati et al. (CVPRW 2019) geometric mean of the task losses."""

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        task_weights = self._task_weights()

        def geometric_mean(point: Tensor) -> Tensor:
            present = point.detach() != 0
            exponents = task_weights.to(point) * present
            exponents = exponents / exponents.sum().clamp(min=1e-30)
            safe = torch.where(present, point, torch.ones_like(point))  # no log(0), not even in the unused branch
            return torch.exp((exponents * torch.log(safe)).sum())

        total, self.last_weights = scalarize(losses, geometric_mean)
        return total


__all__ = ["GLS"]
