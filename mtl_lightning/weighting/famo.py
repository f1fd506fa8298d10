"""FAMO: fast adaptive multitask optimisation.

Liu, B., Feng, Y., Stone, P., Liu, Q. "FAMO: Fast Adaptive Multitask Optimization." NeurIPS 2023.

FAMO decreases the task losses at balanced *rates* with one backward pass (O(1) in the number of
tasks: no per-task gradient). Task logits ``xi`` (initially 0) give ``z = softmax(xi)``; with
``D_i = L_i - L_i^* + eps`` (``L^* = 0``, ``eps = 1e-8``, as the official code) the model follows
the gradient of ``sum_i z_i log D_i / c`` with ``c = sum_i z_i / D_i`` held constant, that is of
the weighted loss ``sum_i w_i L_i`` with ``w_i = z_i / (c D_i)`` (the logged weights; their value
``sum_i w_i L_i`` is what is returned, so ``train/loss`` stays a loss). After the step, the
observed decrease of the log-losses ``delta_i = log D_i(theta_t) - log D_i(theta_{t+1})`` drives
the logits: ``xi`` takes an Adam step (learning rate ``lr``, L2 weight decay ``gamma``, the
official defaults 0.025 and 0.01) on the gradient ``J_softmax(xi)^T delta``, so tasks whose loss
fell more lose weight. (``xi`` is a parameter without autograd: its gradient is computed in closed
form, ``J^T delta = z * (delta - <z, delta>)``, so DDP does not wait for one.)

Choices the paper's code makes by a second forward pass (it recomputes the losses of the same
batch after the optimizer step): here ``L(theta_{t+1})`` is the next optimizer step's loss, on its
own batch, which the training step computes anyway, so FAMO costs no extra pass. The logits
therefore lag one step behind the official code's, and ``delta`` also carries the difference
between two batches (unbiased, noisier; Adam averages it). With ``accumulate_grad_batches=k`` the
losses of a step are the mean over its micro-batches and ``xi`` moves once per optimizer step.
A task whose loss is exactly 0 in a step (no valid row: the ignore label) gets weight 0 then and
no ``delta`` (its ``log D`` would be ``log 1e-8`` and would swamp ``c``). ``Task.weight`` has no
effect: FAMO is invariant to the scale of each loss. The official code clips the shared
parameters' gradient norm to 1: use ``Trainer(gradient_clip_val=1.0)`` for that.

Under DDP the losses are averaged across ranks first, so every rank holds the same ``xi``.
Checkpointed state: ``xi`` (``logits``), its Adam state, the previous step's losses and the
running sums of the current step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import WeightingStrategy, _requires_backward, distributed_mean, register_weighting

EPS = 1e-8


def famo_weights(logits: Tensor, losses: Tensor, minimum: Tensor | float = 0.0) -> Tensor:
    """``w_i = z_i / (c D_i)`` with ``z = softmax(logits)``, ``D = L - L^* + 1e-8``, ``c = sum_i z_i / D_i``;
    tasks with an exact-zero loss get 0 and are left out of ``c``."""
    present = losses != 0
    z = torch.softmax(logits.float(), dim=0) * present
    inverse = z / (losses.float() - minimum + EPS)
    return inverse / inverse.sum().clamp(min=1e-30)


@register_weighting("famo")
class FAMO(WeightingStrategy):
    """Liu et al. (NeurIPS 2023) fast adaptive multitask optimisation (see the module docstring).

    Args:
        lr: learning rate of the logits' Adam (the official ``w_lr``).
        gamma: the logits' L2 regularisation (Adam's ``weight_decay``).
    """

    def __init__(self, lr: float = 0.025, gamma: float = 0.01) -> None:
        super().__init__()
        if lr <= 0 or gamma < 0:
            raise ValueError(f"FAMO: lr must be > 0 and gamma >= 0, got lr={lr}, gamma={gamma}")
        self.lr = float(lr)
        self.gamma = float(gamma)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        # no autograd reaches the logits (their gradient is written in closed form below), so DDP leaves them out
        self.logits = nn.Parameter(torch.zeros(self.num_tasks), requires_grad=False)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
        self.register_buffer("previous_losses", torch.zeros(self.num_tasks))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step_loss_sum", torch.zeros(self.num_tasks))
        self.register_buffer("step_micro_batches", torch.zeros((), dtype=torch.long))

    def private_parameters(self) -> list[nn.Parameter]:
        return [self.logits]

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        current = distributed_mean(losses.float())
        if _requires_backward(losses):
            self.step_loss_sum += current
            self.step_micro_batches += 1
        return self._weighted_sum(famo_weights(self.logits.detach(), current), losses)

    def before_optimizer_step(self) -> None:
        if int(self.step_micro_batches) == 0:
            return
        current = self.step_loss_sum / self.step_micro_batches
        if bool(self.has_previous):
            both = (current != 0) & (self.previous_losses != 0)
            delta = torch.log(self.previous_losses + EPS) - torch.log(current + EPS)
            delta = torch.where(both, delta, torch.zeros_like(delta))
            z = torch.softmax(self.logits, dim=0)
            self.logits.grad = z * (delta - (z * delta).sum())  # J_softmax^T delta = (diag z - z z^T) delta
            self.optimizer.step()
            self.logits.grad = None
        self.previous_losses.copy_(current)
        self.has_previous.fill_(True)
        self.step_loss_sum.zero_()
        self.step_micro_batches.zero_()

    def get_extra_state(self) -> Any:
        return {"optimizer": self.optimizer.state_dict()} if hasattr(self, "optimizer") else {}

    def set_extra_state(self, state: Any) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


__all__ = ["FAMO", "famo_weights"]
