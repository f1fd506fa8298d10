"""Scheduled loss weights, as in PLE's joint loss.

Tang, H., Liu, J., Zhao, M., Gong, X. "Progressive Layered Extraction (PLE): A
Novel Multi-Task Learning (MTL) Model for Personalized Recommendations."
RecSys 2020 (the joint loss optimisation for heterogeneous sample spaces).

Task k's weight decays (or grows) geometrically: ``w_k(t) = w_k,0 * gamma_k^t``,
where ``t`` is the training epoch (``unit="epoch"``, as in the paper) or the
optimizer step (``unit="step"``). ``w_k,0`` defaults to ``Task.weight``. The
schedule position ``t`` is a checkpointed buffer, so resume continues it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, register_weighting

UNITS = ("epoch", "step")


@register_weighting("scheduled")
class Scheduled(WeightingStrategy):
    """PLE's (Tang et al., RecSys 2020) per-task weight schedule ``w_k,0 * gamma_k^t``.

    Args:
        gamma: the per-period ratio, one float for every task or ``{task: gamma}``
            (tasks left out keep ratio 1).
        initial: ``{task: w_k,0}``; tasks left out start at ``Task.weight``.
        unit: what ``t`` counts: ``"epoch"`` or ``"step"`` (optimizer steps).
    """

    def __init__(self, gamma: float | Mapping[str, float] = 1.0, initial: Mapping[str, float] | None = None,
                 unit: str = "epoch") -> None:
        super().__init__()
        if unit not in UNITS:
            raise ValueError(f"Scheduled: unit must be one of {UNITS}, got {unit!r}")
        self.gamma = dict(gamma) if isinstance(gamma, Mapping) else float(gamma)
        self.initial = dict(initial or {})
        self.unit = unit

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        for what, given in (("gamma", self.gamma if isinstance(self.gamma, dict) else {}), ("initial", self.initial)):
            unknown = sorted(set(given) - set(self.task_names))
            if unknown:
                raise ValueError(f"Scheduled: {what} names unknown tasks {unknown}; tasks are {self.task_names}")
        gammas = [self.gamma.get(t.name, 1.0) if isinstance(self.gamma, dict) else self.gamma for t in tasks]
        if any(g <= 0 for g in gammas):
            raise ValueError(f"Scheduled: every gamma must be > 0, got {gammas}")
        self.register_buffer("gammas", torch.tensor(gammas, dtype=torch.float64), persistent=False)
        self.register_buffer("initial_weights", torch.tensor(
            [float(self.initial.get(t.name, t.weight)) for t in tasks], dtype=torch.float64), persistent=False)
        self.register_buffer("progress", torch.zeros((), dtype=torch.long))

    def current_weights(self) -> Tensor:
        return (self.initial_weights * self.gammas ** self.progress.double()).float()

    def begin_epoch(self, epoch: int) -> None:
        if self.unit == "epoch":
            self.progress.fill_(epoch)

    def before_optimizer_step(self) -> None:
        if self.unit == "step":
            self.progress += 1

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        return self._weighted_sum(self.current_weights(), losses)


__all__ = ["Scheduled"]
