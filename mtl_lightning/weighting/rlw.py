"""Random Loss Weighting (RLW).

Lin, B., Ye, F., Zhang, Y., Tsang, I. W. "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning." TMLR 2022.

Every training step draws ``z ~ N(0, I_T)`` and weights the losses by
``softmax(z)`` (the weights sum to 1). The draws come from the strategy's own
generator seeded with ``seed``: every DDP rank draws the same weights, and the
generator state is checkpointed, so resume continues the same sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import WeightingStrategy, _requires_backward, register_weighting


@register_weighting("rlw")
class RLW(WeightingStrategy):
    """Lin et al. (TMLR 2022) random loss weighting with softmax-of-normal weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        if not _requires_backward(losses):  # evaluation: equal weights, the generator is not advanced
            return self._weighted_sum(torch.full_like(losses, 1.0 / self.num_tasks), losses)
        weights = torch.softmax(torch.randn(self.num_tasks, generator=self.generator), dim=0)
        return self._weighted_sum(weights.to(losses.device), losses)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())


__all__ = ["RLW"]
