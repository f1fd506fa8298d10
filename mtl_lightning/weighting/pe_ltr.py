"""PE-LTR: Pareto-efficient weights with lower bounds, for e-commerce ranking objectives.

Lin, X., Chen, H., Pei, C., Sun, F., Xiao, X., Sun, H., Zhang, Y., Ou, W., Jiang, P. "A Pareto-Efficient
Algorithm for Multiple Objective Optimization in E-Commerce Recommendation." RecSys 2019.

The model minimises ``sum_i omega_i L_i`` (one ordinary backward: every parameter sees the weights). The
weights are the min-norm point of the task gradients under lower bounds ``c_i`` that keep every objective
in play (the paper's Eq. 8):

    min_omega || sum_i omega_i g_i ||^2   s.t.  sum_i omega_i = 1,  omega_i >= c_i

with ``g_i`` the gradient of ``Task.weight_i * L_i`` on the architecture's ``shared_parameters()``
(the paper writes the gradients of the model parameters; the min-norm point only concerns the shared
ones). With ``omega = c + omega_hat`` and ``M = G G^T``, the paper's PECsolver (Algorithm 2):

1. solve the problem without ``omega_hat >= 0`` in closed form: the KKT system
   ``[[M, 1], [1^T, 0]] [omega_hat; mu] = [-M c; 1 - sum_i c_i]``, by the pseudo-inverse (the paper's
   ``(A^T A)^{-1} A^T z``, which is singular for parallel gradients);
2. project ``omega_hat`` onto ``{x >= 0, sum_i x_i = 1 - sum_i c_i}`` (Euclidean, the paper's
   non-negative least squares step; exact here by sorting) and return ``c + x``.

That two-step answer is the exact minimiser when the relaxed solution is already feasible, and an
approximation otherwise. ``solver="exact"`` solves Eq. 8 exactly instead: with ``s = 1 - sum_i c_i``
and ``omega = c + s alpha`` (``alpha`` in the simplex) it is the min-norm point of the convex hull of
the shifted gradients ``G^T c + s g_i``, solved by MGDA's Wolfe min-norm-point algorithm (the KKT
conditions of the result are tested).

Choices the paper leaves open, and how they are made here:

* the order (the paper's Algorithm 1): the model steps with the current ``omega`` (``1/T`` at the
  start), then ``omega`` is solved from this step's gradients for the next step; ``omega`` is a
  checkpointed buffer;
* ``M`` is divided by its largest diagonal entry before solving (the solution is scale-invariant; the
  pseudo-inverse's cutoff is not);
* the bounds: ``lower_bounds`` is one number for every task or ``{task: c}`` (tasks not named: 0); the
  paper sets them by hand per business goal. ``sum_i c_i < 1`` is required (at 1 the weights are fixed).

Cost: ``T`` backward passes down to the shared parameters plus the ordinary one. Under DDP the per-task
gradients are averaged across ranks first, so every rank solves the same problem. Logged weight:
``omega_i Task.weight_i``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, _requires_backward, distributed_mean, flat_gradient, register_weighting
from .solvers import min_norm_weights, project_to_simplex

SOLVERS = ("pec", "exact")


def pec_weights(gram: Tensor, bounds: Tensor) -> Tensor:
    """The paper's PECsolver: the relaxed KKT solution projected onto ``{omega >= c, sum omega = 1}``; float64."""
    M = gram.detach().double().cpu()
    c = bounds.double().cpu()
    num = M.shape[0]
    scale = float(M.diagonal().max())
    M = M / scale if scale > 0 else M
    system = torch.zeros(num + 1, num + 1, dtype=torch.float64)
    system[:num, :num] = M
    system[:num, num] = 1.0
    system[num, :num] = 1.0
    rhs = torch.cat([-M @ c, (1 - c.sum()).reshape(1)])
    relaxed = (torch.linalg.pinv(system) @ rhs)[:num]  # omega_hat without omega_hat >= 0
    free = float(1 - c.sum())
    return c + free * project_to_simplex(relaxed / free)


def exact_weights(gram: Tensor, bounds: Tensor) -> Tensor:
    """``argmin ||G^T omega||^2`` over ``{omega >= c, sum omega = 1}`` exactly (MGDA's min-norm solver on the shifted
    gradients ``G^T c + s g_i``, ``s = 1 - sum c``); float64."""
    M = gram.detach().double().cpu()
    c = bounds.double().cpu()
    free = float(1 - c.sum())
    m_c = M @ c
    shifted = float(c @ m_c) + free * (m_c[:, None] + m_c[None, :]) + free ** 2 * M  # <G^T c + s g_i, G^T c + s g_j>
    return c + free * min_norm_weights(shifted)


@register_weighting("pe_ltr")
class PELTR(WeightingStrategy):
    """Lin et al. (RecSys 2019) Pareto-efficient weights with lower bounds on the architecture's
    ``shared_parameters()``.

    Args:
        lower_bounds: ``c``: one number for every task, or ``{task: c}``; each ``>= 0``, summing to less than 1.
        solver: ``"pec"`` (the paper's relaxed solution and projection, default) or ``"exact"``.
    """

    reads = "shared_gradients"

    def __init__(self, lower_bounds: float | Mapping[str, float] = 0.0, solver: str = "pec") -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"PELTR: solver must be one of {SOLVERS}, got {solver!r}")
        values = lower_bounds.values() if isinstance(lower_bounds, Mapping) else [lower_bounds]
        if any(float(v) < 0 for v in values):
            raise ValueError(f"PELTR: lower_bounds must be >= 0, got {lower_bounds}")
        self.lower_bounds = dict(lower_bounds) if isinstance(lower_bounds, Mapping) else float(lower_bounds)
        self.solver = solver

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        if isinstance(self.lower_bounds, dict):
            unknown = sorted(set(self.lower_bounds) - set(self.task_names))
            if unknown:
                raise ValueError(f"PELTR: lower_bounds names unknown tasks {unknown}; tasks: {self.task_names}")
            bounds = [float(self.lower_bounds.get(name, 0.0)) for name in self.task_names]
        else:
            bounds = [self.lower_bounds] * self.num_tasks
        if sum(bounds) >= 1:
            raise ValueError(f"PELTR: the lower bounds must sum to less than 1, got {sum(bounds)} ({bounds})")
        shared = [p for p in model.shared_parameters() if p.requires_grad]  # type: ignore[operator]
        if not shared:
            raise ValueError(f"PELTR needs shared parameters; {type(model).__name__}.shared_parameters() returned none")
        self._shared = shared
        self.register_buffer("bounds", torch.tensor(bounds, dtype=torch.float64), persistent=False)
        self.register_buffer("weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def solve(self, gram: Tensor) -> Tensor:
        """The next step's ``omega`` from the Gram matrix of this step's gradients (stored and returned)."""
        solve = pec_weights if self.solver == "pec" else exact_weights
        weights = solve(gram, self.bounds)
        self.weights.copy_(weights)
        return weights

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        task_weights = self._task_weights().to(losses)
        total = self._weighted_sum(self.weights.to(losses) * task_weights, losses)  # this step: the current omega
        if _requires_backward(losses):
            rows = torch.stack([flat_gradient(torch.autograd.grad(float(w) * loss, self._shared, retain_graph=True,
                                                                  allow_unused=True), self._shared)
                                for w, loss in zip(task_weights.tolist(), per_task)])
            rows = distributed_mean(rows)
            self.solve(rows @ rows.T)
        return total


__all__ = ["PELTR", "pec_weights", "exact_weights"]
