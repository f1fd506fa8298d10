"""APG: Adaptive Parameter Generation.

Yan, B., Wang, P., Zhang, K., Li, F., Deng, H., Xu, J., Zheng, B. "APG:
Adaptive Parameter Generation Network for Click-Through Rate Prediction."
NeurIPS 2022.

Every hidden layer has instance-specific weights generated from a condition
``z``: ``W(z) = U S(z) V`` with shared ``U (N x K)`` and ``V (K x M)`` and a
small specific matrix ``S(z) = reshape(MLP(z)) (K x K)``. The product is never
formed: a layer computes ``h = act(((x U) S(z)) V + b)`` at ``O(NK + K^2 + KM)``
per example instead of ``O(NM)``. The condition is the embedding of the named
``condition_features`` (scenario features such as the domain id, or user
features), or the layer's input itself when none is named. With
``overparam_dim = P > K`` the shared matrices are over-parameterised for
training, ``U = U_1 U_2`` (N x P, P x K) and ``V = V_1 V_2`` (K x P, P x M),
which changes the optimisation but not what the layer can express (the
products can be merged for serving). Task towers (plain MLPs) follow.

Choices where the paper is open: the generator is an MLP with one hidden
layer of ``generator_hidden`` units whose output bias starts at the flattened
identity, so ``S(z)`` starts near ``I`` and an untrained layer behaves like
the low-rank layer ``x U V``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, activation_layer, check_feature_names, feature_slices
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class APGLinear(nn.Module):
    """``x (B, N), z (B, C) -> ((x U) S(z)) V + b (B, M)`` with ``S(z) = reshape(generator(z), K, K)``."""

    def __init__(
        self, input_dim: int, output_dim: int, condition_dim: int, rank: int, generator_hidden: int,
        overparam_dim: int = 0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"APG rank must be >= 1, got {rank}")
        if overparam_dim and overparam_dim <= rank:
            raise ValueError(f"overparam_dim must be 0 (off) or > rank={rank}, got {overparam_dim}")
        self.rank = rank
        if overparam_dim:
            self.u_factors = nn.ParameterList([_uniform(input_dim, overparam_dim, fan_in=input_dim),
                                               _uniform(overparam_dim, rank, fan_in=overparam_dim)])
            self.v_factors = nn.ParameterList([_uniform(rank, overparam_dim, fan_in=rank),
                                               _uniform(overparam_dim, output_dim, fan_in=overparam_dim)])
        else:
            self.u_factors = nn.ParameterList([_uniform(input_dim, rank, fan_in=input_dim)])
            self.v_factors = nn.ParameterList([_uniform(rank, output_dim, fan_in=rank)])
        self.bias = nn.Parameter(torch.zeros(output_dim))
        self.generator = MLP(condition_dim, (generator_hidden,), output_dim=rank * rank)
        with torch.no_grad():
            self.generator.last_linear().bias.copy_(torch.eye(rank).flatten())

    def specific(self, z: Tensor) -> Tensor:
        """``S(z)``: ``(B, K, K)``."""
        return self.generator(z).view(-1, self.rank, self.rank)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        h = x
        for factor in self.u_factors:  # x U, never forming U when over-parameterised
            h = h @ factor  # (B, K) at the end
        h = torch.bmm(h.unsqueeze(1), self.specific(z)).squeeze(1)  # (B, K)
        for factor in self.v_factors:
            h = h @ factor  # (B, M) at the end
        return h + self.bias


@register("apg")
class APG(MultiTaskArchitecture):
    """embedding -> APG layers (weights generated per example from the condition) -> one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        condition_features: Sequence[str] = (),
        hidden: Sequence[int] = (256, 128),
        rank: int = 32,
        generator_hidden: int = 64,
        overparam_dim: int = 0,
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if len(hidden) == 0:
            raise ValueError("hidden must list at least one layer size")
        names = check_feature_names("APG", "condition_features", condition_features, self.features)
        self.embedding = self.input_layer()
        slices = feature_slices(self.embedding)
        columns = [torch.arange(start, stop) for start, stop in dict.fromkeys((slices[n].start, slices[n].stop)
                                                                               for n in names)]
        self.register_buffer("condition_columns", torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.self_condition = not names
        self.layers = nn.ModuleList()
        width = self.embedding.output_dim
        for size in hidden:
            condition_dim = width if self.self_condition else len(self.condition_columns)
            self.layers.append(APGLinear(width, size, condition_dim, rank,
                                         generator_hidden, overparam_dim))
            width = size
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def bottom(self, features: Mapping[str, Tensor]) -> Tensor:
        flat, h = self.embedding.embed_and_interact(features)  # embedded (B, D), what the layers read
        condition = None if self.self_condition else flat.index_select(-1, self.condition_columns)
        for layer in self.layers:
            h = self.dropout(self.activation(layer(h, h if condition is None else condition)))
        return h

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        shared = self.bottom(features)
        return {name: squeeze_logit(tower(shared)) for name, tower in self.towers.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.layers)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        last = self.layers[-1]
        return [*last.v_factors, last.bias]
