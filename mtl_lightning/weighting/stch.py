"""STCH: smooth Tchebycheff scalarisation.

Lin, X., Zhang, X., Yang, Z., Liu, F., Wang, Z., Zhang, Q. "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization." ICML 2024.

The Tchebycheff scalarisation ``max_i lambda_i (f_i - z_i)`` optimises the worst objective and can
reach every Pareto-optimal point, but is not smooth. STCH replaces the max by its smooth upper bound
``mu log sum_i exp(lambda_i (f_i - z_i) / mu)`` (``mu -> 0`` gives the max back). For multi-task
training (the paper's experiments, and the official code this follows) the objectives are the
log-losses normalised by a nadir point ``n_i`` measured after a warm-up, ``f_i - z_i = log(L_i / n_i)``,
and the total is

    T mu log sum_i exp(lambda_i log(L_i / n_i + 1e-20) / mu)

(the factor ``T`` as the official code, so the loss keeps the scale of a sum over tasks). Its weight
on task ``i`` is ``T lambda_i softmax(lambda log(L / n) / mu)_i / L_i``: the task furthest above its
nadir dominates, more so for small ``mu``.

Warm-up (the official schedule): in epochs ``< warmup_epochs`` the loss is ``sum_i log(L_i + 1e-20)``;
in epoch ``warmup_epochs`` too, while ``n_i`` is measured as the mean of the task's (positive) losses
over that epoch; from the next epoch on, STCH. (So STCH needs at least ``warmup_epochs + 2`` epochs to
act; with ``warmup_epochs=0`` it starts in the second epoch.) ``lambda`` is the preference vector,
``Task.weight`` (all 1, as the official code, by default). Losses that are exactly 0 (a task without
a valid row) get weight 0 in both phases and do not enter the nadir.

Under DDP the losses are averaged across ranks for the nadir and for the weights (the update is the
gradient of the scalarisation of the global batch's losses), so every rank holds the same state.
Checkpointed state: the epoch, the nadir sums and counts and the nadir. Logged weight: ``dF/dL_i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, _requires_backward, distributed_mean, register_weighting, scalarize

TINY = 1e-20


@register_weighting("stch")
class STCH(WeightingStrategy):
    """Lin et al. (ICML 2024) smooth Tchebycheff scalarisation of the nadir-normalised log-losses.

    Args:
        mu: the smoothing ``mu > 0`` (LibMTL's default 1).
        warmup_epochs: epochs of ``sum log L`` before the nadir epoch (LibMTL's default 4).
    """

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        super().__init__()
        if mu <= 0:
            raise ValueError(f"STCH: mu must be > 0, got {mu}")
        if warmup_epochs < 0:
            raise ValueError(f"STCH: warmup_epochs must be >= 0, got {warmup_epochs}")
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir_sum", torch.zeros(self.num_tasks))
        self.register_buffer("nadir_count", torch.zeros(self.num_tasks, dtype=torch.long))
        self.register_buffer("nadir", torch.zeros(self.num_tasks))

    def begin_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)
        if epoch > self.warmup_epochs and not bool((self.nadir > 0).any()):
            self.nadir.copy_(torch.where(self.nadir_count > 0, self.nadir_sum / self.nadir_count.clamp(min=1),
                                         torch.ones_like(self.nadir_sum)))  # a task never positive: nadir 1

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        epoch = int(self.epoch)
        if epoch == self.warmup_epochs and _requires_backward(losses):
            current = distributed_mean(losses.float())
            positive = current > 0
            self.nadir_sum += torch.where(positive, current, torch.zeros_like(current))
            self.nadir_count += positive.long()
        if epoch <= self.warmup_epochs or not bool((self.nadir > 0).any()):
            total, self.last_weights = scalarize(losses, self._log_sum)
        else:
            total, self.last_weights = scalarize(losses, self._smooth_tchebycheff)
        return total

    def _log_sum(self, point: Tensor) -> Tensor:
        present = point.detach() != 0
        return torch.where(present, torch.log(torch.where(present, point, torch.ones_like(point)) + TINY),
                           torch.zeros_like(point)).sum()

    def _smooth_tchebycheff(self, point: Tensor) -> Tensor:
        present = point.detach() != 0
        if not bool(present.any()):
            return point.sum() * 0.0
        safe = torch.where(present, point, torch.ones_like(point))
        scaled = self._task_weights().to(point) * torch.log(safe / self.nadir.to(point) + TINY) / self.mu
        scaled = torch.where(present, scaled, torch.full_like(scaled, -torch.inf))
        return self.num_tasks * self.mu * torch.logsumexp(scaled, dim=0)


__all__ = ["STCH"]
