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

from .base import WeightingStrategy, distributed_mean, register_weighting


@register_weighting("gls")
class GLS(WeightingStrategy):
    """Chennupati et al. (CVPRW 2019) geometric mean of the task losses."""

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        mean = distributed_mean(losses.float())  # (T,) the global batch's losses (these losses outside DDP)
        present = mean != 0
        exponents = self._task_weights().to(mean) * present
        exponents = exponents / exponents.sum().clamp(min=1e-30)
        safe = torch.where(present, mean, torch.ones_like(mean))
        value = torch.exp((exponents * torch.log(safe)).sum())
        weights = value * exponents / safe  # dL/dL_i at the global losses
        self.last_weights = weights
        # value: the global geometric mean; gradient: sum_i w_i grad L_i, which DDP's average makes dL/dtheta
        return value.to(losses.dtype) + (weights.to(losses.dtype) * (losses - losses.detach())).sum()


__all__ = ["GLS"]
