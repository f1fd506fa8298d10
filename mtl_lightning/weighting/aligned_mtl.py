"""Aligned-MTL: independent component alignment of the task gradients.

Senushkin, D., Patakin, N., Kuznetsov, A., Konushin, A. "Independent Component Alignment for
Multi-Task Learning." CVPR 2023.

Conflicts and dominance among task gradients show up as a badly conditioned gradient matrix
``G`` (``T x P``, one row per task). Aligned-MTL replaces ``G`` by the matrix ``Ĝ = B G`` with the
same singular vectors and every singular value equal to the smallest one, ``sigma_min``: its rows
are orthogonal and of equal norm (condition number 1). With the eigendecomposition of the Gram
matrix ``G G^T = V Lambda V^T``, keeping the eigenvalues above a rank tolerance (``R`` of them),

    B = sqrt(lambda_R) V_R Lambda_R^{-1/2} V_R^T,

and the shared parameters' update is ``Ĝ^T w = G^T (B w)`` with the paper's pre-defined task
weights ``w`` (here ``Task.weight``, 1 by default). ``sigma_min = sqrt(lambda_R)`` sets the
update's scale. Task-specific parameters get their own task's gradient (of ``Task.weight_i L_i``).

The gradients aligned are those of the raw losses ``L_i`` (the strategy divides the per-task
gradients of ``Task.weight_i L_i`` by ``Task.weight_i``, which must be positive): the weights act
after the alignment, as the paper's ``w``, not before it (where the alignment would undo them).
Rank tolerance (an open choice; the official code's): ``lambda_max * T * eps`` with float32's
``eps`` (the Gram matrix is accumulated in float32); the eigendecomposition is in float64 on the CPU.
The paper's Aligned-MTL-UB (alignment of the representation's gradients) is not implemented.
Under DDP the per-task gradients are averaged across ranks first, so every rank computes the same
``B``. Logged weight: the coefficient ``(B w)_i`` of each raw task gradient. No state.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting


def alignment_matrix(gram: Tensor, eps: float = torch.finfo(torch.float32).eps) -> Tensor:
    """``B = sqrt(lambda_min) V Lambda^{-1/2} V^T`` over the eigenvalues above ``lambda_max * T * eps``; float64."""
    M = gram.detach().double().cpu()
    eigenvalues, vectors = torch.linalg.eigh(M)
    keep = eigenvalues > eigenvalues.max().clamp(min=0) * M.shape[0] * eps
    if not bool(keep.any()):
        return torch.zeros_like(M)
    eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
    return eigenvalues.min().sqrt() * (vectors / eigenvalues.sqrt()) @ vectors.T


@register_weighting("aligned_mtl")
class AlignedMTL(GradientStrategy):
    """Senushkin et al. (CVPR 2023) gradient alignment on the architecture's ``shared_parameters()``."""

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        weights = self._task_weights()
        if (weights <= 0).any():
            raise ValueError(f"AlignedMTL: every Task.weight must be > 0 (they weigh the aligned gradients), got "
                             f"{weights.tolist()}")

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        weights = self._task_weights().to(gradients)
        raw = gradients / weights[:, None]  # gradients of the unweighted losses
        coefficients = alignment_matrix(raw @ raw.T) @ weights.double().cpu()
        self.last_weights = coefficients.float().to(self.last_weights.device)
        return coefficients.to(raw) @ raw


__all__ = ["AlignedMTL", "alignment_matrix"]
