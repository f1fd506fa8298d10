"""HiNet: hierarchical information extraction for multi-scenario, multi-task learning.

Zhou, J., Cao, X., Li, W., Bo, L., Zhang, K., Luo, C., Yu, Q. "HiNet: Novel Multi-Scenario & Multi-Task Learning
with Hierarchical Information Extraction." ICDE 2023.

Two extraction layers, scenarios first, then tasks. For an example of scenario ``d`` with embedding ``x``:

* scenario extraction layer:
  - scenario-shared experts mixed by scenario ``d``'s gate: ``G = sum_i g^d_i(x) shared_i(x)``;
  - every scenario ``j`` has its own experts mixed by its own gate: ``S_j = sum_i g^j_i(x) expert^j_i(x)``;
  - the scenario-aware attentive network (SAN) weighs the *other* scenarios' representations by attention
    computed from the scenario embedding ``e_d`` (the domain feature's embedding):
    ``w = softmax_{j != d}(W e_d + b)`` and ``A = sum_{j != d} w_j S_j``;
  - the scenario representation is ``C = [G ; S_d ; A]``;
* task extraction layer: a customized gate control (CGC, PLE's extraction level, ``ple.ExtractionLevel``) over
  ``C``: task-specific and task-shared experts, one gate per task, then one tower per task.

Choices where the paper is open: the gates are single softmax layers on ``x`` (the scenario layer) or ``C`` (the
task layer), as in PLE; SAN's attention is one linear layer on the scenario embedding with the example's own
scenario masked out (with a single scenario there is no other one and ``A`` is zero). Scenario ``d``'s own experts
are trained by its rows directly and by the other scenarios' rows through SAN, which is how the paper transfers
between scenarios.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiScenarioArchitecture, parameters_of, squeeze_logit
from .ple import ExtractionLevel


@register("hinet")
class HiNet(MultiScenarioArchitecture):
    """embedding -> scenario extraction (shared, own and SAN-weighted other scenarios) -> CGC task extraction."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        num_shared_experts: int = 2,
        num_scenario_experts: int = 1,
        scenario_expert_hidden: Sequence[int] = (128,),
        num_task_experts: int = 1,
        num_task_shared_experts: int = 1,
        task_expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, domain_feature, num_domains, interaction=interaction)
        dim = self.embedding.output_dim
        self.scenario_slice = self.domain_slice
        S = self.num_domains
        self.shared_experts = ExpertBank(num_shared_experts, dim, scenario_expert_hidden, activation, dropout)
        self.shared_gates = nn.ModuleList(Gate(dim, num_shared_experts) for _ in range(S))
        # every scenario's experts in one bank: experts [j * n, (j + 1) * n) belong to scenario j
        self.num_scenario_experts = num_scenario_experts
        self.scenario_experts = ExpertBank(S * num_scenario_experts, dim, scenario_expert_hidden, activation, dropout)
        self.scenario_gates = nn.ModuleList(Gate(dim, num_scenario_experts) for _ in range(S))
        self.san = nn.Linear(self.scenario_slice.stop - self.scenario_slice.start, S)
        width = self.shared_experts.output_dim
        self.task_layer = ExtractionLevel(self.task_names, 3 * width, num_task_experts, num_task_shared_experts,
                                          task_expert_hidden, activation, dropout, with_shared_gate=False)
        self.towers = self._towers(self.task_layer.output_dim, tower_hidden, activation, dropout)

    def scenario_representations(self, x: Tensor) -> Tensor:
        """``S_j`` of every scenario ``j`` for every example: ``(B, S, H)``."""
        experts = self.scenario_experts(x)  # (B, S * n, H)
        experts = experts.view(x.shape[0], self.num_domains, self.num_scenario_experts, -1)  # (B, S, n, H)
        return torch.stack([mix(gate(x), experts[:, j]) for j, gate in enumerate(self.scenario_gates)], dim=1)

    def san_weights(self, scenario: Tensor, domain: Tensor) -> Tensor:
        """SAN's attention over the other scenarios: ``(B, S)``, zero on the own scenario, rows sum to one
        (all zero with a single scenario). ``scenario`` is the scenario feature's embedding ``(B, d)``."""
        scores = self.san(scenario)  # (B, S)
        own = F.one_hot(domain, self.num_domains).bool()
        if self.num_domains == 1:
            return torch.zeros_like(scores)
        return torch.softmax(scores.masked_fill(own, float("-inf")), dim=-1)

    def scenario_layer(self, x: Tensor, domain: Tensor, scenario: Tensor) -> Tensor:
        """``C = [G ; S_d ; A]``: ``(B, 3H)``; ``scenario`` is the scenario feature's embedding (SAN's input)."""
        rows = torch.arange(x.shape[0], device=x.device)
        shared_experts = self.shared_experts(x)  # (B, Es, H)
        gates = torch.stack([gate(x) for gate in self.shared_gates], dim=1)[rows, domain]  # (B, Es): own scenario's
        shared = mix(gates, shared_experts)  # G: (B, H)
        every = self.scenario_representations(x)  # (B, S, H)
        own = every[rows, domain]  # S_d: (B, H)
        others = torch.einsum("bs,bsh->bh", self.san_weights(scenario, domain), every)  # A: (B, H)
        return torch.cat([shared, own, others], dim=-1)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        domain = self.domain_ids(features)
        flat, x = self.embedding.embed_and_interact(features)  # embedded (B, D), what the experts read
        c = self.scenario_layer(x, domain, flat[:, self.scenario_slice])  # (B, 3H)
        task_outputs, _ = self.task_layer({t: c for t in self.task_names}, c)
        return {t: squeeze_logit(self.towers[t](task_outputs[t])) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.shared_experts, self.shared_gates, self.scenario_experts,
                             self.scenario_gates, self.san, self.task_layer.shared)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.task_layer.shared.last_layer_parameters()
