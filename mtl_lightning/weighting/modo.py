"""MoDo: multi-objective gradient with double sampling.

Chen, L., Fernando, H. D., Ying, Y., Chen, T. "Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance." NeurIPS 2023.

MGDA's weights computed from one stochastic gradient are biased (the min-norm problem is quadratic in the
gradient). MoDo moves the weights ``lambda`` by one projected stochastic gradient step of
``1/2 ||G^T lambda||^2 + rho/2 ||lambda||^2`` per iteration, whose gradient ``G G^T lambda`` it estimates
without bias from two independent samples, and moves the model along a third sample's gradients
(the paper's Algorithm 1). With ``G^(s)`` the ``(T, P)`` gradients of the objectives
``Task.weight_i * L_i`` on the shared parameters from sample ``s``:

    lambda <- Proj_simplex(lambda - gamma (G^(1) G^(2)T lambda + rho lambda))
    shared update = G^(3)T lambda

(``lambda`` starts at ``1/T``; ``Proj_simplex`` is the exact Euclidean projection, as the paper and
LibMTL.) Defaults ``gamma = 0.001``, ``rho = 0.1`` are LibMTL's (the paper tunes both per data set).

Choices the paper leaves open, and how they are made here:

* the three samples: the paper (and LibMTL, and the official code) draws three mini-batches per
  iteration; under Lightning one step gets one batch, so its rows are split into three disjoint random
  groups (``base.SampledGradientStrategy``: seeded permutation, checkpointed, the same on every rank;
  each group's gradient is ``B / |s|`` times its rows' part of the batch gradient, an unbiased estimate).
  ``batch_size`` is therefore the three samples together;
* task-specific parameters: the paper updates all parameters along ``G^(3)T lambda``; here (as LibMTL,
  whose decoders get their own task's gradient averaged over the three batches) every non-shared
  parameter gets its own task's gradient on the whole batch, unweighted, like every gradient strategy
  of this library;
* ``gamma`` is constant over training (the model's step size is the optimizer's, scheduled as usual).

Cost: ``3 T`` backward passes from the outputs to the shared parameters (plus ``T`` cheap ones from the
losses to the outputs) instead of one. Under DDP the ``(3, T, P)`` gradients are averaged across ranks
first, so every rank holds the same ``lambda``. Checkpointed state: ``lambda`` and the generator.
Logged weight: ``lambda_i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import SampledGradientStrategy, register_weighting
from .solvers import project_to_simplex


@register_weighting("modo")
class MoDo(SampledGradientStrategy):
    """Chen et al. (NeurIPS 2023) double-sampling weight update on the architecture's ``shared_parameters()``.

    Args:
        gamma: the weights' step size (``> 0``).
        rho: the ``l2`` regularisation of the weights (``>= 0``).
        seed: the seed of the generator that splits every batch into the three samples.
    """

    def __init__(self, gamma: float = 0.001, rho: float = 0.1, seed: int = 0) -> None:
        super().__init__(seed)
        if gamma <= 0 or rho < 0:
            raise ValueError(f"MoDo: need gamma > 0 and rho >= 0, got gamma={gamma}, rho={rho}")
        self.gamma, self.rho = float(gamma), float(rho)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks))  # lambda

    def update(self, first: Tensor, second: Tensor) -> Tensor:
        """``lambda`` after one step from two samples' gradients ``(T, P)`` each (stored and returned)."""
        weights = self.weights.to(first)
        step = first @ (second.T @ weights) + self.rho * weights  # (T,)
        weights = project_to_simplex(weights - self.gamma * step)
        self.weights.copy_(weights)
        self.last_weights = weights.detach().to(self.last_weights.device)
        return weights

    def combine_samples(self, gradients: Tensor) -> Tensor:
        weights = self.update(gradients[0], gradients[1])
        return weights @ gradients[2]


__all__ = ["MoDo"]
