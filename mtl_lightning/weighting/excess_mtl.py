"""ExcessMTL: robust multi-task learning with excess risks.

He, Y., Zhou, S., Zhang, G., Yun, H., Xu, Y., Zeng, B., Chilimbi, T., Zhao, H. "Robust Multi-Task
Learning with Excess Risks." ICML 2024.

Loss-based weighting favours tasks with large losses, even when the loss is large because the task is
noisy (label noise) and no more training can lower it. ExcessMTL weighs the tasks by their *excess*
risk, the distance of the loss from its optimum, estimated to second order from the gradient:
``e_i = g_i^T H_i^{-1} g_i`` with ``g_i`` the gradient of ``Task.weight_i * L_i`` on the shared
parameters and ``H_i`` the diagonal AdaGrad approximation ``diag(sqrt(sum over steps of g_i^2 + 1e-7))``
(the official code's). The weights follow exponentiated gradient ascent on the excess risks,
normalised by each task's baseline ``e_i(0)``:

    lambda_i <- lambda_i exp(eta e_i / e_i(0)),   then lambda <- T lambda / sum(lambda)

(``lambda`` starts at 1; ``eta``, the official ``robust_step_size``, 0.01), and the model minimises
``sum_i lambda_i Task.weight_i L_i`` by one ordinary backward pass, so every parameter (shared and
task-specific) sees the weights. ``e_i(0)`` is the mean of the task's first ``warmup_steps`` positive
estimates (a task without a valid row in a batch has a zero gradient, which does not count); until it has
one, the task's ratio is 0. The default ``warmup_steps=1`` is the official code: ``e_i(0)`` is the estimate of
the very first batch, and the weights move from the second step on. A longer warm-up keeps the weights at
1 while it lasts.

The ratios compound: ``log(lambda_1 / lambda_2)`` moves by ``eta (e_1/e_1(0) - e_2/e_2(0))`` every step,
so a task whose first-batch estimate was large relative to its later ones loses its weight for good. On
Census-Income (``benchmarks/excess_mtl_trace.py``) the untrained model predicts about 0.5 for both tasks:
``income`` (6 % positive) starts with a large gradient that the first steps remove, ``never_married``
(43 % positive) with a small one, and with ``warmup_steps=1`` the income weight falls below 0.004 within
two epochs (``docs/weighting.md``). A baseline averaged over the first epoch (``warmup_steps`` = steps
per epoch) keeps both weights near 1.

Cost: ``T`` backward passes down to the shared parameters for the estimates, plus the ordinary one.
Under DDP the per-task gradients are averaged across ranks first, so every rank holds the same
accumulators and weights. Checkpointed state: the squared-gradient sums ``(T, P)``, ``e(0)``, the
warm-up sums and counts, and ``lambda``. Logged weight: ``lambda_i Task.weight_i``.
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
        warmup_steps: how many positive estimates of a task ``e_i(0)`` averages (>= 1; 1: the official
            code). The weights of tasks still warming up do not move by their own ratio.
    """

    reads = "shared_gradients"

    def __init__(self, step_size: float = 0.01, warmup_steps: int = 1) -> None:
        super().__init__()
        if step_size < 0:
            raise ValueError(f"ExcessMTL: step_size must be >= 0, got {step_size}")
        if warmup_steps < 1:
            raise ValueError(f"ExcessMTL: warmup_steps must be >= 1, got {warmup_steps}")
        self.step_size = float(step_size)
        self.warmup_steps = int(warmup_steps)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        shared = [p for p in model.shared_parameters() if p.requires_grad]  # type: ignore[operator]
        if not shared:
            raise ValueError(f"ExcessMTL needs shared parameters; {type(model).__name__}.shared_parameters() "
                             "returned none")
        self._shared = shared
        self.register_buffer("squared_sums", torch.zeros(self.num_tasks, sum(p.numel() for p in shared)))
        self.register_buffer("initial_risks", torch.zeros(self.num_tasks))
        self.register_buffer("warmup_sums", torch.zeros(self.num_tasks))
        self.register_buffer("warmup_counts", torch.zeros(self.num_tasks))
        self.register_buffer("weights", torch.ones(self.num_tasks))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Checkpoints written before ``warmup_steps`` existed have no warm-up sums: their ``e(0)`` is final."""
        if f"{prefix}initial_risks" in state_dict:
            for name in ("warmup_sums", "warmup_counts"):
                state_dict.setdefault(f"{prefix}{name}", torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def excess_risks(self, gradients: Tensor) -> Tensor:
        """``e_i = g_i^T diag(1 / sqrt(S_i + 1e-7)) g_i`` after adding ``g_i^2`` to the sums ``S_i`` (updated)."""
        self.squared_sums += gradients ** 2
        return (gradients ** 2 / torch.sqrt(self.squared_sums + 1e-7)).sum(dim=1)

    def update(self, risks: Tensor) -> None:
        """The exponentiated step from this step's excess risks.

        A task's ``e(0)`` is the mean of its first ``warmup_steps`` positive estimates; until it has one, its
        ratio is 0 (its weight moves only through the normalisation).
        """
        known = self.initial_risks > 0
        ratio = torch.where(known, risks / self.initial_risks.clamp(min=1e-30), torch.zeros_like(risks))
        weights = self.weights * torch.exp(self.step_size * ratio)
        self.weights.copy_(weights * self.num_tasks / weights.sum())
        collect = ~known & (risks > 0)
        self.warmup_sums += torch.where(collect, risks, torch.zeros_like(risks))
        self.warmup_counts += collect.to(self.warmup_counts)
        done = ~known & (self.warmup_counts >= self.warmup_steps)
        self.initial_risks.copy_(torch.where(done, self.warmup_sums / self.warmup_counts.clamp(min=1),
                                             self.initial_risks))

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        task_weights = self._task_weights().to(losses)
        if _requires_backward(losses):
            rows = [flat_gradient(torch.autograd.grad(float(w) * loss, self._shared, retain_graph=True,
                                                      allow_unused=True), self._shared)
                    for w, loss in zip(task_weights.tolist(), per_task)]
            self.update(self.excess_risks(distributed_mean(torch.stack(rows)).to(self.squared_sums)))
        return self._weighted_sum(self.weights.to(losses) * task_weights, losses)


__all__ = ["ExcessMTL"]
