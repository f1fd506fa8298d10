"""Hard-concrete gates with the expected-L0 penalty.

Louizos, C., Welling, M., Kingma, D. P. "Learning Sparse Neural Networks
through L0 Regularization." ICLR 2018.

One learnable ``log_alpha`` per gate. In training a gate is sampled with
``u ~ U(0, 1)``: ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
stretched to ``(gamma, zeta)`` and clipped: ``z = clip(s (zeta - gamma) + gamma, 0, 1)``
(so exact zeros and ones have non-zero probability and the sample is
differentiable in ``log_alpha``). At evaluation the gate is deterministic:
``z = clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``. The expected
number of non-zero gates, ``sum sigmoid(log_alpha - beta log(-gamma / zeta))``,
is the L0 penalty.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


class HardConcreteGate(nn.Module):
    """A tensor of hard-concrete gates of ``shape``; ``forward(batch_size)`` -> ``(B, *shape)``.

    Noise is drawn independently per example in training (a choice: the SNR
    paper does not say whether one sample serves a whole mini-batch; per-example
    samples give a lower-variance gradient for ``log_alpha``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        log_alpha_init: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if not (gamma < 0.0 and zeta > 1.0):
            raise ValueError(f"hard-concrete stretch needs gamma < 0 < 1 < zeta, got gamma={gamma}, zeta={zeta}")
        if beta <= 0:
            raise ValueError(f"hard-concrete temperature beta must be > 0, got {beta}")
        self.shape = tuple(int(s) for s in shape)
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.log_alpha = nn.Parameter(torch.empty(self.shape).normal_(log_alpha_init, init_std))

    def forward(self, batch_size: int) -> Tensor:
        if self.training:
            eps = torch.finfo(self.log_alpha.dtype).eps
            u = torch.rand((batch_size, *self.shape), device=self.log_alpha.device,
                           dtype=self.log_alpha.dtype).clamp(eps, 1 - eps)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha).expand(batch_size, *self.shape)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def l0_penalty(self) -> Tensor:
        """Expected number of non-zero gates (differentiable in ``log_alpha``)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()
