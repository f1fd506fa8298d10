"""Multi-gate Mixture-of-Experts (MMoE).

Ma, J., Zhao, Z., Yi, X., Chen, J., Hong, L., Chi, E. H. "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts."
KDD 2018.

A bank of expert MLPs reads the shared embedding. Every task k has its own
softmax gate g_k(x) over the experts; the task's tower reads the gate-weighted
sum f_k(x) = sum_e g_k(x)_e * expert_e(x) and ends in one logit.

``single_gate=True`` is OMoE, the one-gate baseline of the same paper: one
softmax gate g(x) shared by every task, so all towers read the same mixture
f(x) = sum_e g(x)_e * expert_e(x) (and the gate is a shared parameter).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


@register("mmoe")
class MMoE(MultiTaskArchitecture):
    """embedding -> experts; one softmax gate (one for all tasks with ``single_gate``: OMoE) and one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        single_gate: bool = False,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        self.single_gate = bool(single_gate)
        self.embedding = self.input_layer()
        self.experts = ExpertBank(num_experts, self.embedding.output_dim, expert_hidden, activation, dropout)
        gate_names = ["shared"] if self.single_gate else self.task_names  # OMoE: one gate for every task
        self.gates = nn.ModuleDict({name: Gate(self.embedding.output_dim, num_experts) for name in gate_names})
        self.towers = self._towers(self.experts.output_dim, tower_hidden, activation, dropout)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = self.embedding(features)  # (B, D)
        experts = self.experts(x)  # (B, E, H)
        if self.single_gate:
            mixed = mix(self.gates["shared"](x), experts)  # (B, H), read by every tower
            return {name: squeeze_logit(self.towers[name](mixed)) for name in self.task_names}
        return {name: squeeze_logit(self.towers[name](mix(self.gates[name](x), experts))) for name in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        if self.single_gate:
            return parameters_of(self.embedding, self.experts, self.gates)
        return parameters_of(self.embedding, self.experts)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()
