"""FairGrad: fair resource allocation among tasks.

Ban, H., Ji, K. "Fair Resource Allocation in Multi-Task Learning." ICML 2024.

The update ``d`` is shared among the tasks as a resource: task ``i`` gets the utility
``u_i = <g_i, d>`` (``g_i`` the gradient of ``Task.weight_i * L_i`` on the shared parameters) and
FairGrad maximises the ``alpha``-fair utility ``sum_i u_i^(1 - alpha) / (1 - alpha)`` (``log u_i`` for
``alpha = 1``) in a ball. The optimality condition is ``d = sum_i w_i g_i`` with ``w > 0`` solving

    G G^T w = w^(-1 / alpha)   (elementwise)

``alpha = 1`` is proportional fairness, the Nash bargaining condition of Nash-MTL (``nash_mtl.py``);
``alpha -> inf`` approaches max-min fairness (the worst task's improvement); ``alpha -> 0`` the plain
sum. Task-specific parameters get their own task's gradient (the official code backpropagates
``sum_i w_i L_i``, weighting them by ``w_i`` too; here, as every gradient strategy, their own).

Solving (open in the paper, whose code calls SciPy's ``least_squares`` on the residual from ``1/T``):
``w`` is the unique minimiser of the strictly convex ``f(w) = 1/2 w^T M w - sum_i phi(w_i)`` on
``w > 0``, ``phi(w) = w^(1 - 1/alpha) / (1 - 1/alpha)`` (``log w`` for ``alpha = 1``), whose gradient
``M w - w^(-1/alpha)`` vanishes exactly at the condition: Newton's method with a backtracking line
search keeping ``w > 0`` (``mtl_lightning.weighting.solvers.fair_weights``; Hessian ``M + diag(w^(-1/alpha - 1) / alpha)``), in float64 on the CPU.
``M`` is divided by its Frobenius norm ``n`` first and the solution scaled back by
``n^(-alpha / (alpha + 1))``. It stops when the scaled residual is at most ``tol sqrt(T)`` or after
``max_iter`` steps, from the previous step's solution (1 at the first step; checkpointed). Under DDP
the per-task gradients are averaged across ranks first. Logged weight: ``w_i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting
from .solvers import fair_weights


@register_weighting("fairgrad")
class FairGrad(GradientStrategy):
    """Ban & Ji (ICML 2024) ``alpha``-fair allocation of the update among the tasks.

    Args:
        alpha: the fairness ``alpha > 0`` (1: proportional fairness, LibMTL's default).
        max_iter: Newton's iteration cap.
        tol: Newton's tolerance on the scaled residual.
    """

    def __init__(self, alpha: float = 1.0, max_iter: int = 100, tol: float = 1e-10) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"FairGrad: alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("scaled_solution", torch.ones(self.num_tasks, dtype=torch.float64))  # warm start

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        gram = (gradients @ gradients.T).double()
        norm = float(torch.linalg.matrix_norm(gram).cpu())
        if norm == 0:
            self.last_weights = torch.zeros_like(self.last_weights)
            return torch.zeros_like(gradients[0])
        scaled = fair_weights(gram / norm, self.alpha, self.scaled_solution, self.max_iter, self.tol)
        self.scaled_solution.copy_(scaled)
        weights = scaled * norm ** (-self.alpha / (self.alpha + 1))
        self.last_weights = weights.float().to(self.last_weights.device)
        return weights.to(gradients) @ gradients


__all__ = ["FairGrad", "fair_weights"]
