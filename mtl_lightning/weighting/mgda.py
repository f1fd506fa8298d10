"""MGDA: multi-task learning as multi-objective optimisation, through the min-norm point of the task gradients.

Sener, O., Koltun, V. "Multi-Task Learning as Multi-Objective Optimization." NeurIPS 2018.

Every step, with ``g_i`` the gradient of task ``i``'s objective ``Task.weight_i * L_i`` on the
architecture's ``shared_parameters()`` and ``ĝ_i = g_i / n_i`` its normalised form, the weights are
the min-norm point of the convex hull of the ``ĝ_i``:

    alpha = argmin_{alpha in simplex} || sum_i alpha_i ĝ_i ||^2

and the shared parameters' gradient is ``sum_i alpha_i g_i`` (the raw gradients: the official code
scales the raw losses by ``alpha``); every task-specific parameter gets its own task's gradient
(the paper's Algorithm 2). ``-sum_i alpha_i ĝ_i`` decreases every task's loss to first order, or is
0 at a Pareto-stationary point.

Solver: the min-norm point of the ``ĝ_i``'s convex hull from their Gram matrix ``M = Ĝ Ĝ^T``
(``T x T``, float64 on the CPU: one host sync per step), exactly, by Wolfe's min-norm-point algorithm
(fully corrective Frank-Wolfe): ``mtl_lightning.weighting.solvers.min_norm_weights``, whose docstring says
how. It starts from the shortest ``ĝ_i``, so MGDA keeps no state.

Normalisation ``n_i`` (``normalization``, the official code's options; the paper's Algorithm 2
has none, the default): ``"none"`` (1), ``"l2"`` (``||g_i||``), ``"loss"`` (``L_i``),
``"loss+"`` (``L_i ||g_i||``). A zero ``n_i`` counts as 1.

MGDA-UB (``upper_bound=True``), the paper's Section 3.3: the per-task gradients are taken with
respect to the shared representation ``Z`` instead of the shared parameters: ``Z`` is the output of
the architecture's submodule ``representation`` (a dotted path, e.g. ``"experts"`` for MMoE, whose
expert outputs ``(B, E, H)`` every task reads, or ``"bottom"`` for a shared bottom). That costs
``T`` backward passes from the losses down to ``Z`` (the towers only) and one backward of the
whole network, instead of ``T`` whole ones: the parameters upstream of ``Z`` get
``J_Z^T sum_i alpha_i grad_Z o_i`` and the task-specific ones their own task's gradient (the
returned surrogate is ``sum_i o_i + <Z, sum_i (alpha_i - 1) grad_Z o_i>``). A parameter that also
reaches the losses without passing through ``Z`` (MMoE's gates read the embedding directly) gets
the plain ``sum_i grad o_i`` along that path.

Under DDP the per-task gradients (the Gram matrix of the representation gradients for MGDA-UB, whose
rows differ per rank: its rank average is proportional to the global one, and ``alpha`` is
scale-invariant) and the losses are averaged across ranks before solving, so every rank computes
the same ``alpha``. Logged weight: ``alpha_i``. Cost: ``T`` backward passes (MGDA-UB: ``T`` down to
``Z`` plus one), and the solve.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, RepresentationCapture, _requires_backward, distributed_mean, register_weighting
from .solvers import min_norm_weights

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def gradient_normalizers(gram: Tensor, losses: Tensor | None, normalization: str) -> Tensor:
    """``n_i`` of the official code's ``gradient_normalizers`` from the Gram matrix's diagonal and the losses."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    if normalization == "none":
        scale = torch.ones_like(norms)
    elif normalization == "l2":
        scale = norms
    else:
        if losses is None:
            raise ValueError(f"MGDA normalization={normalization!r} needs the task losses")
        scale = losses.to(norms) * (norms if normalization == "loss+" else 1.0)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@register_weighting("mgda")
class MGDA(GradientStrategy):
    """Sener & Koltun (NeurIPS 2018): the min-norm convex combination of the task gradients (see the module doc).

    Args:
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``.
        upper_bound: MGDA-UB: gradients with respect to the output of ``representation``.
        representation: the submodule path whose output is ``Z`` (needed with ``upper_bound``).
        max_iter: the solver's cap on added vertices.
        tol: the solver's relative Frank-Wolfe gap.
    """

    representation_arguments = {"upper_bound": True, "representation": "<submodule>"}

    def __init__(self, normalization: str = "none", upper_bound: bool = False, representation: str | None = None,
                 max_iter: int = 250, tol: float = 1e-12) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"MGDA: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if upper_bound and not representation:
            raise ValueError("MGDA: upper_bound=True needs representation=<the submodule whose output is the shared "
                             "representation Z>, e.g. 'experts' for MMoE or 'bottom' for shared_bottom")
        if max_iter < 1 or tol < 0:
            raise ValueError(f"MGDA: max_iter must be >= 1 and tol >= 0, got {max_iter}, {tol}")
        self.normalization = normalization
        self.upper_bound = bool(upper_bound)
        self.representation = representation
        self.reads = "representation_gradients" if self.upper_bound else "shared_gradients"  # MGDA-UB: at Z only
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self._representation: RepresentationCapture | None = None

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        if self.upper_bound:
            self._representation = RepresentationCapture(model, self.representation, "MGDA")  # type: ignore[arg-type]

    def solve(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        """``alpha`` from the raw Gram matrix (normalised here); sets ``last_weights``."""
        scale = gradient_normalizers(gram.double(), losses, self.normalization)
        alpha = min_norm_weights(gram.double() / torch.outer(scale, scale), self.max_iter, self.tol)
        self.last_weights = alpha.float().to(self.last_weights.device)
        return alpha

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        alpha = self.solve(gradients @ gradients.T, losses)
        return alpha.to(gradients) @ gradients

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        if self._representation is None:
            return super().total_loss(losses, per_task)
        objectives = [self.objective(i, loss) for i, loss in enumerate(per_task)]
        value = torch.stack(objectives).sum()
        if not _requires_backward(losses):
            self._representation.output = None
            return value
        representation = self._representation.take()
        rows = RepresentationCapture.gradients(objectives, representation)
        flat = torch.stack([g.reshape(-1).float() for g in rows])  # (T, B * ...)
        alpha = self.solve(distributed_mean(flat @ flat.T), distributed_mean(losses.float())).to(flat)
        combined = sum((a * g.float() for a, g in zip(alpha, rows)), torch.zeros_like(rows[0], dtype=torch.float))
        return value + RepresentationCapture.surrogate(representation, rows, combined)


__all__ = ["MGDA", "min_norm_weights", "gradient_normalizers"]
