"""Static weighting: the total loss is ``sum_k Task.weight_k * L_k`` (the default strategy)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, register_weighting


@register_weighting("static")
class Static(WeightingStrategy):
    """Fixed per-task weights taken from ``Task.weight``."""

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("weights", self._task_weights(), persistent=False)

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        return self._weighted_sum(self.weights, losses)
