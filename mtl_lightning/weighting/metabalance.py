"""MetaBalance: adapting the gradient magnitudes of auxiliary tasks to the target task's.

He, Y., Feng, X., Cheng, C., Ji, G., Guo, Y., Caverlee, J. "MetaBalance: Improving Multi-Task
Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks." WWW 2022.

A recommender often has one *target* task (e.g. purchase) and *auxiliary* tasks that help it
(click, dwell). MetaBalance keeps every auxiliary gradient on the shared parameters close in
magnitude to the target's, without changing its direction. For every shared parameter tensor ``p``
and task ``i`` it keeps a moving average of the gradient norm,
``m_{p,i} <- beta m_{p,i} + (1 - beta) ||g_{p,i}||`` (from 0, no bias correction, as the official
code), and rescales

    g_{p,i} <- r (m_{p,target} / m_{p,i}) g_{p,i} + (1 - r) g_{p,i}

with the relax factor ``r`` (1: the auxiliary magnitudes equal the target's; 0: unchanged); the
target's own gradient keeps its magnitude (its ratio is 1). The shared update is the sum over tasks;
task-specific parameters get their own task's gradient. Per-task gradients are of
``Task.weight_i * L_i``. A task whose average norm is still 0 keeps ratio 1 (its gradient is 0).

``target`` names the target task (default: the first). ``r = 0.7`` and ``beta = 0.9`` are the
official code's defaults (the paper tunes ``r``, and its "adaptive" variant is not implemented).
Under DDP the per-task gradients are averaged across ranks first, so every rank holds the same
averages. Checkpointed state: the averages ``(T, number of shared tensors)``. Logged weight: each
task's scale ``r m_target / m_i + 1 - r``, averaged over the shared tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting


@register_weighting("metabalance")
class MetaBalance(GradientStrategy):
    """He et al. (WWW 2022) auxiliary-gradient magnitude balancing on the architecture's ``shared_parameters()``.

    Args:
        target: the target task's name (default: the first task).
        relax_factor: ``r`` in ``[0, 1]``.
        beta: the moving average's decay in ``[0, 1)``.
    """

    def __init__(self, target: str | None = None, relax_factor: float = 0.7, beta: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= relax_factor <= 1.0:
            raise ValueError(f"MetaBalance: relax_factor must be in [0, 1], got {relax_factor}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"MetaBalance: beta must be in [0, 1), got {beta}")
        self.target = target
        self.relax_factor = float(relax_factor)
        self.beta = float(beta)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        if self.target is not None and self.target not in self.task_names:
            raise ValueError(f"MetaBalance: target {self.target!r} is not a task; tasks are {self.task_names}")
        self._target_index = self.task_names.index(self.target) if self.target is not None else 0
        self._sizes = [p.numel() for p in self._shared]
        self.register_buffer("norm_averages", torch.zeros(self.num_tasks, len(self._sizes)))

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        pieces = torch.split(gradients, self._sizes, dim=1)  # one (T, |p|) block per shared tensor
        norms = torch.stack([piece.norm(dim=1) for piece in pieces], dim=1)  # (T, K)
        averages = self.beta * self.norm_averages.to(norms) + (1 - self.beta) * norms
        self.norm_averages.copy_(averages)
        ratios = torch.where(averages > 0, averages[self._target_index] / averages.clamp(min=1e-30),
                             torch.ones_like(averages))
        scales = self.relax_factor * ratios + (1 - self.relax_factor)  # (T, K)
        self.last_weights = scales.mean(dim=1).float().to(self.last_weights.device)
        return torch.cat([(scales[:, k:k + 1] * piece).sum(dim=0) for k, piece in enumerate(pieces)])


__all__ = ["MetaBalance"]
