"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, P., Ban, H., Ji, K. "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms." NeurIPS 2023.

SDMGrad looks for the update ``d`` that improves the worst task most while staying close to a target
direction ``g_0`` (here, as the paper's experiments, the average gradient ``1/T sum_i g_i``), through the
regularised problem ``max_d min_{w in simplex} <G^T w, d> - 1/2 ||d||^2 - lambda/2 ||d - g_0||^2``.
Its dual is ``min_{w in simplex} 1/2 ||G^T w + lambda g_0||^2`` and then
``d = (G^T w + lambda g_0) / (1 + lambda)``; ``lambda = 0`` is MGDA, ``lambda -> inf`` plain gradient
descent on the average loss. The dual's gradient ``G (G^T w + lambda g_0)`` is quadratic in the
gradients, so it is estimated without bias from two independent samples ``xi``, ``xi'``, and ``d``
from a third ``zeta`` (the paper's Algorithm 1):

    w <- Proj_simplex(w - beta [G_xi G_xi'^T w + lambda G_xi g_0(xi')])   (``num_steps`` times)
    d = (G_zeta^T w + lambda g_0(zeta)) / (1 + lambda)

with ``G_s`` the ``(T, P)`` gradients of ``Task.weight_i * L_i`` on the shared parameters from sample
``s`` and ``w`` warm-started from the previous step (``1/T`` at the first).

Choices the paper leaves open, and how they are made here. The authors' code (OptMN-Lab/sdmgrad,
``methods/weight_methods.py``) and LibMTL's port (``LibMTL/weighting/SDMGrad.py``) differ on several;
each choice says whose it follows:

* ``G_xi G_xi'^T`` is divided by the square of the mean of ``sqrt(max(diag, 0))`` (plus 1e-8): the
  inner problem is then scale-free. This is LibMTL's form; the authors' ``sqrt(diag + 1e-4)`` is NaN
  where two independent samples' gradients of a task point apart, and not scale-free;
* the inner solver is ``num_steps = 20`` steps of SGD with momentum 0.5 (both codes) and ``lr = 10``
  (the authors' code; LibMTL uses ``lr = 5``), a fresh momentum buffer every outer step (both build a
  new optimizer each time; PyTorch's rule ``b <- 0.5 b + grad``, the first ``b = grad``), each step
  followed by the exact Euclidean projection onto the simplex; ``lambda = 0.3`` (LibMTL's default and
  the authors' NYUv2 script; their class default is 0.6);
* ``d`` is not multiplied by ``T`` (the authors' code does, "to match the sum loss", and also clips the
  shared gradient's norm to 1; LibMTL's SDMGrad does neither, nor do this library's MGDA and CAGrad);
* the three samples: the paper draws three mini-batches per iteration; under Lightning one step gets one
  batch, so its rows are split into three disjoint random groups (``base.SampledGradientStrategy``:
  seeded permutation, checkpointed, the same on every rank; each group's gradient is ``B / |s|`` times
  its rows' part of the batch gradient, an unbiased estimate). ``batch_size`` is the three samples
  together. The objective-sampling variant SDMGrad-OS (a subset of tasks per step, for many tasks) is
  not included;
* task-specific parameters get their own task's gradient on the whole batch, as every gradient strategy
  of this library.

Cost: ``3 T`` backward passes from the outputs to the shared parameters (plus ``T`` cheap ones from the
losses to the outputs), and the ``T x T`` inner loop. Under DDP the ``(3, T, P)`` gradients are averaged
across ranks first, so every rank holds the same ``w``. Checkpointed state: ``w`` and the generator.
Logged weight of task ``i``: its coefficient in ``d``, ``(w_i + lambda / T) / (1 + lambda)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .base import SampledGradientStrategy, register_weighting
from .solvers import project_to_simplex


def sdmgrad_inner(gram: Tensor, start: Tensor, regularization: float, num_steps: int = 20, lr: float = 10.0,
                  momentum: float = 0.5) -> Tensor:
    """``w`` after ``num_steps`` projected SGD steps (momentum, fresh buffer) on the dual with the two-sample
    Gram matrix ``gram = G_xi G_xi'^T`` (normalised here), from ``start``; float64."""
    gram = gram.double()
    scale = gram.diagonal().clamp(min=0).sqrt().mean()
    gram = gram / (scale ** 2 + 1e-8)
    towards_mean = gram.mean(dim=1)  # G_xi g_0(xi')
    w = start.double().clone()
    buffer: Tensor | None = None
    for _ in range(num_steps):
        grad = gram @ w + regularization * towards_mean
        buffer = grad if buffer is None else momentum * buffer + grad
        w = project_to_simplex(w - lr * buffer)
    return w


@register_weighting("sdmgrad")
class SDMGrad(SampledGradientStrategy):
    """Xiao et al. (NeurIPS 2023) direction-oriented update on the architecture's ``shared_parameters()``.

    Args:
        regularization: ``lambda >= 0``, the pull towards the average gradient (the official ``lamda``).
        num_steps: inner projected SGD steps on ``w`` per training step (``>= 1``).
        lr, momentum: the inner SGD's step size (``> 0``) and momentum (``[0, 1)``).
        seed: the seed of the generator that splits every batch into the three samples.
    """

    def __init__(self, regularization: float = 0.3, num_steps: int = 20, lr: float = 10.0, momentum: float = 0.5,
                 seed: int = 0) -> None:
        super().__init__(seed)
        if regularization < 0 or num_steps < 1 or lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"SDMGrad: need regularization >= 0, num_steps >= 1, lr > 0 and 0 <= momentum < 1, got "
                             f"{regularization}, {num_steps}, {lr}, {momentum}")
        self.regularization = float(regularization)
        self.num_steps = int(num_steps)
        self.lr, self.momentum = float(lr), float(momentum)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        self.register_buffer("weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def direction(self, weights: Tensor, gradients: Tensor) -> Tensor:
        """``d = (G^T w + lambda g_0) / (1 + lambda)`` from ``gradients`` ``(T, P)``; sets ``last_weights``."""
        coefficients = (weights + self.regularization / self.num_tasks) / (1 + self.regularization)  # (T,)
        self.last_weights = coefficients.float().to(self.last_weights.device)
        return coefficients.to(gradients) @ gradients

    def combine_samples(self, gradients: Tensor) -> Tensor:
        gram = (gradients[1] @ gradients[2].T).double().cpu()  # xi, xi'
        weights = sdmgrad_inner(gram, self.weights.cpu(), self.regularization, self.num_steps, self.lr, self.momentum)
        self.weights.copy_(weights)
        return self.direction(weights, gradients[0])  # zeta


__all__ = ["SDMGrad", "sdmgrad_inner"]
