"""GradDrop: gradient sign dropout.

Chen, Z., Ngiam, J., Huang, Y., Luong, T., Kretzschmar, H., Chai, Y., Anguelov, D. "Just Pick a
Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout." NeurIPS 2020.

At every unit where the tasks' gradients meet, GradDrop keeps only the gradients of one sign,
chosen at random in proportion to how much of the total gradient has that sign. With ``∇_i`` the
per-task gradients at the units:

* the gradient positive sign purity ``P = 1/2 (1 + sum_i ∇_i / sum_i |∇_i|)`` (in ``[0, 1]``;
  ``1/2`` where every ``∇_i`` is 0);
* ``U ~ Uniform(0, 1)`` per unit; ``M_i = 1[P > U] 1[∇_i > 0] + 1[P < U] 1[∇_i < 0]``;
* the new gradient ``sum_i (leak + (1 - leak) M_i) ∇_i`` (``leak = 0``: pure sign dropout; the
  paper's leak lets a fraction of every gradient through).

Where the units are (an open choice here): the paper inserts GradDrop at a layer's activations ``Z``
(``representation=`` the submodule whose output the tasks share, e.g. ``"experts"`` for MMoE), where
``∇_i`` is the batch sum of ``sign(Z) * grad_Z o_i`` (the paper's sign correction for a layer whose
input may be negative) and the masks, one per unit, apply to every row's ``grad_Z o_i``; the
parameters upstream of ``Z`` then get ``J_Z^T`` of the new gradient, each tower its own task's
gradient (``T`` backward passes down to ``Z`` plus one). Without ``representation`` (the default,
so that ``weighting="graddrop"`` works for every architecture) the units are the coordinates of the
architecture's ``shared_parameters()`` and ``∇_i`` their per-task gradients (already summed over
the batch; ``T`` backward passes), like the other gradient strategies. ``o_i = Task.weight_i L_i``.

The uniform draws come from the strategy's own generator seeded with ``seed`` (checkpointed, the
same on every DDP rank); under DDP ``∇_i`` (per-parameter gradients, or the batch sums at ``Z``) is
averaged across ranks before ``P``, so every rank keeps the same signs. Logged weight: ``Task.weight``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, RepresentationCapture, _requires_backward, distributed_mean, register_weighting


def sign_dropout_masks(gradients: Tensor, uniform: Tensor) -> Tensor:
    """GradDrop's masks ``M_i`` ``(T, ...)`` from the per-task gradients at the units ``(T, ...)`` and ``U``."""
    total, magnitude = gradients.sum(dim=0), gradients.abs().sum(dim=0)
    purity = 0.5 * (1 + torch.where(magnitude > 0, total / magnitude.clamp(min=1e-30), torch.zeros_like(total)))
    return ((purity > uniform) & (gradients > 0)) | ((purity < uniform) & (gradients < 0))


@register_weighting("graddrop")
class GradDrop(GradientStrategy):
    """Chen et al. (NeurIPS 2020) gradient sign dropout (see the module docstring).

    Args:
        leak: the fraction of every task's gradient that always passes, in ``[0, 1]``.
        representation: the submodule whose output the masks apply to (default: the shared parameters).
        seed: the seed of the strategy's generator.
    """

    representation_arguments = {"representation": "<submodule>"}

    def __init__(self, leak: float = 0.0, representation: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"GradDrop: leak must be in [0, 1], got {leak}")
        self.leak = float(leak)
        self.representation = representation
        self.reads = "shared_gradients" if representation is None else "representation_gradients"
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._representation: RepresentationCapture | None = None

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        if self.representation is not None:
            self._representation = RepresentationCapture(model, self.representation, "GradDrop")

    def _uniform(self, shape: torch.Size, like: Tensor) -> Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64).to(like.device, like.dtype)

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        masks = sign_dropout_masks(gradients, self._uniform(gradients.shape[1:], gradients))
        return ((self.leak + (1 - self.leak) * masks.to(gradients.dtype)) * gradients).sum(dim=0)

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        if self._representation is None:
            return super().total_loss(losses, per_task)
        self.last_weights = self._task_weights().to(losses)
        objectives = [self.objective(i, loss) for i, loss in enumerate(per_task)]
        value = torch.stack(objectives).sum()
        if not _requires_backward(losses):
            self._representation.output = None
            return value
        representation = self._representation.take()
        gradients = RepresentationCapture.gradients(objectives, representation)
        rows = torch.stack([g.float() for g in gradients])  # (T, B, ...)
        signs = torch.sign(representation.detach().float())
        signed = distributed_mean((rows * signs).sum(dim=1))  # (T, ...): the sign-corrected batch sums
        masks = sign_dropout_masks(signed, self._uniform(signed.shape[1:], signed))[:, None]  # (T, 1, ...)
        combined = ((self.leak + (1 - self.leak) * masks.float()) * rows).sum(dim=0)
        return value + RepresentationCapture.surrogate(representation, list(rows), combined)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())


__all__ = ["GradDrop", "sign_dropout_masks"]
