"""Solvers shared by several weighting strategies: small problems on the ``T x T`` Gram matrix of the task
gradients (or a ``T``-vector), solved in float64 on the CPU. No strategy imports another strategy's module.

* :func:`min_norm_weights`: ``argmin_{alpha in simplex} alpha^T M alpha``, the min-norm point of the
  convex hull of the task gradients (MGDA, PE-LTR).
* :func:`project_to_simplex`: the Euclidean projection onto the probability simplex (MoCo, MoDo,
  SDMGrad, PE-LTR).
* :func:`fair_weights`: the ``w > 0`` solving ``M w = w^(-1/alpha)``, the alpha-fair allocation
  (FairGrad; Nash-MTL at ``alpha = 1``).

``min_norm_weights``. The problem depends only on ``M`` (``T x T``; one host sync per step). MGDA's
paper (Sener & Koltun, Algorithm 2) runs Frank-Wolfe (move towards the vertex ``e_t``,
``t = argmin_i (M alpha)_i``, by the exact line search of its Algorithm 1), which approaches the
solution at an ``O(1/k)`` rate. Here Frank-Wolfe is made *fully corrective*: Wolfe's min-norm-point
algorithm (Wolfe, Math. Programming 1976) adds the same vertex ``e_t`` to an active set and then moves
to the min-norm point of the active set's affine hull (one ``(k+1) x (k+1)`` linear solve), dropping
vertices whose weight would turn negative. It ends after finitely many steps at the exact min-norm
point, where the Frank-Wolfe gap ``alpha^T M alpha - min_i (M alpha)_i`` is 0 (the KKT conditions;
tests/weighting/test_gradient_solvers.py checks them to 1e-10). It stops once the gap is at most ``tol`` times the
largest ``M_ii``, or after ``max_iter`` vertices. It starts from the vertex of the smallest ``M_ii``
(the paper's initialisation, 1/T, would need a warm-start state Wolfe's method has no use for), so a
caller keeps no state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def min_norm_weights(gram: Tensor, max_iter: int = 250, tol: float = 1e-12) -> Tensor:
    """``argmin_{alpha in simplex} alpha^T M alpha`` for a PSD ``gram = M`` (``T x T``); float64, on the CPU.

    Wolfe's min-norm-point algorithm: fully corrective Frank-Wolfe (see the module docstring).
    ``tol`` is relative to the largest diagonal entry of ``M``.
    """
    M = gram.detach().double().cpu()
    num = M.shape[0]
    scale = max(float(M.diagonal().max()), 1e-300)
    first = int(torch.argmin(M.diagonal()))
    support = [first]
    alpha = torch.zeros(num, dtype=torch.float64)
    alpha[first] = 1.0
    for _ in range(max_iter):
        m_alpha = M @ alpha  # (M alpha)_i = <g_i, x> for the current point x = G^T alpha
        toward = int(torch.argmin(m_alpha))
        if float(alpha @ m_alpha - m_alpha[toward]) <= tol * scale or toward in support:
            break  # the Frank-Wolfe gap is 0: the KKT conditions hold
        support.append(toward)
        for _ in range(num):  # minor cycle: the affine minimiser of the support, kept inside the simplex
            affine = _affine_min_norm(M, support)
            if all(float(affine[i]) > 0 for i in support):
                alpha = affine
                break
            ratios = {i: float(alpha[i] / (alpha[i] - affine[i])) for i in support if float(affine[i]) <= 0}
            drop = min(ratios, key=ratios.__getitem__)  # the first weight to reach 0 on the way to ``affine``
            alpha = alpha + ratios[drop] * (affine - alpha)
            alpha[drop] = 0.0
            support = [i for i in support if i != drop and float(alpha[i]) > 0]
            alpha[[i for i in range(num) if i not in support]] = 0.0
            alpha = alpha / alpha.sum()
    return alpha


def _affine_min_norm(M: Tensor, support: list[int]) -> Tensor:
    """The weights (summing to 1, zero off ``support``) of the min-norm point of the affine hull of ``support``."""
    size = len(support)
    system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
    system[:size, :size] = M[support][:, support]
    system[:size, size] = 1.0
    system[size, :size] = 1.0
    rhs = torch.zeros(size + 1, dtype=torch.float64)
    rhs[size] = 1.0
    solution = torch.linalg.lstsq(system, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    weights = torch.zeros(M.shape[0], dtype=torch.float64)
    weights[support] = solution[:size] / solution[:size].sum()
    return weights



def project_to_simplex(vector: Tensor) -> Tensor:
    """The Euclidean projection of ``vector`` onto the probability simplex (sort-based, exact)."""
    ordered, _ = torch.sort(vector, descending=True)
    cumulative = ordered.cumsum(0) - 1
    index = torch.arange(1, len(vector) + 1, dtype=vector.dtype, device=vector.device)
    count = int((ordered - cumulative / index > 0).sum())
    return (vector - cumulative[count - 1] / count).clamp(min=0)


def fair_weights(gram: Tensor, alpha: float = 1.0, start: Tensor | None = None, max_iter: int = 100,
                 tol: float = 1e-10) -> Tensor:
    """The solution ``w > 0`` of ``M w = w^(-1/alpha)`` for ``M = gram``, by Newton's method (float64, CPU)."""
    M = gram.detach().double().cpu()
    num = M.shape[0]
    w = torch.ones(num, dtype=torch.float64) if start is None else start.detach().double().cpu().clone()
    if not bool((w > 0).all()):
        w = torch.ones(num, dtype=torch.float64)
    power = 1.0 / alpha

    def objective(v: Tensor) -> float:
        concave = torch.log(v).sum() if alpha == 1.0 else (v ** (1 - power)).sum() / (1 - power)
        return float(0.5 * v @ M @ v - concave)

    for _ in range(max_iter):
        residual = M @ w - w ** (-power)
        if float(residual.norm()) <= tol * math.sqrt(num):
            break
        move = -torch.linalg.solve(M + torch.diag(power * w ** (-power - 1)), residual)
        step, current, slope = 1.0, objective(w), float(residual @ move)
        while step > 1e-12:
            candidate = w + step * move
            if bool((candidate > 0).all()) and objective(candidate) <= current + 1e-4 * step * slope:
                break
            step /= 2
        else:
            break
        w = candidate
    return w


__all__ = ["min_norm_weights", "project_to_simplex", "fair_weights"]
