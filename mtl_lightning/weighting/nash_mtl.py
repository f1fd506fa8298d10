"""Nash-MTL: multi-task learning as a bargaining game.

Navon, A., Shamsian, A., Achituve, I., Maron, H., Kawaguchi, K., Chechik, G., Fetaya, E.
"Multi-Task Learning as a Bargaining Game." ICML 2022.

The tasks bargain over the update direction ``d`` in a ball; the Nash bargaining solution is
``d = sum_i alpha_i g_i`` with ``alpha > 0`` solving ``G G^T alpha = 1 / alpha`` (elementwise: every
task's improvement ``<g_i, d>`` equals ``1 / alpha_i``), ``g_i`` the gradients of
``Task.weight_i * L_i`` on the shared parameters. Such a ``d`` is invariant to the scale of each
task's gradient, and ``||d||^2 = alpha^T G G^T alpha = T``. Task-specific parameters get their own
task's gradient (the official code backpropagates ``sum_i alpha_i L_i``: there they would get
``alpha_i`` times it; here, as every gradient strategy, their own gradient).

Solving (the paper's open choice): ``alpha`` is the unique minimiser of the strictly convex
``f(alpha) = 1/2 alpha^T M alpha - sum_i log alpha_i`` on ``alpha > 0`` (its gradient
``M alpha - 1 / alpha`` vanishes exactly at the bargaining condition), found by Newton's method with
a backtracking line search that keeps ``alpha > 0`` (Hessian ``M + diag(1 / alpha^2)``), in float64
on the CPU; the paper approximates the same condition by a sequence of convex problems (CCP) solved
with cvxpy, a dependency this avoids. As the official code, ``M = G G^T`` is divided by its Frobenius
norm ``n`` before solving (``alpha = beta / sqrt(n)`` for the solution ``beta`` of the scaled
problem), and the solver starts from the previous step's solution (1 at the first step): a
checkpointed buffer, so resume is exact. It stops when ``||M beta - 1 / beta|| <= tol sqrt(T)`` or
after ``max_iter`` Newton steps. When the tasks' gradients admit no positive solution (e.g. two
exactly opposite gradients: ``f`` is unbounded below) the last iterate is used.

``update_weights_every=k`` (the official option) solves on every ``k``-th step and reuses ``alpha``
in between (the per-task gradients are still needed for the update). The official code clips the
shared parameters' gradient norm to ``max_norm = 1``: ``Trainer(gradient_clip_val=1.0)`` clips all
of them. Under DDP the per-task gradients are averaged across ranks first, so every rank solves the
same problem. Logged weight: ``alpha_i``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting
from .solvers import fair_weights


def nash_weights(gram: Tensor, start: Tensor | None = None, max_iter: int = 100, tol: float = 1e-10) -> Tensor:
    """The solution ``beta > 0`` of ``M beta = 1 / beta`` for ``M = gram`` (Newton on ``1/2 b^T M b - sum log b``):
    FairGrad's ``alpha = 1`` (``fairgrad.fair_weights``)."""
    return fair_weights(gram, 1.0, start, max_iter, tol)


@register_weighting("nash_mtl")
class NashMTL(GradientStrategy):
    """Navon et al. (ICML 2022) Nash bargaining weights on the architecture's ``shared_parameters()``.

    Args:
        update_weights_every: solve every this many steps (reuse ``alpha`` in between).
        max_iter: Newton's iteration cap.
        tol: Newton's tolerance on the scaled residual.
    """

    def __init__(self, update_weights_every: int = 1, max_iter: int = 100, tol: float = 1e-10) -> None:
        super().__init__()
        if update_weights_every < 1:
            raise ValueError(f"NashMTL: update_weights_every must be >= 1, got {update_weights_every}")
        self.update_weights_every = int(update_weights_every)
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("scaled_solution", torch.ones(self.num_tasks, dtype=torch.float64))  # beta (warm start)
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        if int(self.num_steps) % self.update_weights_every == 0:
            gram = (gradients @ gradients.T).double()
            norm = float(torch.linalg.matrix_norm(gram).cpu())
            if norm > 0:
                beta = nash_weights(gram / norm, self.scaled_solution, self.max_iter, self.tol)
                self.scaled_solution.copy_(beta)
                self.alpha.copy_(beta / math.sqrt(norm))
        self.num_steps += 1
        self.last_weights = self.alpha.float().to(self.last_weights.device)
        return self.alpha.to(gradients) @ gradients


__all__ = ["NashMTL", "nash_weights"]
