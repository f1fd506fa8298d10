"""AdaTT: Adaptive Task-to-Task Fusion Network.

Li, D., Zhang, Z., Yuan, S., Gao, M., Zhang, W., Yang, C., Liu, X., Yang, J.
"AdaTT: Adaptive Task-to-Task Fusion Network for Multitask Learning in
Recommendations." KDD 2023.

Several fusion levels. At every level each task has ``num_task_experts``
experts reading that task's input of the level (and, optionally, a group of
``num_shared_experts`` shared experts reads the shared input). Task ``t``'s
fusion unit combines them in two parts:

* adaptive fusion: a softmax gate on task ``t``'s input weighs EVERY expert of
  the level, its own, the other tasks' and the shared ones:
  ``AllExp_t = sum_j g_t(x_t)_j E_j``;
* native residual: a learned linear combination of task ``t``'s own experts,
  ``NativeExp_t = sum_i v_{t,i} E_{t,i}`` (with one expert, the expert itself, ``v = 1``);

``f_t = AllExp_t + NativeExp_t`` is task ``t``'s input of the next level, and
its tower's input after the last. With shared experts, a shared fusion unit
(gate on the shared input over every expert, plus the shared experts' native
residual) gives the shared input of the next level; the last level has none (it
would feed nothing). At level 1 every input is the shared embedding.
``num_shared_experts=0`` is the paper's AdaTT-sp (task-specific experts only).

Choices where the paper is open, taken from the authors' reference code
(facebookresearch/AdaTT): gates are one linear layer with softmax; ``v`` starts
uniform in ``(-1/sqrt(m), 1/sqrt(m))`` for a unit of ``m > 1`` experts (here
learnt per unit with more than one expert and fixed to 1 for a single-expert
unit, where the reference code learns all units' weights as soon as one unit
has several experts); every level's experts have the same ``expert_hidden``
shape, with the activation after every layer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class NativeResidual(nn.Module):
    """``sum_i v_i E_i`` over a unit's own experts ``(B, m, H) -> (B, H)``; ``v`` learnt when ``m > 1``, else 1."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.weights = None
        if num_experts > 1:
            bound = math.sqrt(1.0 / num_experts)
            self.weights = nn.Parameter(torch.empty(num_experts).uniform_(-bound, bound))

    def forward(self, experts: Tensor) -> Tensor:
        if self.weights is None:
            return experts[:, 0]
        return torch.einsum("e,beh->bh", self.weights, experts)


class FusionLevel(nn.Module):
    """One AdaTT level: per-task (and shared) experts, a fusion unit per task, optionally a shared fusion unit."""

    def __init__(
        self,
        task_names: Sequence[str],
        input_dim: int,
        num_task_experts: int,
        num_shared_experts: int,
        expert_hidden: Sequence[int],
        activation: str,
        dropout: float,
        with_shared_unit: bool,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.task_experts = nn.ModuleDict(
            {t: ExpertBank(num_task_experts, input_dim, expert_hidden, activation, dropout) for t in task_names}
        )
        self.shared_experts = (ExpertBank(num_shared_experts, input_dim, expert_hidden, activation, dropout)
                               if num_shared_experts else None)
        total = num_task_experts * len(self.task_names) + num_shared_experts
        self.gates = nn.ModuleDict({t: Gate(input_dim, total) for t in task_names})
        self.residuals = nn.ModuleDict({t: NativeResidual(num_task_experts) for t in task_names})
        self.shared_gate = Gate(input_dim, total) if with_shared_unit else None
        self.shared_residual = NativeResidual(num_shared_experts) if with_shared_unit else None
        self.output_dim = self.task_experts[self.task_names[0]].output_dim

    def forward(self, task_inputs: Mapping[str, Tensor], shared_input: Tensor | None
                ) -> tuple[dict[str, Tensor], Tensor | None]:
        own = {t: self.task_experts[t](task_inputs[t]) for t in self.task_names}  # (B, m, H) each
        groups = [own[t] for t in self.task_names]
        shared = None
        if self.shared_experts is not None:
            assert shared_input is not None
            shared = self.shared_experts(shared_input)  # (B, s, H)
            groups.append(shared)
        everything = torch.cat(groups, dim=1)  # (B, T*m + s, H): tasks in order, then the shared experts
        outputs = {
            t: mix(self.gates[t](task_inputs[t]), everything) + self.residuals[t](own[t]) for t in self.task_names
        }
        shared_output = None
        if self.shared_gate is not None:
            assert shared_input is not None and shared is not None and self.shared_residual is not None
            shared_output = mix(self.shared_gate(shared_input), everything) + self.shared_residual(shared)
        return outputs, shared_output


@register("adatt")
class AdaTT(MultiTaskArchitecture):
    """embedding -> ``num_levels`` task-to-task fusion levels -> one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_levels: int = 2,
        num_task_experts: int = 2,
        num_shared_experts: int = 0,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if num_task_experts < 1:
            raise ValueError(f"num_task_experts must be >= 1, got {num_task_experts}")
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0 (0 is AdaTT-sp), got {num_shared_experts}")
        self.embedding = self.input_layer()
        self.levels = nn.ModuleList()
        width = self.embedding.output_dim
        for level in range(num_levels):
            self.levels.append(FusionLevel(
                self.task_names, width, num_task_experts, num_shared_experts, expert_hidden, activation, dropout,
                with_shared_unit=num_shared_experts > 0 and level < num_levels - 1))
            width = self.levels[-1].output_dim
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def fused(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's last-level fusion output ``f_t`` ``(B, H)``, its tower's input."""
        x = self.embedding(features)  # (B, D)
        task_inputs: dict[str, Tensor] = {t: x for t in self.task_names}
        shared_input: Tensor | None = x
        for level in self.levels:
            task_inputs, shared_input = level(task_inputs, shared_input)
        return task_inputs

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fused = self.fused(features)
        return {t: squeeze_logit(self.towers[t](fused[t])) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every expert (each task's gate reads all of them) and everything below the last level.

        Private to one task: the last level's gate and native weights of that task, and its tower.
        """
        last = self.levels[-1]
        private = {id(p) for p in parameters_of(last.gates, last.residuals, self.towers)}
        return [p for p in self.parameters() if id(p) not in private]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        last = self.levels[-1]
        banks = [*last.task_experts.values(), *([last.shared_experts] if last.shared_experts is not None else [])]
        return [p for bank in banks for p in bank.last_layer_parameters()]
