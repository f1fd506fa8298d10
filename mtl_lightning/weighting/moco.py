"""MoCo: multi-objective gradient correction (bias-corrected MGDA with tracked gradients).

Fernando, H. D., Shen, H., Liu, M., Chaudhury, S., Murugesan, K., Chen, T. "Mitigating Gradient Bias
in Multi-objective Learning: A Provably Convergent Approach." ICLR 2023.

MGDA's weights computed from stochastic gradients are biased. MoCo tracks every task's gradient on
the shared parameters with a moving estimate ``y_i`` and moves the weights ``lambda`` by one projected
gradient step of MGDA's min-norm problem per iteration instead of solving it, which the paper proves
convergent. At step ``t`` (from 1), with ``h_i`` the task gradients (of ``Task.weight_i * L_i``):

    y_i <- y_i - beta_t (y_i - h_i),                       beta_t = beta / t^beta_sigma
    lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda),   gamma_t = gamma / t^gamma_sigma
    shared update = Y^T lambda

(``y`` starts at 0, ``lambda`` at ``1/T``; ``Proj_simplex`` is the Euclidean projection, the paper's
Algorithm 1.) Task-specific parameters get their own task's gradient. Defaults are LibMTL's
(``beta = 0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0``).
``normalize=True`` first replaces ``h_i`` by ``L_i h_i / ||h_i||`` as the authors' code shared with
LibMTL does (off by default: not in the paper). LibMTL's port also replaces the projection by a
softmax; this follows the paper.

Under DDP the per-task gradients and losses are averaged across ranks first, so every rank holds the
same ``y`` and ``lambda``. Checkpointed state: ``y`` (``(T, P)``, ``P`` the number of shared
parameters), ``lambda`` and the step. Logged weight: ``lambda_i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import GradientStrategy, register_weighting
from .solvers import project_to_simplex


@register_weighting("moco")
class MoCo(GradientStrategy):
    """Fernando et al. (ICLR 2023) tracked gradients and one projected MGDA step per iteration."""

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
                 rho: float = 0.0, normalize: bool = False) -> None:
        super().__init__()
        if not 0 < beta <= 1 or gamma <= 0 or rho < 0:
            raise ValueError(f"MoCo: need 0 < beta <= 1, gamma > 0 and rho >= 0, got {beta}, {gamma}, {rho}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)
        self.normalize = bool(normalize)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("tracked", torch.zeros(self.num_tasks, self.num_shared))  # y
        self.register_buffer("weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks))  # lambda
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        if self.normalize:
            if losses is None:
                raise ValueError("MoCo normalize=True needs the task losses")
            gradients = gradients / (gradients.norm(dim=1, keepdim=True) + 1e-8) * losses.to(gradients)[:, None]
        self.num_steps += 1
        step = float(self.num_steps)
        tracked = self.tracked.to(gradients)
        tracked = tracked - self.beta / step ** self.beta_sigma * (tracked - gradients)
        identity = torch.eye(self.num_tasks, device=gradients.device, dtype=gradients.dtype)
        gram = tracked @ tracked.T + self.rho * identity
        weights = self.weights.to(gradients)
        weights = project_to_simplex(weights - self.gamma / step ** self.gamma_sigma * (gram @ weights))
        self.tracked.copy_(tracked)
        self.weights.copy_(weights)
        self.last_weights = weights.detach().to(self.last_weights.device)
        return weights @ tracked


__all__ = ["MoCo", "project_to_simplex"]
