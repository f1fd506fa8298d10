"""DBMTL: Deep Bayesian Multi-Target Learning.

Wang, Q., Ji, Z., Liu, H., Zhao, B. "Deep Bayesian Multi-Target Learning for
Recommender Systems." arXiv:1902.09154, 2019 (Alibaba).

The targets are modelled as a Bayesian network rather than as independent
outputs, ``p(t_1, ..., t_T | x) = prod_k p(t_k | parents(t_k), x)``: the tower
of a task reads the hidden outputs of the towers of the tasks it depends on.
This file follows the form in Alibaba's EasyRec / TorchEasyRec (``dbmtl``,
``relation_tower_names``), which is what "DBMTL" names in practice:

* the shared input ``x`` is the embedding, through an optional bottom MLP
  (``bottom_hidden``) and, optionally, an MMoE layer (``num_experts > 0``:
  experts on the bottom output, one softmax gate per task), which then gives
  each task its own input ``x_k``;
* each task has a task MLP ``h_k = MLP_k(x_k)`` (``tower_hidden``);
* each task has a relation MLP on its own task output and the relation
  outputs of its parents, ``r_k = RelMLP_k([h_k, r_p1, r_p2, ...])``
  (``relation_hidden``), computed in dependency order;
* the logit is ``Linear(r_k)``.

Gradients flow through the dependencies (a child's loss trains its parents'
towers), as in EasyRec.

Choices: ``dependencies`` maps a task to the tasks it depends on (any order
that has no cycle; parents' relation outputs are concatenated in the order
given); by default every task depends on all tasks listed before it (the
chain rule of the joint probability in task order; EasyRec's default is no
dependency). Every task gets a relation MLP, as in EasyRec (TorchEasyRec makes
it optional per task).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


def dependency_order(task_names: Sequence[str], dependencies: Mapping[str, Sequence[str]]) -> list[str]:
    """Task names with every task after the tasks it depends on (stable: task order where free); checks the graph."""
    known = set(task_names)
    for child, parents in dependencies.items():
        if child not in known:
            raise ValueError(f"DBMTL: dependencies name the unknown task {child!r}; tasks are {list(task_names)}")
        if isinstance(parents, str):
            raise ValueError(f"DBMTL: dependencies[{child!r}] must be a list of task names, got the string {parents!r}")
        unknown = [p for p in parents if p not in known]
        if unknown:
            raise ValueError(f"DBMTL: task {child!r} depends on unknown tasks {unknown}; tasks are {list(task_names)}")
        if child in parents:
            raise ValueError(f"DBMTL: task {child!r} cannot depend on itself")
        if len(set(parents)) != len(parents):
            raise ValueError(f"DBMTL: dependencies[{child!r}] lists a task twice: {list(parents)}")
    order: list[str] = []
    remaining = list(task_names)
    while remaining:
        ready = [t for t in remaining if all(p in order for p in dependencies.get(t, ()))]
        if not ready:
            raise ValueError(f"DBMTL: the dependencies among {remaining} form a cycle: {dict(dependencies)}")
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


@register("dbmtl")
class DBMTL(MultiTaskArchitecture):
    """embedding -> [bottom MLP] -> [MMoE] -> task MLPs -> relation MLPs on the parents' relation outputs -> logits."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        dependencies: Mapping[str, Sequence[str]] | None = None,
        bottom_hidden: Sequence[int] = (256,),
        num_experts: int = 0,
        expert_hidden: Sequence[int] = (128,),
        tower_hidden: Sequence[int] = (64,),
        relation_hidden: Sequence[int] = (32,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0: no MMoE layer), got {num_experts}")
        if not bottom_hidden and not num_experts:
            raise ValueError("DBMTL needs a shared layer below the towers: give bottom_hidden or num_experts > 0")
        if not relation_hidden:
            raise ValueError("relation_hidden must list at least one layer size")
        if dependencies is None:
            dependencies = {t: self.task_names[:k] for k, t in enumerate(self.task_names) if k}
        self.dependencies = {t: list(dependencies.get(t, ())) for t in self.task_names}
        self.order = dependency_order(self.task_names, dependencies)
        self.embedding = self.input_layer()
        self.bottom = MLP(self.embedding.output_dim, bottom_hidden, activation=activation, dropout=dropout)
        width = self.bottom.output_dim
        self.experts = self.gates = None
        if num_experts:
            self.experts = ExpertBank(num_experts, width, expert_hidden, activation, dropout)
            self.gates = nn.ModuleDict({t: Gate(width, num_experts) for t in self.task_names})
            width = self.experts.output_dim
        self.task_mlps = nn.ModuleDict(
            {t: MLP(width, tower_hidden, activation=activation, dropout=dropout) for t in self.task_names})
        self.relation_mlps = nn.ModuleDict()
        for t in self.order:
            relation_in = self.task_mlps[t].output_dim + sum(self.relation_mlps[p].output_dim
                                                             for p in self.dependencies[t])
            self.relation_mlps[t] = MLP(relation_in, relation_hidden, activation=activation, dropout=dropout)
        self.outputs = nn.ModuleDict({t: nn.Linear(self.relation_mlps[t].output_dim, self.output_width(t))
                                      for t in self.task_names})

    def relations(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's relation output ``r_k`` ``(B, R)``, computed parents first."""
        x = self.bottom(self.embedding(features))  # (B, H)
        if self.experts is not None and self.gates is not None:
            experts = self.experts(x)  # (B, E, He)
            task_inputs = {t: mix(self.gates[t](x), experts) for t in self.task_names}
        else:
            task_inputs = {t: x for t in self.task_names}
        relation: dict[str, Tensor] = {}
        for t in self.order:
            parts = [self.task_mlps[t](task_inputs[t]), *(relation[p] for p in self.dependencies[t])]
            relation[t] = self.relation_mlps[t](torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
        return relation

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        relation = self.relations(features)
        return {t: squeeze_logit(self.outputs[t](relation[t])) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.bottom, *([self.experts] if self.experts is not None else []))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        if self.experts is not None:
            return self.experts.last_layer_parameters()
        return parameters_of(self.bottom.last_linear())
