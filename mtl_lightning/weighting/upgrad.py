"""UPGrad: unconflicting projection of gradients (Jacobian descent).

Quinton, P., Rey, V. "Jacobian Descent for Multi-Objective Optimization." arXiv:2406.16232, 2024.

Every task's share ``g_i / T`` of the average gradient is projected onto the *dual cone* of the task
gradients, ``{x : <g_j, x> >= 0 for every j}`` (the directions that increase no task's loss), and the
projections are summed. The sum lies in the dual cone too (it is convex), so the update conflicts with
no task, and where the gradients do not conflict it is the plain average ``sum_i g_i / T``.

With ``J`` the ``T x P`` matrix of the gradients (of ``Task.weight_i * L_i`` on the shared parameters)
and ``M = J J^T``, the projection of ``J^T u`` is ``J^T v`` with ``v`` the solution of the quadratic
program ``min_v v^T M v  s.t.  v >= u`` (the paper's Proposition 1), so the update is ``J^T w``,
``w = sum_i v^(i)`` with ``u = e_i / T``. As the official implementation (TorchJD), ``M`` is divided
by its trace (``||J||_F^2``; all zeros when that is below ``norm_eps``) and ``reg_eps * I`` is added so
that it is positive definite. Each program is solved exactly in float64 on the CPU: with the Cholesky
factor ``M = L L^T`` and ``v = u + s``, it is the non-negative least-squares problem
``min_{s >= 0} ||L^T s + L^T u||`` (Lawson & Hanson's active-set algorithm; the official code calls the
``quadprog`` solver, a dependency this avoids). Task-specific parameters get their own task's gradient.
Under DDP the per-task gradients are averaged across ranks first. Logged weight: ``w_i``. No state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientStrategy, register_weighting


def nonnegative_least_squares(A: Tensor, b: Tensor, tol: float = 1e-12) -> Tensor:
    """``argmin_{x >= 0} ||A x - b||`` (Lawson & Hanson 1974), float64; ``A`` is ``(m, n)``."""
    n = A.shape[1]
    x = torch.zeros(n, dtype=torch.float64)
    passive: list[int] = []
    for _ in range(3 * n + 10):
        gradient = A.T @ (b - A @ x)  # the negative gradient of 1/2 ||Ax - b||^2
        candidates = [j for j in range(n) if j not in passive and float(gradient[j]) > tol]
        if not candidates:
            break
        passive.append(max(candidates, key=lambda j: float(gradient[j])))
        while True:
            z = torch.zeros(n, dtype=torch.float64)
            z[passive] = torch.linalg.lstsq(A[:, passive], b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            if all(float(z[j]) > 0 for j in passive):
                x = z
                break
            ratios = {j: float(x[j] / (x[j] - z[j])) for j in passive if float(z[j]) <= 0}
            drop = min(ratios, key=ratios.__getitem__)
            x = x + ratios[drop] * (z - x)
            x[drop] = 0.0
            passive = [j for j in passive if j != drop and float(x[j]) > 0]
            x[[j for j in range(n) if j not in passive]] = 0.0
    return x


def upgrad_weights(gram: Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Tensor:
    """``w = sum_i v^(i)``, ``v^(i) = argmin_{v >= e_i / T} v^T M v``, for the normalised, regularised Gram matrix."""
    M = gram.detach().double().cpu()
    num = M.shape[0]
    trace = float(M.diagonal().sum())
    M = torch.zeros_like(M) if trace < norm_eps else M / trace
    M = M + reg_eps * torch.eye(num, dtype=torch.float64)
    factor = torch.linalg.cholesky(M).T  # L^T, M = L L^T
    weights = torch.zeros(num, dtype=torch.float64)
    for i in range(num):
        u = torch.zeros(num, dtype=torch.float64)
        u[i] = 1.0 / num
        weights += u + nonnegative_least_squares(factor, -(factor @ u))
    return weights


@register_weighting("upgrad")
class UPGrad(GradientStrategy):
    """Quinton & Rey (2024) unconflicting projection of gradients (see the module docstring).

    Args:
        norm_eps: below this squared Frobenius norm of ``J`` the Gram matrix counts as 0 (TorchJD's 1e-4).
        reg_eps: the multiple of the identity added to the normalised Gram matrix (TorchJD's 1e-4).
    """

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        super().__init__()
        if norm_eps < 0 or reg_eps <= 0:
            raise ValueError(f"UPGrad: norm_eps must be >= 0 and reg_eps > 0, got {norm_eps}, {reg_eps}")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        weights = upgrad_weights(gradients @ gradients.T, self.norm_eps, self.reg_eps)
        self.last_weights = weights.float().to(self.last_weights.device)
        return weights.to(gradients) @ gradients


__all__ = ["UPGrad", "upgrad_weights", "nonnegative_least_squares"]
