"""ExcessMTL: robust multi-task learning with excess risks.

He, Y., Zhou, S., Zhang, G., Yun, H., Xu, Y., Zeng, B., Chilimbi, T., Zhao, H. "Robust Multi-Task
Learning with Excess Risks." ICML 2024.

Loss-based weighting favours tasks with large losses, even when the loss is large because the task is
noisy (label noise) and no more training can lower it. ExcessMTL weighs the tasks by their *excess*
risk, the distance of the loss from its optimum, estimated to second order from the gradient:
``e_i = g_i^T H_i^{-1} g_i`` with ``g_i`` the gradient of ``Task.weight_i * L_i`` on the shared
parameters and ``H_i`` the diagonal AdaGrad approximation ``diag(sqrt(sum over steps of g_i^2 + 1e-7))``
(the official code's). The weights follow exponentiated gradient ascent on the excess risks,
normalised by each task's first estimate:

    lambda_i <- lambda_i exp(eta e_i / e_i(0)),   then lambda <- T lambda / sum(lambda)

(``lambda`` starts at 1; ``eta``, the official ``robust_step_size``, 0.01), and the model minimises
``sum_i lambda_i Task.weight_i L_i`` by one ordinary backward pass, so every parameter (shared and
task-specific) sees the weights. ``e_i(0)`` is the task's first positive estimate; until it has one its
weight does not move (a task without a valid row in the first batch has a zero gradient).

Cost: ``T`` backward passes down to the shared parameters for the estimates, plus the ordinary one.
Under DDP the per-task gradients are averaged across ranks first, so every rank holds the same
accumulators and weights. Checkpointed state: the squared-gradient sums ``(T, P)``, ``e(0)`` and
``lambda``. Logged weight: ``lambda_i Task.weight_i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, _requires_backward, distributed_mean, flat_gradient, register_weighting


@register_weighting("excess_mtl")
class ExcessMTL(WeightingStrategy):
    """He et al. (ICML 2024) excess-risk weighting on the architecture's ``shared_parameters()``.

    Args:
        step_size: ``eta`` of the exponentiated update (the official ``robust_step_size``).
    """

    takes_shared_gradients = True

    def __init__(self, step_size: float = 0.01) -> None:
        super().__init__()
        if step_size < 0:
            raise ValueError(f"ExcessMTL: step_size must be >= 0, got {step_size}")
        self.step_size = float(step_size)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        shared = [p for p in model.shared_parameters() if p.requires_grad]  # type: ignore[operator]
        if not shared:
            raise ValueError(f"ExcessMTL needs shared parameters; {type(model).__name__}.shared_parameters() "
                             "returned none")
        self._shared = shared
        self.register_buffer("squared_sums", torch.zeros(self.num_tasks, sum(p.numel() for p in shared)))
        self.register_buffer("initial_risks", torch.zeros(self.num_tasks))
        self.register_buffer("weights", torch.ones(self.num_tasks))

    def excess_risks(self, gradients: Tensor) -> Tensor:
        """``e_i = g_i^T diag(1 / sqrt(S_i + 1e-7)) g_i`` after adding ``g_i^2`` to the sums ``S_i`` (updated)."""
        self.squared_sums += gradients ** 2
        return (gradients ** 2 / torch.sqrt(self.squared_sums + 1e-7)).sum(dim=1)

    def update(self, risks: Tensor) -> None:
        """The exponentiated step from this step's excess risks (the first positive one of a task is its ``e(0)``)."""
        known = self.initial_risks > 0
        ratio = torch.where(known, risks / self.initial_risks.clamp(min=1e-30), torch.zeros_like(risks))
        weights = self.weights * torch.exp(self.step_size * ratio)
        self.weights.copy_(weights * self.num_tasks / weights.sum())
        self.initial_risks.copy_(torch.where(known | (risks <= 0), self.initial_risks, risks))

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        task_weights = self._task_weights().to(losses)
        if _requires_backward(losses):
            rows = [flat_gradient(torch.autograd.grad(float(w) * loss, self._shared, retain_graph=True,
                                                      allow_unused=True), self._shared)
                    for w, loss in zip(task_weights.tolist(), per_task)]
            self.update(self.excess_risks(distributed_mean(torch.stack(rows)).to(self.squared_sums)))
        return self._weighted_sum(self.weights.to(losses) * task_weights, losses)


__all__ = ["ExcessMTL"]
