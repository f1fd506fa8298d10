"""IMTL: impartial multi-task learning (IMTL-L, IMTL-G and their hybrid IMTL-H).

Liu, L., Li, Y., Kuang, Z., Xue, J.-H., Chen, Y., Yang, W., Liao, Q., Zhang, W. "Towards Impartial
Multi-task Learning." ICLR 2021.

IMTL-L (loss balance, ``mode="loss"``): every task loss is scaled by a learned ``e^{s_t}`` and
regularised: task ``t`` contributes ``e^{s_t} L_t - s_t`` (``L_t`` is ``Task.weight_t`` times the
task loss), so the scaled loss is pulled towards 1 whatever the raw scale (the optimum in ``s_t`` is
``e^{s_t} = 1 / L_t``). ``s`` (initially 0) is learned by the model's optimizer, by gradient descent
on the same objective, as in the paper (no weight decay: see ``mtl_lightning.optim``). One backward.

IMTL-G (gradient balance, ``mode="gradient"``): on the shared parameters, with per-task gradients
``g_t`` and unit vectors ``u_t = g_t / ||g_t||``, the update ``g = sum_t alpha_t g_t`` (``sum_t
alpha_t = 1``) whose projections onto every ``u_t`` are equal. In closed form (the paper's Eq. 7),
with ``D = [g_1 - g_2, ..., g_1 - g_T]`` and ``U = [u_1 - u_2, ..., u_1 - u_T]`` (rows),
``alpha_{2..T} = g_1 U^T (D U^T)^{-1}`` and ``alpha_1 = 1 - sum_{t>1} alpha_t``. Every quantity
here is an inner product of gradients, so it is computed in float64 from the Gram matrix
``G G^T`` and the norms; ``(D U^T)`` is inverted with a least-squares solve (its pseudo-inverse
where it is singular: parallel gradients, more tasks than shared parameters, a zero gradient).
The ``alpha_t`` are not constrained to be positive (the paper's closed form).

IMTL-H (``mode="hybrid"``, default, the paper's recommended method): IMTL-G on the gradients of
the IMTL-L-scaled losses ``e^{s_t} L_t``. Task-specific parameters get their own task's (scaled)
gradient; ``s`` gets the gradient of ``sum_t e^{s_t} L_t - s_t`` (``L_t`` held fixed).

Choices the paper leaves open: the paper computes IMTL-G's gradients with respect to the shared
feature ``z`` for speed; here they are those of the architecture's ``shared_parameters()`` (as
the other gradient strategies). Logged weight of task ``t``: its effective factor on ``L_t``,
``alpha_t e^{s_t}`` (hybrid), ``alpha_t`` (gradient) or ``e^{s_t}`` (loss). Under DDP the per-task
gradients and losses are averaged across ranks before ``alpha`` is computed, and ``s`` is an
ordinary parameter (its gradient is averaged by DDP): every rank holds the same ``s`` and takes the
same ``alpha``. State: ``s`` (``log_scales``), in ``state_dict``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, _requires_backward, register_weighting

MODES = ("hybrid", "gradient", "loss")


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G's ``alpha`` (``(T,)``, summing to 1) from the Gram matrix ``G G^T`` of the task gradients; float64."""
    M = gram.detach().double().cpu()
    if M.shape[0] == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = M.diagonal().clamp(min=0).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    cross = M / norms[None, :]  # cross[a, b] = <g_a, u_b>
    # (g_1 U^T)_j = <g_1, u_1 - u_j>; (D U^T)_{ij} = <g_1 - g_i, u_1 - u_j>, for i, j in 2..T
    first = cross[0, 0] - cross[0, 1:]  # (T-1,)
    du = (cross[0, 0] - cross[0, 1:])[None, :] - (cross[1:, 0:1] - cross[1:, 1:])  # (T-1, T-1)
    # alpha_{2..T} = first @ du^{-1}, i.e. du^T alpha = first
    rest = torch.linalg.lstsq(du.T, first.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return torch.cat([(1 - rest.sum()).unsqueeze(0), rest])


@register_weighting("imtl")
class IMTL(GradientStrategy):
    """Liu et al. (ICLR 2021) impartial multi-task learning: ``mode`` ``"hybrid"`` (IMTL-H), ``"gradient"``
    (IMTL-G) or ``"loss"`` (IMTL-L); see the module docstring."""

    def __init__(self, mode: str = "hybrid") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"IMTL: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.reads = "losses" if mode == "loss" else "shared_gradients"  # IMTL-L alone: one ordinary backward

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        if self.mode != "gradient":
            self.log_scales = nn.Parameter(torch.zeros(self.num_tasks))

    def objective(self, index: int, loss: Tensor) -> Tensor:
        weighted = float(self.tasks[index].weight) * loss
        if self.mode == "gradient":
            return weighted
        return torch.exp(self.log_scales[index]).detach().to(weighted.dtype) * weighted

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        alpha = imtl_g_weights(gradients @ gradients.T)
        factor = alpha if self.mode == "gradient" else alpha * torch.exp(self.log_scales.detach().double().cpu())
        self.last_weights = factor.float().to(self.last_weights.device)
        return alpha.to(gradients) @ gradients

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        if self.mode == "gradient":
            return super().total_loss(losses, per_task)
        weighted = losses * self._task_weights().to(losses)
        if self.mode == "loss":  # IMTL-L alone: one ordinary backward
            scales = torch.exp(self.log_scales)
            self.last_weights = scales.detach()
            return (scales.to(losses.dtype) * weighted).sum() - self.log_scales.sum()
        model_loss = super().total_loss(losses, per_task)  # sets last_weights in combine (training) or to Task.weight
        regulariser = (torch.exp(self.log_scales) * weighted.detach().float()).sum() - self.log_scales.sum()
        if not _requires_backward(losses):
            self.last_weights = torch.exp(self.log_scales).detach()
        return model_loss + (regulariser - regulariser.detach()) - self.log_scales.sum().detach()


__all__ = ["IMTL", "imtl_g_weights"]
