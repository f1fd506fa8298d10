"""CAGrad: conflict-averse gradient descent.

Liu, B., Liu, X., Jin, X., Stone, P., Liu, Q. "Conflict-Averse Gradient Descent for Multi-task
Learning." NeurIPS 2021.

On the shared parameters, with per-task gradients ``g_i`` (of ``Task.weight_i * L_i``) and their
average ``g_0 = 1/T sum_i g_i``, CAGrad looks for the update ``d`` that maximises the worst task's
first-order improvement ``min_i <g_i, d>`` within a ball around ``g_0``:
``max_d min_i <g_i, d>  s.t.  ||d - g_0|| <= c ||g_0||``. Its dual (the paper's Eq. 3) is a problem
over the simplex,

    w = argmin_{w in simplex}  <g_w, g_0> + c ||g_0|| ||g_w||,   g_w = sum_i w_i g_i,

and the update is ``d = g_0 + (c ||g_0|| / ||g_w||) g_w``, divided by ``1 + c^2`` (``rescale=1``,
the official code's default; ``rescale=0``: not divided; ``2``: divided by ``1 + c``). ``c = 0``
is plain gradient descent on the average loss. Task-specific parameters get their own task's
gradient.

The dual depends only on the Gram matrix ``M = G G^T`` (``T x T``): with ``b = 1/T``,
``F(w) = w^T M b + c sqrt(b^T M b) sqrt(w^T M w + eps)``, convex. Solved in float64 on the CPU by
Frank-Wolfe with away steps (Lacoste-Julien & Jaggi, NeurIPS 2015) and an exact line search (the
minimiser of ``F`` on a segment has a closed form); once the gap is small, Newton's method on the
face of the simplex the iterate lies on finishes the job (Frank-Wolfe alone crawls where
``||g_w||`` nearly vanishes at the optimum and ``F`` bends sharply), instead of the official code's
SciPy SLSQP (no SciPy dependency). It stops when the Frank-Wolfe gap ``grad F(w)^T (w - e_s)`` is at most
``tol`` times the largest ``M_ii`` or after ``max_iter`` steps, from the uniform ``w`` (as the
official code); the KKT conditions of the result are tested. ``eps = 1e-8`` and the ``1e-8``
added to ``||g_0||`` and ``||g_w||`` are the official code's.

The logged weight of task ``i`` is its coefficient in ``d = sum_i (1/T + lambda w_i) g_i / r``
(``lambda = c ||g_0|| / ||g_w||``, ``r`` the rescale divisor). Under DDP the per-task gradients are
averaged across ranks first, so every rank solves the same problem. No state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GradientStrategy, register_weighting

RESCALES = (0, 1, 2)


def _line_minimum(a1: float, q0: float, q1: float, q2: float, coefficient: float, largest: float) -> float:
    """``argmin_{0 <= t <= largest} a1 t + coefficient sqrt(q0 + 2 q1 t + q2 t^2)`` (a convex function of t)."""
    if q2 <= 0 or coefficient <= 0:  # linear along the segment
        return largest if a1 < 0 else 0.0
    k = -a1 / coefficient  # F'(t) = coefficient (h(u) - k), h(u) = q2 u / sqrt(q2 u^2 + D), u = t + q1 / q2
    if k * k >= q2:
        return largest if k > 0 else 0.0
    spread = max(q0 - q1 * q1 / q2, 0.0)
    u = math.copysign(math.sqrt(k * k * spread / (q2 * (q2 - k * k))), k)
    return min(max(u - q1 / q2, 0.0), largest)


def cagrad_weights(gram: Tensor, c: float, max_iter: int = 500, tol: float = 1e-10) -> Tensor:
    """The dual weights ``w = argmin_{w in simplex} w^T M b + c ||g_0|| sqrt(w^T M w + 1e-8)``, float64 on the CPU.

    Frank-Wolfe with away steps, then Newton's method on the support found (see the module docstring).
    """
    M = gram.detach().double().cpu()
    num = M.shape[0]
    b = torch.full((num,), 1.0 / num, dtype=torch.float64)
    m_b = M @ b
    coefficient = c * math.sqrt(max(float(b @ m_b), 0.0) + 1e-8) + 1e-8
    scale = max(float(M.diagonal().max()), 1e-300)

    def gradient(w: Tensor) -> Tensor:
        m_w = M @ w
        return m_b + coefficient * m_w / math.sqrt(float(w @ m_w) + 1e-8)

    w = b.clone()
    for iteration in range(max_iter):
        g = gradient(w)
        toward = int(torch.argmin(g))
        inner = float(g @ w)
        fw_gap = inner - float(g[toward])
        if fw_gap <= tol * scale:
            break
        if iteration % 10 == 9:  # Newton on the current face: quadratic convergence once the face is right
            polished = _newton_on_support(M, m_b, coefficient, w)
            if polished is not None:
                w = polished
                continue
        support = w > 0
        away = int(torch.argmax(torch.where(support, g, torch.full_like(g, -torch.inf))))
        away_gap = float(g[away]) - inner
        if fw_gap >= away_gap:
            direction = -w
            direction[toward] += 1.0
            largest = 1.0
        else:
            direction = w.clone()
            direction[away] -= 1.0
            largest = float(w[away] / (1.0 - w[away]))
        m_w = M @ w
        step = _line_minimum(float(direction @ m_b), float(w @ m_w) + 1e-8, float(direction @ m_w),
                             float(direction @ M @ direction), coefficient, largest)
        w = w + step * direction
        if fw_gap < away_gap and step == largest:
            w[away] = 0.0  # a drop step: exactly onto the face
        w = w.clamp(min=0)
        w = w / w.sum()
    return w


def _newton_on_support(M: Tensor, m_b: Tensor, coefficient: float, w: Tensor, steps: int = 20) -> Tensor | None:
    """Minimise ``F`` over the face of the simplex that ``w``'s support spans, by Newton steps on the KKT system
    ``[[H, 1], [1^T, 0]] [dw; nu] = [-grad F; 0]`` with backtracking; ``None`` if a weight would leave the face
    or no step lowers ``F`` (Frank-Wolfe then goes on)."""
    support = torch.nonzero(w > 0).flatten()
    size = len(support)
    if size < 2:
        return None

    def value(v: Tensor) -> float:
        return float(v @ m_b) + coefficient * math.sqrt(float(v @ M @ v) + 1e-8)

    for _ in range(steps):
        m_w = M @ w
        norm = math.sqrt(float(w @ m_w) + 1e-8)
        grad = (m_b + coefficient * m_w / norm)[support]
        hessian = coefficient * (M / norm - torch.outer(m_w, m_w) / norm ** 3)[support][:, support]
        system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
        system[:size, :size] = hessian
        system[:size, size] = 1.0
        system[size, :size] = 1.0
        rhs = torch.cat([-grad, torch.zeros(1, dtype=torch.float64)])
        move = torch.linalg.lstsq(system, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)[:size]
        if float(move.abs().max()) <= 1e-15:
            return w
        step, current = 1.0, value(w)
        while step > 1e-10:
            candidate = w.clone()
            candidate[support] += step * move
            if bool((candidate[support] > 0).all()) and value(candidate) <= current:
                break
            step /= 2
        else:
            return None
        w = candidate / candidate.sum()
    return w


@register_weighting("cagrad")
class CAGrad(GradientStrategy):
    """Liu et al. (NeurIPS 2021) conflict-averse update on the architecture's ``shared_parameters()``.

    Args:
        c: the radius factor ``c >= 0`` of the ball around ``g_0`` (the paper uses 0.4 on NYUv2).
        rescale: ``0``, ``1`` (default, divide by ``1 + c^2``) or ``2`` (divide by ``1 + c``).
        max_iter: the Frank-Wolfe solver's iteration cap.
        tol: the Frank-Wolfe solver's relative gap.
    """

    def __init__(self, c: float = 0.4, rescale: int = 1, max_iter: int = 500, tol: float = 1e-10) -> None:
        super().__init__()
        if c < 0:
            raise ValueError(f"CAGrad: c must be >= 0, got {c}")
        if rescale not in RESCALES:
            raise ValueError(f"CAGrad: rescale must be one of {RESCALES}, got {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        gram = (gradients @ gradients.T).double()
        w = cagrad_weights(gram, self.c, self.max_iter, self.tol)
        num = gradients.shape[0]
        mean_norm = math.sqrt(max(float(gram.mean().cpu()), 0.0) + 1e-8)  # ||g_0||, as the official code
        gw_norm = math.sqrt(max(float(w @ gram.cpu() @ w), 0.0))
        lam = (self.c * mean_norm + 1e-8) / (gw_norm + 1e-8)
        divisor = (1.0, 1.0 + self.c ** 2, 1.0 + self.c)[self.rescale]
        coefficients = (1.0 / num + lam * w) / divisor  # (T,)
        self.last_weights = coefficients.float().to(self.last_weights.device)
        return coefficients.to(gradients) @ gradients


__all__ = ["CAGrad", "cagrad_weights"]
