"""MetaHeac: Meta Hybrid Experts and Critics.

Zhu, Y., Liu, Y., Xie, R., Zhuang, F., Hao, X., Ge, K., Zhang, X., Lin, L., Cao, J. "Learning to Expand Audience
via Meta Hybrid Experts and Critics for Recommendation and Advertising." KDD 2021.

Every audience-expansion task (here: every scenario, the id in ``domain_feature``) shares one network whose parts
are picked by the task's embedding ``t`` (the domain feature's embedding):

* hybrid experts: ``E`` expert MLPs read the whole embedding ``x``; a task gate ``softmax(W_g t + b_g)`` mixes them
  into the representation ``r = sum_i g_i(t) expert_i(x)``;
* critics: ``C`` critic MLPs each predict a logit from ``r``; a second task gate mixes them,
  ``logit = sum_j c_j(t) critic_j(r)``.

Multi-task: the paper predicts one label; here every task has its own expert gate, critics and critic gate over
the shared experts (so a second task is one more "head" of the same form).

Choices where the paper is open or where this library draws the line:

* The critics' outputs are mixed as logits (binary; per class for a multi-class task) or values (regression), so
  the output is a logit as the contract asks; a mixture of probabilities would need the log-space product of HMoE
  for no gain here.
* The paper trains with meta-learning: a local update on each task's support set, then a global update on the
  query sets (MAML-style). That is a training procedure, not a layer; this network is trained like every other
  architecture by ``MultiTaskLightningModule`` (joint training over every scenario's rows, the limit of the global
  update without the local step). The task-conditioned gates, which let one network serve every task, are the
  paper's architecture in full.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiScenarioArchitecture, parameters_of, squeeze_logit


@register("metaheac")
class MetaHeac(MultiScenarioArchitecture):
    """embedding -> shared experts; per task: a scenario-conditioned expert gate, critics and a critic gate."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        num_critics: int = 3,
        critic_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        if num_critics < 1:
            raise ValueError(f"MetaHeac: num_critics must be >= 1, got {num_critics}")
        super().__init__(features, tasks, domain_feature, num_domains, interaction=interaction)
        self.task_slice = self.domain_slice  # the task embedding t inside x: the domain's
        task_dim = self.task_slice.stop - self.task_slice.start
        self.experts = ExpertBank(num_experts, self.embedding.output_dim, expert_hidden, activation, dropout)
        self.expert_gates = nn.ModuleDict({t: Gate(task_dim, num_experts) for t in self.task_names})
        self.critics = nn.ModuleDict({
            t: nn.ModuleList(MLP(self.experts.output_dim, critic_hidden, output_dim=self.output_width(t),
                                 activation=activation, dropout=dropout) for _ in range(num_critics))
            for t in self.task_names
        })
        self.critic_gates = nn.ModuleDict({t: Gate(task_dim, num_critics) for t in self.task_names})

    def critic_outputs(self, representation: Tensor, task: str) -> Tensor:
        """Every critic's logit (or value) for ``task``: ``(B, C)``, or ``(B, C, K)`` for a multi-class task."""
        return squeeze_logit(torch.stack([critic(representation) for critic in self.critics[task]], dim=1))

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.domain_ids(features)  # checks the ids
        flat, x = self.embedding.embed_and_interact(features)  # embedded (B, D), what the experts read
        t = flat[:, self.task_slice]  # (B, d): the scenario's (task's) embedding
        experts = self.experts(x)  # (B, E, H)
        outputs: dict[str, Tensor] = {}
        for task in self.task_names:
            representation = mix(self.expert_gates[task](t), experts)  # (B, H)
            critics = self.critic_outputs(representation, task)  # (B, C) or (B, C, K)
            gate = self.critic_gates[task](t)  # (B, C)
            outputs[task] = (gate.view(*gate.shape, *([1] * (critics.dim() - 2))) * critics).sum(1)  # (B,) / (B, K)
        return outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.experts)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()
