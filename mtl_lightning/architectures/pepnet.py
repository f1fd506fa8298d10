"""PEPNet: Parameter and Embedding Personalized Network.

Chang, J., Zhang, C., Hui, Y., Leng, D., Niu, Y., Song, Y., Gai, K.
"PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information." KDD 2023.

Both personalisations use Gate NU, ``delta = gamma * sigmoid(W2 relu(W1 x + b1) + b2)``
with ``gamma = 2`` (so gates lie in ``(0, 2)``).

* EPNet (embedding personalisation, per domain): the general embedding ``E``
  (every feature) is scaled elementwise by a gate
  on the domain-side embedding concatenated with the *stop-gradient* general
  embedding: ``O_ep = GateNU(E_d ++ sg(E)) * E``. The gate's loss signal
  therefore trains the domain embedding and the gate, never ``E`` through the
  gate input.
* PPNet (parameter personalisation, per task): every task has its own tower;
  before each of its linear layers ``l`` the hidden input is scaled by a gate
  on the personalised prior features (user/item/author ids) concatenated with
  the stop-gradient EPNet output: ``delta_l = GateNU_l(E_prior ++ sg(O_ep))``,
  one Gate NU per layer whose output is split into one part per task,
  ``H_{l+1} = act((delta_l,task * H_l) W_l + b_l)``.

Choices where the paper is open: the domain-side input ``E_d`` is the
embedding of the domain feature plus any ``domain_side_features``; these and
the prior features also stay in the general embedding ``E`` (so the towers
see the domain directly too); the output layer's input is gated too;
``gate_hidden`` is the Gate NU hidden width.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ScaledSigmoidGate, activation_layer, check_feature_names
from ..registry import register
from ..tasks import Task
from .base import MultiScenarioArchitecture, parameters_of, squeeze_logit


@register("pepnet")
class PEPNet(MultiScenarioArchitecture):
    """embedding -> EPNet (domain gate on the general embedding) -> per-task towers gated by PPNet."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        domain_side_features: Sequence[str] = (),
        prior_features: Sequence[str] = (),
        tower_hidden: Sequence[int] = (128, 64),
        gate_hidden: int = 64,
        gate_scale: float = 2.0,
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, domain_feature, num_domains, interaction=interaction)
        self.domain_side = self.domain_and("domain_side_features", domain_side_features)
        self.prior = check_feature_names("PEPNet", "prior_features", prior_features, self.features)
        if domain_feature in self.prior:
            raise ValueError("PEPNet: prior_features must not contain the domain feature")
        for part, names in (("domain", self.domain_side), ("prior", self.prior)):
            self.register_buffer(f"{part}_columns", self.columns(names), persistent=False)  # where it sits in (B, D)
        # E, the general input: every feature's embedding, the input layer's output (after an interaction=, if any)
        general_dim = self.embedding.output_dim
        domain_dim, prior_dim = (len(getattr(self, f"{p}_columns")) for p in ("domain", "prior"))
        self.epnet = ScaledSigmoidGate(domain_dim + general_dim, gate_hidden, general_dim, gate_scale)

        widths = [general_dim, *tower_hidden]  # inputs of each tower linear layer
        self.ppnet = nn.ModuleList(
            ScaledSigmoidGate(prior_dim + general_dim, gate_hidden, len(self.tasks) * w, gate_scale) for w in widths
        )
        self.towers = nn.ModuleDict(
            {t: nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, [*tower_hidden, self.output_width(t)]))
             for t in self.task_names}
        )
        self.widths = widths
        self.activation = activation_layer(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _part(self, flat: Tensor, part: str) -> Tensor:
        return flat.index_select(-1, getattr(self, f"{part}_columns"))

    def epnet_gate(self, flat: Tensor, general: Tensor) -> Tensor:
        """``delta_domain = GateNU(E_d ++ sg(E))``: ``(B, general_dim)`` in ``(0, gate_scale)``; ``E_d`` from the
        embedded ``flat``, ``E = general`` (the input layer's output)."""
        return self.epnet(torch.cat([self._part(flat, "domain"), general.detach()], dim=-1))

    def ppnet_gates(self, flat: Tensor, epnet_output: Tensor) -> list[Tensor]:
        """``delta_l = GateNU_l(E_prior ++ sg(O_ep))`` per tower layer: each ``(B, T, width_l)``."""
        gate_input = torch.cat([self._part(flat, "prior"), epnet_output.detach()], dim=-1)
        return [gate(gate_input).view(-1, len(self.tasks), w) for gate, w in zip(self.ppnet, self.widths)]

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.domain_ids(features)
        flat, general = self.embedding.embed_and_interact(features)  # embedded (B, D); E (B, general_dim)
        epnet_output = self.epnet_gate(flat, general) * general  # O_ep, (B, general_dim)
        gates = self.ppnet_gates(flat, epnet_output)
        outputs = {}
        for k, name in enumerate(self.task_names):
            h = epnet_output
            layers = self.towers[name]
            for layer, (linear, gate) in enumerate(zip(layers, gates)):
                h = linear(gate[:, k] * h)
                if layer < len(layers) - 1:
                    h = self.dropout(self.activation(h))
            outputs[name] = squeeze_logit(h)  # (B,), or (B, K) for a multi-class task
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        """Embeddings, EPNet and the PPNet gate networks (each PPNet gate serves every task)."""
        return parameters_of(self.embedding, self.epnet, self.ppnet)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.epnet.mlp.last_linear())
