"""GradVac: gradient vaccine.

Wang, Z., Tsvetkov, Y., Firat, O., Cao, Y. "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models." ICLR 2021.

PCGrad (``pcgrad.py``) only acts when two task gradients conflict (negative cosine) and then makes
them orthogonal. GradVac sets an adaptive *target* similarity instead: for every ordered pair of
tasks it keeps an exponential moving average ``phi_ij`` of the observed cosine similarity
(initially 0), and whenever the current similarity ``rho_ij = cos(g_i^PC, g_j)`` falls below it, adds
the multiple of ``g_j`` that raises the similarity exactly to ``phi_ij``:

    g_i^PC <- g_i^PC + g_j * ||g_i^PC|| (phi_ij sqrt(1 - rho_ij^2) - rho_ij sqrt(1 - phi_ij^2))
                             / (||g_j|| sqrt(1 - phi_ij^2))

then ``phi_ij <- (1 - beta) phi_ij + beta rho_ij`` (every visit, as the paper's Algorithm 1). Task
``i`` visits the other tasks in a random order (the strategy's seeded generator, checkpointed, the
same on every DDP rank), against their original gradients ``g_j``; the shared parameters' gradient
is ``sum_i g_i^PC`` and every task-specific parameter gets its own task's gradient. With
``phi = 0`` (the first step) the correction is PCGrad's projection.

``granularity`` (the paper applies the vaccine at several granularities): ``"whole"`` treats the
shared parameters as one vector (default, as LibMTL's); ``"parameter"`` applies it to every shared
parameter tensor separately, with its own ``phi``. ``1e-8`` is added to the norms' denominators.
Per-task gradients are of ``Task.weight_i * L_i`` and, under DDP, averaged across ranks first.
Checkpointed state: ``phi`` (``(T, T, groups)``) and the generator. Logged weight: ``Task.weight``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting

GRANULARITIES = ("whole", "parameter")
EPS = 1e-8


def vaccinate(gradients: Tensor, targets: Tensor, beta: float, orders: Sequence[Sequence[int]] | None = None,
              groups: Sequence[int] | None = None) -> Tensor:
    """GradVac's combined gradient ``sum_i g_i^PC`` from ``(T, P)`` gradients; updates ``targets`` ``(T, T, K)``.

    ``groups`` are the sizes of the ``K`` consecutive slices the vaccine treats apart (default: one);
    ``orders[i]`` the order in which task ``i`` visits the others (default ``0..T-1``).
    """
    num_tasks = gradients.shape[0]
    bounds = torch.tensor([0, *(groups or [gradients.shape[1]])]).cumsum(0).tolist()
    projected = gradients.clone()
    for i in range(num_tasks):
        for j in (orders[i] if orders is not None else range(num_tasks)):
            if j == i:
                continue
            for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
                g_i, g_j = projected[i, start:end], gradients[j, start:end]
                norm_i, norm_j = g_i.norm(), g_j.norm()
                rho = (g_i @ g_j) / (norm_i * norm_j + EPS)
                phi = targets[i, j, k]
                if rho < phi:
                    root_phi = (1 - phi ** 2).clamp(min=0).sqrt()
                    root_rho = (1 - rho ** 2).clamp(min=0).sqrt()
                    scale = norm_i * (phi * root_rho - rho * root_phi) / (norm_j * root_phi + EPS)
                    projected[i, start:end] = g_i + scale * g_j
                targets[i, j, k] = (1 - beta) * phi + beta * rho
    return projected.sum(dim=0)


@register_weighting("gradvac")
class GradVac(GradientStrategy):
    """Wang et al. (ICLR 2021) gradient vaccine on the architecture's ``shared_parameters()``.

    Args:
        beta: the moving average's rate for the target similarities (the paper's ``beta``; LibMTL uses 0.5).
        granularity: ``"whole"`` or ``"parameter"`` (see the module docstring).
        seed: the seed of the generator of the visiting orders.
    """

    def __init__(self, beta: float = 0.5, granularity: str = "whole", seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in (0, 1], got {beta}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"GradVac: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.beta = float(beta)
        self.granularity = granularity
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self._groups = [p.numel() for p in self._shared] if self.granularity == "parameter" else [self.num_shared]
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks, len(self._groups)))

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        orders = [torch.randperm(self.num_tasks, generator=self.generator).tolist() for _ in range(self.num_tasks)]
        targets = self.targets.to(gradients)
        combined = vaccinate(gradients, targets, self.beta, orders, self._groups)
        self.targets.copy_(targets)
        return combined

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())


__all__ = ["GradVac", "vaccinate"]
