"""Cross-Stitch Networks.

Misra, I., Shrivastava, A., Gupta, A., Hebert, M. "Cross-stitch Networks for
Multi-task Learning." CVPR 2016.

One network column per task, all reading the shared embedding. After every
hidden layer a cross-stitch unit mixes the columns' activations linearly:
``h~_k = sum_j alpha_kj h_j`` with a learned ``T x T`` matrix ``alpha`` per
layer. ``alpha`` starts near the identity (``alpha_kk = self_weight``, the
rest ``(1 - self_weight) / (T - 1)`` so rows sum to one; the paper's
``(alpha_S, alpha_D) = (0.9, 0.1)`` for two tasks). With ``self_weight = 1`` the
columns are independent networks. Each column ends in its task's output layer
(after the optional ``tower_hidden`` layers).

Choice where the paper is open: one ``alpha`` per layer (not per channel).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import activation_layer
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


@register("cross_stitch")
class CrossStitch(MultiTaskArchitecture):
    """embedding -> per-task columns with a cross-stitch unit after each layer -> per-task output."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        column_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (),
        self_weight: float = 0.9,
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if len(column_hidden) == 0:
            raise ValueError("column_hidden must list at least one layer size")
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
        num_tasks = len(self.tasks)
        self.embedding = self.input_layer()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.stitches = nn.ParameterList()
        width = self.embedding.output_dim
        off = (1.0 - self_weight) / (num_tasks - 1) if num_tasks > 1 else 0.0
        diagonal = self_weight if num_tasks > 1 else 1.0
        for size in column_hidden:
            bound = 1.0 / math.sqrt(width)
            self.weights.append(nn.Parameter(torch.empty(num_tasks, width, size).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_tasks, size).uniform_(-bound, bound)))
            alpha = torch.full((num_tasks, num_tasks), off)
            alpha.fill_diagonal_(diagonal)
            self.stitches.append(nn.Parameter(alpha))
            width = size
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def columns(self, features: Mapping[str, Tensor]) -> Tensor:
        """The columns' last stitched activations ``(B, T, H)``."""
        x = self.embedding(features)  # (B, D)
        h = torch.einsum("bi,tio->bto", x, self.weights[0]) + self.biases[0]  # (B, T, H1)
        for layer in range(len(self.weights)):
            if layer > 0:
                h = torch.einsum("bti,tio->bto", h, self.weights[layer]) + self.biases[layer]
            h = self.dropout(self.activation(h))
            h = torch.einsum("kj,bjh->bkh", self.stitches[layer], h)  # cross-stitch unit
        return h

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        h = self.columns(features)
        return {name: squeeze_logit(self.towers[name](h[:, k])) for k, name in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The embedding, the columns and the stitch units: through the stitches every task reaches all of them."""
        return parameters_of(self.embedding, self.weights, self.biases, self.stitches)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [self.stitches[-1]]
