"""POSO: Personalized Cold Start Modules, on MLP layers and on MMoE experts.

Dai, S., Lin, H., Zhao, Z., Lin, J., Wu, H., Wang, Z., Yang, S., Liu, J.
"POSO: Personalized Cold Start Modules for Large-scale Recommender Systems."
arXiv:2108.04690, 2021.

A personalised gate reads the personalisation code ``x_pc`` (features that
separate user groups, such as a new-user flag or activity level):
``g(x_pc) = C * sigmoid(MLP(x_pc))`` with ``C = 2``, values in ``(0, C)``.
It multiplies the modules of an existing network, so each user group gets
its own effective network while all groups share the parameters:

* POSO-MLP: every shared-bottom layer's units are scaled by their own gate,
  ``h_l = g_l(x_pc) * act(W_l h_{l-1} + b_l)``; task towers follow.
* POSO-MMoE: every expert's output is scaled by one gate value per expert
  before the task gates mix them, ``x_k = sum_e g_k(x)_e * C sigmoid(MLP(x_pc))_e * expert_e(x)``.

Choices where the paper is open: ``personalization_features`` names the
features forming ``x_pc``; with none named the gate reads the whole input
embedding. Gate MLPs have one hidden layer of ``gate_hidden`` units (ReLU).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import (ExpertBank, FeatureEmbedding, Gate, ScaledSigmoidGate, activation_layer, check_feature_names,
                      feature_slices, mix)
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class _PersonalizationCode(nn.Module):
    """Picks the ``x_pc`` columns out of the embedded flat vector (all of them when no feature is named)."""

    def __init__(self, embedding: FeatureEmbedding, names: tuple[str, ...]) -> None:
        super().__init__()
        slices = feature_slices(embedding)
        spans = dict.fromkeys((slices[n].start, slices[n].stop) for n in names)  # a group's members share a span
        columns = [torch.arange(start, stop) for start, stop in spans] or [torch.arange(embedding.embedded_dim)]
        self.register_buffer("columns", torch.cat(columns), persistent=False)
        self.output_dim = len(self.columns)

    def forward(self, flat: Tensor) -> Tensor:
        return flat.index_select(-1, self.columns)


@register("poso_mlp")
class POSOMLP(MultiTaskArchitecture):
    """embedding -> shared-bottom layers each scaled by a personalised gate -> one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        personalization_features: Sequence[str] = (),
        bottom_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        gate_hidden: int = 32,
        gate_scale: float = 2.0,
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if len(bottom_hidden) == 0:
            raise ValueError("bottom_hidden must list at least one layer size")
        names = check_feature_names("POSOMLP", "personalization_features", personalization_features, self.features)
        self.embedding = self.input_layer()
        self.code = _PersonalizationCode(self.embedding, names)
        self.layers = nn.ModuleList()
        self.gates = nn.ModuleList()
        width = self.embedding.output_dim
        for size in bottom_hidden:
            self.layers.append(nn.Linear(width, size))
            self.gates.append(ScaledSigmoidGate(self.code.output_dim, gate_hidden, size, gate_scale))
            width = size
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def bottom(self, features: Mapping[str, Tensor]) -> Tensor:
        flat, h = self.embedding.embed_and_interact(features)  # embedded (B, D), what the layers read
        code = self.code(flat)  # (B, D_pc)
        for layer, gate in zip(self.layers, self.gates):
            h = self.dropout(gate(code) * self.activation(layer(h)))  # (B, H_l)
        return h

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        shared = self.bottom(features)
        return {name: squeeze_logit(tower(shared)) for name, tower in self.towers.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.layers, self.gates)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.layers[-1])


@register("poso_mmoe")
class POSOMMoE(MultiTaskArchitecture):
    """embedding -> experts scaled by a personalised per-expert gate -> per-task softmax gates and towers."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        personalization_features: Sequence[str] = (),
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        gate_hidden: int = 32,
        gate_scale: float = 2.0,
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        names = check_feature_names("POSOMMoE", "personalization_features", personalization_features, self.features)
        self.embedding = self.input_layer()
        self.code = _PersonalizationCode(self.embedding, names)
        self.experts = ExpertBank(num_experts, self.embedding.output_dim, expert_hidden, activation, dropout)
        self.personal_gate = ScaledSigmoidGate(self.code.output_dim, gate_hidden, num_experts, gate_scale)
        self.gates = nn.ModuleDict({name: Gate(self.embedding.output_dim, num_experts) for name in self.task_names})
        self.towers = self._towers(self.experts.output_dim, tower_hidden, activation, dropout)

    def personalized_experts(self, flat: Tensor, x: Tensor) -> Tensor:
        """``C sigmoid(MLP(x_pc))_e * expert_e(x)``: ``(B, E, H)`` (``x_pc`` from the embedded ``flat``)."""
        return self.personal_gate(self.code(flat)).unsqueeze(-1) * self.experts(x)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        flat, x = self.embedding.embed_and_interact(features)  # embedded (B, D), what the experts read
        experts = self.personalized_experts(flat, x)  # (B, E, H)
        return {name: squeeze_logit(self.towers[name](mix(self.gates[name](x), experts)))
                for name in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.experts, self.personal_gate)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()
