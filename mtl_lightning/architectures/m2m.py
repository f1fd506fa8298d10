"""M2M: multi-scenario multi-task meta learning.

Zhang, Q., Liao, X., Liu, Q., Xu, J., Zheng, B. "Leaving No One Behind: A Multi-Scenario Multi-Task Meta Learning
Approach for Advertiser Modeling." WSDM 2022.

Shared experts read the embedding of every feature: ``E_i = expert_i(x)``, ``(B, K, H)``. A scenario knowledge
representation ``s = MLP(embedding of the scenario features)`` (the scenario id and any scenario-side features)
generates the weights of two "meta" parts, so every scenario gets its own parameters from one shared generator:

* meta unit: a layer whose weight and bias are linear functions of ``s``:
  ``meta(z; s) = act(z W(s) + b(s))`` with ``W(s) = reshape(V_W s + c_W)`` and ``b(s) = V_b s + c_b``;
* meta attention (per task ``k`` with a learned task embedding ``t_k``): the score of expert ``i`` is
  ``v^T meta([E_i ; t_k]; s)``, ``a = softmax_i(score)`` and the task representation is ``R_k = sum_i a_i E_i``;
* meta tower (per task): ``L`` residual meta layers ``h <- h + meta(h; s)`` from ``h = R_k``, then a linear
  output layer to the logit (or value).

Choices where the paper is open or differs from this library:

* The paper's backbone encodes the advertiser's behaviour sequences with a Transformer before the experts; here
  the experts read the shared ``FeatureEmbedding`` (sequence features pooled), as every architecture does.
* ``scenario_features`` defaults to the domain feature alone; the paper adds scenario statistics, which are
  given here as more feature names.
* The meta attention's hidden width ``attention_dim`` and the number of meta tower layers ``tower_layers`` are
  hyper-parameters (the paper uses one attention layer and a few tower layers); ReLU is the meta unit's
  activation, as in the paper.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, ExpertBank, activation_layer
from ..registry import register
from ..tasks import Task
from .base import MultiScenarioArchitecture, parameters_of, squeeze_logit


class MetaUnit(nn.Module):
    """``act(z W(s) + b(s))``: a linear layer ``in_dim -> out_dim`` whose weight and bias are generated from ``s``.

    ``z`` is ``(B, in_dim)`` or ``(B, N, in_dim)`` (the same generated layer for the ``N`` rows of an example);
    ``s`` is ``(B, scenario_dim)``.
    """

    def __init__(self, scenario_dim: int, in_dim: int, out_dim: int, activation: str = "relu") -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight_generator = nn.Linear(scenario_dim, in_dim * out_dim)
        self.bias_generator = nn.Linear(scenario_dim, out_dim)
        with torch.no_grad():  # generated weights start near nn.Linear's scale (1 / sqrt(in_dim))
            self.weight_generator.weight.mul_(1.0 / in_dim ** 0.5)
            self.weight_generator.bias.mul_(1.0 / in_dim ** 0.5)
        self.activation = activation_layer(activation)

    def generated(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The example-specific ``W(s)``, ``(B, in, out)``, and ``b(s)``, ``(B, out)``."""
        return self.weight_generator(s).view(-1, self.in_dim, self.out_dim), self.bias_generator(s)

    def forward(self, z: Tensor, s: Tensor) -> Tensor:
        weight, bias = self.generated(s)
        if z.dim() == 2:
            return self.activation(torch.einsum("bi,bio->bo", z, weight) + bias)  # (B, out)
        return self.activation(torch.einsum("bni,bio->bno", z, weight) + bias.unsqueeze(1))  # (B, N, out)


@register("m2m")
class M2M(MultiScenarioArchitecture):
    """embedding -> shared experts; scenario knowledge -> meta attention over the experts and a meta tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        scenario_features: Sequence[str] = (),
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (128, 64),
        scenario_hidden: Sequence[int] = (32,),
        attention_dim: int = 32,
        tower_layers: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        if tower_layers < 0 or attention_dim < 1:
            raise ValueError(f"M2M: tower_layers must be >= 0 and attention_dim >= 1, got {tower_layers} and "
                             f"{attention_dim}")
        if not scenario_hidden:
            raise ValueError("M2M: scenario_hidden must list at least one layer size")
        super().__init__(features, tasks, domain_feature, num_domains, interaction=interaction)
        self.scenario_features = self.domain_and("scenario_features", scenario_features)
        spans = dict.fromkeys((self.feature_slices[n].start, self.feature_slices[n].stop) for n in self.scenario_features)
        self.scenario_slices = [slice(start, stop) for start, stop in spans]  # a sequence group's members share one
        scenario_input = sum(s.stop - s.start for s in self.scenario_slices)
        self.scenario_mlp = MLP(scenario_input, scenario_hidden, activation=activation, dropout=dropout)
        self.experts = ExpertBank(num_experts, self.embedding.output_dim, expert_hidden, activation, dropout)
        width = self.experts.output_dim
        self.task_embeddings = nn.Parameter(torch.randn(len(self.tasks), width) * 0.1)  # t_k
        self.attention = MetaUnit(self.scenario_mlp.output_dim, 2 * width, attention_dim)
        self.attention_vector = nn.Linear(attention_dim, 1, bias=False)  # v
        self.towers = nn.ModuleDict({
            t: nn.ModuleList(MetaUnit(self.scenario_mlp.output_dim, width, width) for _ in range(tower_layers))
            for t in self.task_names
        })
        self.outputs = nn.ModuleDict({t: nn.Linear(width, self.output_width(t)) for t in self.task_names})

    def scenario_knowledge(self, flat: Tensor) -> Tensor:
        """``s``: the scenario MLP over the scenario features' embeddings (read from the embedded ``flat``), ``(B, S)``."""
        return self.scenario_mlp(torch.cat([flat[:, part] for part in self.scenario_slices], dim=-1))

    def attention_weights(self, experts: Tensor, s: Tensor, task_index: int) -> Tensor:
        """Meta attention of one task over the experts: ``(B, K)``, rows sum to one."""
        t = self.task_embeddings[task_index].expand(experts.shape[0], experts.shape[1], -1)  # (B, K, H)
        scores = self.attention_vector(self.attention(torch.cat([experts, t], dim=-1), s))  # (B, K, 1)
        return torch.softmax(scores.squeeze(-1), dim=-1)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.domain_ids(features)  # checks the ids
        flat, x = self.embedding.embed_and_interact(features)  # embedded (B, D), what the experts read
        s = self.scenario_knowledge(flat)  # (B, S)
        experts = self.experts(x)  # (B, K, H)
        outputs: dict[str, Tensor] = {}
        for k, task in enumerate(self.task_names):
            h = torch.einsum("bk,bkh->bh", self.attention_weights(experts, s, k), experts)  # R_k: (B, H)
            for layer in self.towers[task]:
                h = h + layer(h, s)  # residual meta layer
            outputs[task] = squeeze_logit(self.outputs[task](h))  # (B,), or (B, K) for a multi-class task
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.experts, self.scenario_mlp, self.attention, self.attention_vector)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()
