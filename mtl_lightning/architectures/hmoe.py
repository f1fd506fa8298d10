"""HMoE: multi-scenario MMoE combined in label space.

Li, P., Li, R., Da, Q., Zeng, A.-X., Zhang, L. "Improving Multi-Scenario
Learning to Rank in E-commerce by Exploiting Task Relationships in the Label
Space." CIKM 2020.

Scenarios play the role of MMoE's tasks: shared experts read the embedding,
and every scenario ``s`` has its own softmax gate and tower, so every example
gets a prediction ``y_s`` from *every* scenario's tower. A stacked gate then
combines these predictions in label space: for an example of scenario ``d``,
``y = sum_s G_d(x)_s y_s`` with ``G_d`` a softmax gate of scenario ``d`` on the
input. Task-constrained back-propagation: the predictions of the other
scenarios enter the combination as constants (stop-gradient), so the loss of
an example of scenario ``d`` trains only scenario ``d``'s tower, gate and
stacked gate (and the shared experts and embeddings); other scenarios'
towers only lend their predictions.

Multi-task: the construction is repeated per task (every task has its own
per-scenario gates, towers and stacked gates over the shared experts). Binary
tasks mix probabilities, ``p = sum_s G_s sigmoid(l_s)``, and return
``logit(p)`` computed in log space (``log p - log(1 - p)`` with
``logsumexp``), so no probability is ever rounded to 0 or 1; multi-class
tasks mix class distributions, ``p_c = sum_s G_s softmax(l_s)_c``, and return
``log p_c`` (``logsumexp`` of ``log G_s + log_softmax(l_s)_c``), logits whose
softmax is that mixture; regression tasks mix values.

Choice where the paper is open: the stacked gate of scenario ``d`` starts with
bias ``own_scenario_bias`` on scenario ``d`` and 0 on the others (weight
``e^b / (e^b + S - 1)`` on its own prediction, 0.79 for ``b = 2, S = 3``), so
training starts near per-scenario predictions and learns how much to borrow
from the other scenarios; ``own_scenario_bias = 0`` starts from a uniform mix.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiScenarioArchitecture, parameters_of, squeeze_logit


@register("hmoe")
class HMoE(MultiScenarioArchitecture):
    """embedding -> shared experts; per task and scenario a gate and a tower; per task a stacked gate per scenario."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        own_scenario_bias: float = 2.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, domain_feature, num_domains, interaction=interaction)
        dim = self.embedding.output_dim
        self.experts = ExpertBank(num_experts, dim, expert_hidden, activation, dropout)
        scenarios = range(self.num_domains)
        # gates[task][s], towers[task][s], stacked_gates[task][d]
        self.gates = nn.ModuleDict(
            {t: nn.ModuleList(Gate(dim, num_experts) for _ in scenarios) for t in self.task_names}
        )
        self.towers = nn.ModuleDict(
            {t: nn.ModuleList(MLP(self.experts.output_dim, tower_hidden, output_dim=self.output_width(t),
                                  activation=activation, dropout=dropout) for _ in scenarios) for t in self.task_names}
        )
        self.stacked_gates = nn.ModuleDict(
            {t: nn.ModuleList(Gate(dim, self.num_domains) for _ in scenarios) for t in self.task_names}
        )
        with torch.no_grad():  # each stacked gate starts favouring its own scenario's prediction
            for gates in self.stacked_gates.values():
                for d, gate in enumerate(gates):
                    gate.linear.bias.zero_()
                    gate.linear.bias[d] = own_scenario_bias

    def scenario_predictions(self, x: Tensor, experts: Tensor, task: str) -> Tensor:
        """Every scenario tower's output for every example: ``(B, S)`` logits (or values), ``(B, S, K)`` for a
        multi-class task."""
        return squeeze_logit(torch.stack(
            [self.towers[task][s](mix(self.gates[task][s](x), experts)) for s in range(self.num_domains)], dim=1
        ))

    def combination_weights(self, x: Tensor, domain: Tensor, task: str) -> Tensor:
        """The stacked gate of each example's own scenario: ``(B, S)``, rows sum to one."""
        rows = torch.arange(x.shape[0], device=x.device)
        every = torch.stack([gate(x) for gate in self.stacked_gates[task]], dim=1)  # (B, S_target, S)
        return every[rows, domain]

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        domain = self.domain_ids(features)
        x = self.embedding(features)  # (B, D)
        experts = self.experts(x)  # (B, E, H)
        own = F.one_hot(domain, self.num_domains).bool()  # (B, S)
        outputs: dict[str, Tensor] = {}
        for task in self.tasks:
            predictions = self.scenario_predictions(x, experts, task.name)  # (B, S), multiclass (B, S, K)
            # task-constrained back-propagation: other scenarios' predictions are constants
            own_rows = own if predictions.dim() == 2 else own.unsqueeze(-1)
            predictions = torch.where(own_rows, predictions, predictions.detach())
            weights = self.combination_weights(x, domain, task.name)  # (B, S)
            if task.kind == "multiclass":  # log of the mixture of the scenarios' class distributions: (B, K)
                log_w = torch.log(weights.clamp(min=torch.finfo(weights.dtype).tiny)).unsqueeze(-1)
                outputs[task.name] = torch.logsumexp(log_w + F.log_softmax(predictions, dim=-1), dim=1)
            elif task.kind == "binary":
                log_w = torch.log(weights.clamp(min=torch.finfo(weights.dtype).tiny))
                log_p = torch.logsumexp(log_w + F.logsigmoid(predictions), dim=-1)
                log_not_p = torch.logsumexp(log_w + F.logsigmoid(-predictions), dim=-1)
                outputs[task.name] = log_p - log_not_p
            else:
                outputs[task.name] = (weights * predictions).sum(-1)
        return outputs

    def domain_parameters(self, domain: int) -> list[nn.Parameter]:
        """Parameters that belong to scenario ``domain`` (its gates, towers and stacked gates, for every task)."""
        return parameters_of(*(m[t][domain] for m in (self.gates, self.towers, self.stacked_gates)
                               for t in self.task_names))

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.experts)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()
