"""Expert and gate blocks shared by the mixture-of-experts architectures."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .mlp import activation_layer


class ExpertBank(nn.Module):
    """``num_experts`` independent MLPs of the same shape, evaluated as one batched matmul per layer.

    Every layer is ``activation(x @ W_e + b_e)`` for expert ``e`` (the activation
    follows every layer, so an expert's output is a hidden representation, as in
    the MMoE and PLE papers). Input ``(B, input_dim)`` -> output ``(B, E, H)``.
    Weights are initialised like ``nn.Linear`` (Kaiming-uniform), per expert.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if len(hidden) == 0:
            raise ValueError("expert_hidden must list at least one layer size")
        self.num_experts = num_experts
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        width = input_dim
        for size in hidden:
            bound = 1.0 / math.sqrt(width)
            self.weights.append(nn.Parameter(torch.empty(num_experts, width, size).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, size).uniform_(-bound, bound)))
            width = size
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_dim = width

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [self.weights[-1], self.biases[-1]]

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("bi,eio->beo", x, self.weights[0]) + self.biases[0]  # (B, E, H1)
        h = self.dropout(self.activation(h))
        for weight, bias in zip(list(self.weights)[1:], list(self.biases)[1:]):
            h = torch.einsum("bei,eio->beo", h, weight) + bias  # (B, E, Hk)
            h = self.dropout(self.activation(h))
        return h


class Gate(nn.Module):
    """Softmax gate: ``softmax(x W + b)`` over ``num_experts`` -> ``(B, E)``."""

    def __init__(self, input_dim: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def mix(gate: Tensor, experts: Tensor) -> Tensor:
    """Gate-weighted sum of expert outputs: ``(B, E) x (B, E, H) -> (B, H)``."""
    return torch.einsum("be,beh->bh", gate, experts)
