"""Progressive Layered Extraction (PLE).

Tang, H., Liu, J., Zhao, M., Gong, X. "Progressive Layered Extraction (PLE): A
Novel Multi-Task Learning (MTL) Model for Personalized Recommendations."
RecSys 2020.

Several extraction levels, each with task-specific experts (one group per task)
and shared experts. At every level, task k's gate mixes its own experts and
the shared experts, reading task k's input of that level; a shared gate mixes
all experts of the level (every task's and the shared ones) and feeds the
shared experts of the next level. The last level has no shared gate (it would
feed nothing). At level 1 every input is the shared embedding. Each task's
tower reads its last-level gate output.

``num_levels=1`` is CGC (Customized Gate Control), the single-level model of
the same paper: one level of task and shared experts whose task gates feed
the towers directly (no shared gate).

Choices where the paper is open: every expert has the same ``expert_hidden``
shape at every level (the input of level l > 1 is a gate output of width
``expert_hidden[-1]``); gates are single linear layers with softmax.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, Gate, mix
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class ExtractionLevel(nn.Module):
    """One customized-gate-control level: per-task experts, shared experts, task gates, optional shared gate."""

    def __init__(
        self,
        task_names: Sequence[str],
        input_dim: int,
        num_specific_experts: int,
        num_shared_experts: int,
        expert_hidden: Sequence[int],
        activation: str,
        dropout: float,
        with_shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.specific = nn.ModuleDict(
            {t: ExpertBank(num_specific_experts, input_dim, expert_hidden, activation, dropout) for t in task_names}
        )
        self.shared = ExpertBank(num_shared_experts, input_dim, expert_hidden, activation, dropout)
        self.task_gates = nn.ModuleDict(
            {t: Gate(input_dim, num_specific_experts + num_shared_experts) for t in task_names}
        )
        total = num_specific_experts * len(task_names) + num_shared_experts
        self.shared_gate = Gate(input_dim, total) if with_shared_gate else None
        self.output_dim = self.shared.output_dim

    def forward(self, task_inputs: dict[str, Tensor], shared_input: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        shared_experts = self.shared(shared_input)  # (B, Es, H)
        specific = {t: self.specific[t](task_inputs[t]) for t in self.task_names}  # (B, Ek, H) each
        task_outputs = {
            t: mix(self.task_gates[t](task_inputs[t]), torch.cat([specific[t], shared_experts], dim=1))
            for t in self.task_names
        }
        shared_output = None
        if self.shared_gate is not None:
            everything = torch.cat([*(specific[t] for t in self.task_names), shared_experts], dim=1)
            shared_output = mix(self.shared_gate(shared_input), everything)  # (B, H)
        return task_outputs, shared_output


@register("ple")
class PLE(MultiTaskArchitecture):
    """embedding -> ``num_levels`` extraction levels -> one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_levels: int = 2,
        num_specific_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.embedding = self.input_layer()
        self.levels = nn.ModuleList()
        width = self.embedding.output_dim
        for level in range(num_levels):
            self.levels.append(
                ExtractionLevel(self.task_names, width, num_specific_experts, num_shared_experts, expert_hidden,
                                activation, dropout, with_shared_gate=level < num_levels - 1)
            )
            width = self.levels[-1].output_dim
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = self.embedding(features)  # (B, D)
        task_inputs = {t: x for t in self.task_names}
        shared_input: Tensor | None = x
        for level in self.levels:
            assert shared_input is not None
            task_inputs, shared_input = level(task_inputs, shared_input)
        return {t: squeeze_logit(self.towers[t](task_inputs[t])) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Everything below the last level's task-specific parts: all of it reaches every task.

        Earlier levels' task-specific experts feed the shared gate and so every
        task; the last level's task experts and task gates, and the towers, do not.
        """
        last = self.levels[-1]
        private = {id(p) for p in parameters_of(last.specific, last.task_gates, self.towers)}
        return [p for p in self.parameters() if id(p) not in private]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.levels[-1].shared.last_layer_parameters()
