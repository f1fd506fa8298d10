"""Dynamic Weight Average (DWA).

Liu, S., Johns, E., Davison, A. J. "End-to-End Multi-Task Learning with
Attention." CVPR 2019.

The weight of task k in epoch t follows how fast its loss went down over the
two previous epochs: ``r_k = L_k(t-1) / L_k(t-2)`` and
``w_k(t) = T exp(r_k / temperature) / sum_i exp(r_i / temperature)``, where
``L_k(t)`` is the task's mean training loss over epoch t. In the first two
epochs every weight is 1. Under DDP the per-step losses are averaged across
ranks, so every rank holds the same epoch means. Checkpointed state: the running
sums of the current epoch, the means of the two previous epochs and the epoch
index, so resume is exact.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, _requires_backward, distributed_mean, register_weighting


def dwa_weights(previous: Tensor, before_previous: Tensor, temperature: float) -> Tensor:
    """``T * softmax((L(t-1) / L(t-2)) / temperature)``; a task whose ``L(t-2)`` is 0 gets ratio 1."""
    ratio = torch.where(before_previous > 0, previous / before_previous.clamp(min=1e-30), torch.ones_like(previous))
    return len(ratio) * torch.softmax(ratio / temperature, dim=0)


@register_weighting("dwa")
class DWA(WeightingStrategy):
    """Liu et al. (CVPR 2019) Dynamic Weight Average over epoch-mean task losses."""

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DWA: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_loss_sum", torch.zeros(self.num_tasks))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, self.num_tasks))  # [L(t-1), L(t-2)]
        self.register_buffer("history_length", torch.zeros((), dtype=torch.long))

    def begin_epoch(self, epoch: int) -> None:
        if epoch != int(self.epoch) and int(self.epoch_steps) > 0:
            mean = self.epoch_loss_sum / self.epoch_steps
            self.history.copy_(torch.stack([mean, self.history[0]]))
            self.history_length.fill_(min(int(self.history_length) + 1, 2))
            self.epoch_loss_sum.zero_()
            self.epoch_steps.zero_()
        self.epoch.fill_(epoch)

    def current_weights(self) -> Tensor:
        if int(self.history_length) < 2:
            return torch.ones(self.num_tasks, device=self.history.device)
        return dwa_weights(self.history[0], self.history[1], self.temperature)

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        if _requires_backward(losses):
            self.epoch_loss_sum += distributed_mean(losses.float())
            self.epoch_steps += 1
        return self._weighted_sum(self.current_weights(), losses)


__all__ = ["DWA", "dwa_weights"]
