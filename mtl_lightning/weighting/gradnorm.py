"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Z., Badrinarayanan, V., Lee, C.-Y., Rabinovich, A. "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks." ICML 2018.

The model minimises ``L = sum_i w_i L_i``. The task weights ``w`` are learned
so that every task trains at a similar rate. On ``W``, the architecture's last
shared layer (``last_shared_parameters()``, never the embedding tables):

* ``G_i = ||grad_W (w_i L_i)||_2 = w_i ||grad_W L_i||_2`` and ``G_bar = mean_i G_i``;
* ``r_i = (L_i(t) / L_i(0)) / mean_j (L_j(t) / L_j(0))`` (relative inverse training rate);
* ``L_grad = sum_i |G_i - G_bar * r_i^alpha|`` with the target ``G_bar * r_i^alpha``
  held constant;
* ``w`` is updated only by ``grad_w L_grad`` with its own Adam optimizer and
  learning rate ``lr`` (the model's gradient is ``grad_theta L`` with ``w`` held
  fixed), then renormalised so that ``sum_i w_i = T``.

``L_i(0)`` is the loss of the first step, or with ``initial_loss_steps=k`` the
mean over the first ``k`` steps in which the task's loss was positive (a task
with no valid row in a batch has an exact-zero loss); until a task has one,
its ratio is 1. Under DDP the losses and the per-task gradients on ``W`` are
averaged across ranks before anything is computed from them, so ``G_i`` is the
norm of the global gradient and every rank holds identical weights. With
``accumulate_grad_batches=k`` each micro-batch contributes ``1/k`` of
``grad_w L_grad`` and ``w`` is updated once per optimizer step.

Checkpointed state: ``weights``, the initial-loss sums and counts, the step
count and the weights' Adam state. ``last_grad_norms`` holds the ``G_i`` and
``last_targets`` the targets ``G_bar * r_i^alpha`` of the latest step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import (
    WeightingStrategy, _requires_backward, distributed_mean, flat_gradient, gradient_surrogate, register_weighting,
    trainable_parameters,
)


@register_weighting("gradnorm")
class GradNorm(WeightingStrategy):
    """GradNorm (Chen et al., ICML 2018) on the architecture's ``last_shared_parameters()``.

    Args:
        alpha: the asymmetry ``alpha`` (larger pulls harder towards equal training rates).
        lr: learning rate of the task weights' Adam optimizer.
        initial_loss_steps: number of steps averaged into ``L_i(0)``.
        min_weight: numerical floor applied before renormalising (keeps a weight
            from crossing zero when ``lr`` is too large; inactive otherwise).

    The initial weights are ``Task.weight`` rescaled to sum to ``T`` (all 1 by default, as in the paper).
    """

    reads = "last_shared_gradients"

    def per_task_gradient_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """``W``, the last shared layer (never a table): its per-task gradient norms are GradNorm's input."""
        return [p for p in model.last_shared_parameters() if p.requires_grad]  # type: ignore[operator]

    def __init__(self, alpha: float = 1.5, lr: float = 0.01, initial_loss_steps: int = 1,
                 min_weight: float = 1e-4) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"GradNorm: alpha must be >= 0, got {alpha}")
        if lr <= 0:
            raise ValueError(f"GradNorm: lr must be > 0, got {lr}")
        if initial_loss_steps < 1:
            raise ValueError(f"GradNorm: initial_loss_steps must be >= 1, got {initial_loss_steps}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.initial_loss_steps = int(initial_loss_steps)
        self.min_weight = float(min_weight)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        shared = [p for p in model.last_shared_parameters() if p.requires_grad]  # type: ignore[operator]
        if not shared:
            raise ValueError(f"GradNorm needs the last shared layer W; "
                             f"{type(model).__name__}.last_shared_parameters() returned no trainable parameter")
        self._shared = shared
        self._parameters_list = trainable_parameters(model)
        index = {id(p): k for k, p in enumerate(self._parameters_list)}
        self._shared_index = [index[id(p)] for p in shared]
        initial = self._task_weights()
        if (initial <= 0).any():
            raise ValueError(f"GradNorm: every Task.weight must be > 0, got {initial.tolist()}")
        self.weights = nn.Parameter(initial * self.num_tasks / initial.sum())
        self.register_buffer("initial_loss_sum", torch.zeros(self.num_tasks))
        self.register_buffer("initial_loss_count", torch.zeros(self.num_tasks, dtype=torch.long))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_grad_norms", torch.zeros(self.num_tasks), persistent=False)
        self.register_buffer("last_targets", torch.zeros(self.num_tasks), persistent=False)
        self.optimizer = torch.optim.Adam([self.weights], lr=self.lr)

    def private_parameters(self) -> list[nn.Parameter]:
        return [self.weights]

    @property
    def initial_losses(self) -> Tensor:
        """``L_i(0)`` as far as it is known (0 where a task has had no positive loss yet)."""
        return self.initial_loss_sum / self.initial_loss_count.clamp(min=1)

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        weighted = self._weighted_sum(self.weights, losses)  # sum_i w_i L_i with w fixed: the model's loss
        if not _requires_backward(losses):
            return weighted
        if self.backward_through_model:  # tables learn inside the backward pass: let it run through the model
            task_gradients, model_gradient = self._task_gradients(per_task), None
        else:
            task_gradients, model_gradient = self._gradients(per_task, weighted)
        norms = distributed_mean(task_gradients).norm(dim=1)  # (T,) ||grad_W L_i|| of the global loss
        current = distributed_mean(losses.float())  # (T,)
        with torch.no_grad():
            take = (self.initial_loss_count < self.initial_loss_steps) & (current > 0)
            self.initial_loss_sum += torch.where(take, current, torch.zeros_like(current))
            self.initial_loss_count += take.long()
            self.num_steps += 1
            known = self.initial_loss_count > 0
            ratio = torch.where(known, current / self.initial_losses.clamp(min=1e-30), torch.ones_like(current))
            inverse_rate = ratio / ratio.mean()
        grad_norms = self.weights * norms  # (T,) G_i, differentiable in w only
        target = grad_norms.detach().mean() * inverse_rate ** self.alpha  # constant
        grad_loss = (grad_norms - target).abs().sum()
        self.last_grad_norms = grad_norms.detach()
        self.last_targets = target
        model_loss = weighted if model_gradient is None else \
            weighted.detach() + gradient_surrogate(self._parameters_list, model_gradient)
        return model_loss + (grad_loss - grad_loss.detach())

    def _task_gradients(self, losses: list[Tensor]) -> Tensor:
        """``(T, |W|)`` per-task gradients on ``W``, one pass per task down to ``W`` only.

        Used when ``backward_through_model`` holds (under ``TorchRecStrategy``,
        whose sharded embedding layers train their tables from the backward pass
        through them): the model's gradient then comes from Lightning's backward
        of the loss.
        """
        return torch.stack([
            flat_gradient(torch.autograd.grad(loss, self._shared, retain_graph=True, allow_unused=True), self._shared)
            for loss in losses
        ])

    def _gradients(self, losses: list[Tensor], weighted: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """``(T, |W|)`` per-task gradients on ``W`` and the model's gradient, in ``T`` backward passes.

        The model's gradient ``grad sum_i w_i L_i`` (every parameter) is computed
        once here and handed to the optimizer through a surrogate, so Lightning's
        backward does not traverse the network again. ``T - 1`` tasks get their own
        pass on ``W``; the task with the largest weight is recovered as
        ``(grad_W sum_i w_i L_i - sum_{j != k} w_j grad_W L_j) / w_k``.
        """
        w = self.weights.detach()
        derived = int(torch.argmax(w))
        rows: dict[int, Tensor] = {}
        for i in range(self.num_tasks):
            if i != derived:
                grads = torch.autograd.grad(losses[i], self._shared, retain_graph=True, allow_unused=True)
                rows[i] = flat_gradient(grads, self._shared)
        full = torch.autograd.grad(weighted, self._parameters_list, retain_graph=True, allow_unused=True)
        full_w = flat_gradient([full[k] for k in self._shared_index], self._shared)
        rest = sum((w[i] * row for i, row in rows.items()), torch.zeros_like(full_w))
        rows[derived] = (full_w - rest) / w[derived]
        return torch.stack([rows[i] for i in range(self.num_tasks)]), list(full)

    def before_optimizer_step(self) -> None:
        grad = self.weights.grad
        if grad is None:
            return
        if torch.isfinite(grad).all():  # a skipped fp16 step (inf gradients) leaves w unchanged
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.weights.clamp_(min=self.min_weight)
            self.weights.mul_(self.num_tasks / self.weights.sum())

    def get_extra_state(self) -> Any:
        return {"optimizer": self.optimizer.state_dict()} if hasattr(self, "optimizer") else {}

    def set_extra_state(self, state: Any) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


__all__ = ["GradNorm"]
