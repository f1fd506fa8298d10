"""STEM-Net: Shared and Task-specific EMbeddings.

Su, L., Pan, J., Wang, X., Xiao, X., Quan, S., Chen, X., Jiang, J. "STEM:
Unleashing the Power of Embeddings for Multi-task Recommendation." AAAI 2024.

Every task has its own copy of every embedding table, beside one shared copy:
``T + 1`` embeddings ``e_1 .. e_T, e_s`` of the same features (the paradigm
the paper calls STEM). Each level has task-specific experts (task ``t``'s read
``e_t``, or its input of the level) and shared experts (reading ``e_s``). Task
``t``'s gate is the All Forward Task-specific Backward (AFTB) gate: in the
forward pass it weighs EVERY expert of the level, its own, the other tasks' and
the shared ones, but the other tasks' experts enter through a stop-gradient,

    ``o_t = sum_j g_t(x_t + x_s)_j E_j``,  ``E_j = sg(E_j)`` for the experts of tasks ``!= t``,

so task ``t``'s loss trains its own experts and embedding and the shared ones,
never another task's (which keeps each task-specific embedding specific). The
gate reads the sum of the task's and the shared input. A shared gate on ``x_s``
mixes every expert (no stop-gradient) into the shared input of the next level;
the last level has none (it would feed nothing). Each task's tower reads its
last-level ``o_t``.

Choices, following the authors' code (fuxictr-based STEM release): the gate is
an MLP (``gate_hidden``, empty: one linear layer) with softmax; experts are
MLPs with the activation after every layer; dense features pass into every
embedding unchanged (only tables are duplicated); ``num_levels=1`` is the
paper's setting.

Distributed: under ``TorchRecStrategy`` every one of the ``T + 1``
``FeatureEmbedding`` layers is sharded like any other (a task's tables are
tables like the shared ones; the stop-gradient only decides which tables a loss
reaches), so STEM trains there unchanged, with ``T + 1`` times the table memory.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP, ExpertBank, mix
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class SoftmaxGate(nn.Module):
    """``softmax(MLP(x))`` over ``num_experts``: ``(B, D) -> (B, E)``."""

    def __init__(self, input_dim: int, hidden: Sequence[int], num_experts: int, activation: str) -> None:
        super().__init__()
        self.mlp = MLP(input_dim, hidden, output_dim=num_experts, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.mlp(x), dim=-1)


class STEMLevel(nn.Module):
    """Task-specific and shared experts; AFTB task gates; a shared gate unless this is the last level."""

    def __init__(
        self,
        task_names: Sequence[str],
        input_dim: int,
        num_specific_experts: int,
        num_shared_experts: int,
        expert_hidden: Sequence[int],
        gate_hidden: Sequence[int],
        activation: str,
        dropout: float,
        with_shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.specific = nn.ModuleDict(
            {t: ExpertBank(num_specific_experts, input_dim, expert_hidden, activation, dropout) for t in task_names})
        self.shared = ExpertBank(num_shared_experts, input_dim, expert_hidden, activation, dropout)
        total = num_specific_experts * len(self.task_names) + num_shared_experts
        self.task_gates = nn.ModuleDict({t: SoftmaxGate(input_dim, gate_hidden, total, activation) for t in task_names})
        self.shared_gate = SoftmaxGate(input_dim, gate_hidden, total, activation) if with_shared_gate else None
        self.output_dim = self.shared.output_dim

    def forward(self, task_inputs: Mapping[str, Tensor], shared_input: Tensor
                ) -> tuple[dict[str, Tensor], Tensor | None]:
        specific = {t: self.specific[t](task_inputs[t]) for t in self.task_names}  # (B, m, H) each
        shared = self.shared(shared_input)  # (B, s, H)
        outputs = {}
        for t in self.task_names:  # all forward, task-specific backward: other tasks' experts are stop-gradient
            experts = torch.cat([specific[j] if j == t else specific[j].detach() for j in self.task_names]
                                + [shared], dim=1)  # (B, T*m + s, H)
            outputs[t] = mix(self.task_gates[t](task_inputs[t] + shared_input), experts)
        shared_output = None
        if self.shared_gate is not None:
            everything = torch.cat([specific[j] for j in self.task_names] + [shared], dim=1)
            shared_output = mix(self.shared_gate(shared_input), everything)  # (B, H)
        return outputs, shared_output


@register("stem")
class STEM(MultiTaskArchitecture):
    """shared + per-task embeddings -> ``num_levels`` AFTB-gated expert levels -> one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_levels: int = 1,
        num_specific_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: Sequence[int] = (256, 128),
        gate_hidden: Sequence[int] = (),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.embedding = self.input_layer()  # the shared embedding e_s
        self.task_embeddings = nn.ModuleDict({t: self.input_layer() for t in self.task_names})
        self.levels = nn.ModuleList()
        width = self.embedding.output_dim
        for level in range(num_levels):
            self.levels.append(STEMLevel(self.task_names, width, num_specific_experts, num_shared_experts,
                                         expert_hidden, gate_hidden, activation, dropout,
                                         with_shared_gate=level < num_levels - 1))
            width = self.levels[-1].output_dim
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        task_inputs = {t: self.task_embeddings[t](features) for t in self.task_names}  # e_t, (B, D) each
        shared_input: Tensor | None = self.embedding(features)  # e_s, (B, D)
        for level in self.levels:
            assert shared_input is not None
            task_inputs, shared_input = level(task_inputs, shared_input)
        return {t: squeeze_logit(self.towers[t](task_inputs[t])) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared embedding, every level's shared experts, and the levels before the last (they feed the shared gate).

        The last level's task experts and gates and the towers reach one task
        only, and so do the task embeddings with one level (with more, they feed
        the first level's shared gate).
        """
        last = self.levels[-1]
        own = [last.specific, last.task_gates, self.towers, *([self.task_embeddings] if len(self.levels) == 1 else [])]
        private = {id(p) for p in parameters_of(*own)}
        return [p for p in self.parameters() if id(p) not in private]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.levels[-1].shared.last_layer_parameters()
