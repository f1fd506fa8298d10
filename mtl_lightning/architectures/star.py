"""STAR: Star Topology Adaptive Recommender.

Sheng, X.-R., Zhao, L., Zhou, G., Ding, X., Dai, B., Luo, Q., Yang, S., Lv,
J., Zhang, C., Deng, H., Zhu, X. "One Model to Serve All: Star Topology
Adaptive Recommender for Multi-Domain CTR Prediction." CIKM 2021.

Three parts, for ``P`` domains:

* Partitioned normalization of the embedding: shared and per-domain scale
  and shift, ``z' = (gamma * gamma_p) (z - mu) / sqrt(var + eps) + (beta + beta_p)``,
  each domain with its own moving statistics at evaluation (see
  ``mtl_lightning.layers.PartitionedNorm``).
* Star-topology fully-connected layers: a shared centre ``W, b`` and one
  ``W_p, b_p`` per domain; a row of domain ``p`` goes through the effective
  layer ``W_p * W`` (elementwise) and ``b_p + b``. ``W_p`` starts at ones and
  ``b_p`` at zeros, so every domain starts from the shared network.
* An auxiliary network on the domain indicator's embedding whose output is
  added to the main logit, so the domain itself directly shifts the prediction.

Multi-task: the star hidden layers are shared by the tasks; every task has its
own star output layer and its own auxiliary network, ``logit_t = star_t(h) +
aux_t(e_domain)``. The auxiliary network reads only the domain feature's
embedding (plus the features named in ``auxiliary_features``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, PartitionedNorm, activation_layer
from ..registry import register
from ..tasks import Task
from .base import MultiScenarioArchitecture, parameters_of, squeeze_logit


class StarLinear(nn.Module):
    """Linear layer with weight ``W_p * W`` and bias ``b_p + b`` for a row of domain ``p``."""

    def __init__(self, input_dim: int, output_dim: int, num_domains: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(input_dim)
        self.weight = nn.Parameter(torch.empty(input_dim, output_dim).uniform_(-bound, bound))  # W (shared)
        self.bias = nn.Parameter(torch.empty(output_dim).uniform_(-bound, bound))  # b (shared)
        self.domain_weight = nn.Parameter(torch.ones(num_domains, input_dim, output_dim))  # W_p
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, output_dim))  # b_p

    def effective_weight(self) -> Tensor:
        """``W_p * W`` for every domain: ``(P, N, M)``."""
        return self.domain_weight * self.weight

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        every = torch.einsum("bi,pio->bpo", x, self.effective_weight())  # (B, P, M): P small
        rows = torch.arange(x.shape[0], device=x.device)
        return every[rows, domain] + self.bias + self.domain_bias[domain]


@register("star")
class STAR(MultiScenarioArchitecture):
    """embedding -> partitioned norm -> star-topology layers -> per-task star output + auxiliary network."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        star_hidden: Sequence[int] = (256, 128),
        auxiliary_hidden: Sequence[int] = (32,),
        auxiliary_features: Sequence[str] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        norm_momentum: float = 0.1,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        if len(star_hidden) == 0:
            raise ValueError("star_hidden must list at least one layer size")
        super().__init__(features, tasks, domain_feature, num_domains, interaction=interaction)
        names = self.domain_and("auxiliary_features", auxiliary_features)
        self.register_buffer("auxiliary_columns", self.columns(names), persistent=False)
        self.norm = PartitionedNorm(self.embedding.output_dim, self.num_domains, momentum=norm_momentum)
        self.layers = nn.ModuleList()
        width = self.embedding.output_dim
        for size in star_hidden:
            self.layers.append(StarLinear(width, size, self.num_domains))
            width = size
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.outputs = nn.ModuleDict({t: StarLinear(width, self.output_width(t), self.num_domains)
                                      for t in self.task_names})
        self.auxiliary = nn.ModuleDict(
            {t: MLP(len(self.auxiliary_columns), auxiliary_hidden, output_dim=self.output_width(t),
                    activation=activation)
             for t in self.task_names}
        )

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        domain = self.domain_ids(features)
        flat, x = self.embedding.embed_and_interact(features)  # embedded (B, D), what the star layers read
        h = self.norm(x, domain)
        for layer in self.layers:
            h = self.dropout(self.activation(layer(h, domain)))  # (B, H_l)
        auxiliary_input = flat.index_select(-1, self.auxiliary_columns)
        return {
            t: squeeze_logit(self.outputs[t](h, domain) + self.auxiliary[t](auxiliary_input)) for t in self.task_names
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.norm, self.layers)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [self.layers[-1].weight, self.layers[-1].bias]
