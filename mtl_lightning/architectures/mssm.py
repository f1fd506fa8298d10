"""MSSM: Multiple-level Sparse Sharing Model.

Ding, K., Dong, X., He, Y., Cheng, L., Fu, C., Huan, Z., Li, H., Yan, T.,
Zhang, L., Zhang, X., Mo, L. "MSSM: A Multiple-level Sparse Sharing Model for
Efficient Multi-Task Learning." SIGIR 2021.

Sparse sharing at two levels, both learnt with sparse binary coding variables:

* Field-level Sparse Connection Module (FSCM): each task ``t``, and the shared
  part, reads its own selection of the input fields: field ``f``'s embedding
  ``e_f`` enters unit ``u`` scaled by a coding variable,
  ``x_u = [z_{u,1} e_1, ..., z_{u,F} e_F]``, so a task can drop fields that
  help other tasks only (a dense feature is a field too).
* Cell-level Sparse Sharing Module (CSSM): levels of cells (small MLPs); at each
  level every task has ``num_task_cells`` cells reading the task's input and
  ``num_shared_cells`` shared cells read the shared input. The input of task
  ``t`` at the next level (its tower's input after the last) is the routed sum
  of ALL cells of the level, ``v_t = sum_c z_{t,c} o_c``, and so is the shared
  input of the next level, so the coding variables decide which cells a task
  routes through (the last level routes to the tasks only).

Every coding variable is a hard-concrete gate (Louizos et al., ICLR 2018, as
in SNR, which MSSM builds on): sampled in training, deterministic at
evaluation, exact zeros possible, with the expected L0 norm of all of them
times ``l0_weight`` returned by ``auxiliary_loss``.

Choices where the short paper is open: hard-concrete coding variables with
``beta = 2/3, gamma = -0.1, zeta = 1.1`` for both modules (one relaxation and
one penalty for both levels of sparsity), starting near ``log_alpha_init``
(open, slightly above 1/2); one coding variable per (unit, field) for the FSCM,
applied to the whole field vector, with a unit for every task and one for the
shared cells; cells are MLPs (``cell_hidden``) with the activation after
every layer; the routed sum has no transformation matrices (SNR-Aver style).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, FeatureEmbedding, HardConcreteGate, feature_slices
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class CellLevel(nn.Module):
    """Task and shared cells of one CSSM level with the coding variables routing them to the next inputs."""

    def __init__(self, task_names: Sequence[str], input_dim: int, num_task_cells: int, num_shared_cells: int,
                 cell_hidden: Sequence[int], activation: str, dropout: float, to_shared: bool,
                 log_alpha_init: float) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.task_cells = nn.ModuleDict(
            {t: ExpertBank(num_task_cells, input_dim, cell_hidden, activation, dropout) for t in task_names})
        self.shared_cells = ExpertBank(num_shared_cells, input_dim, cell_hidden, activation, dropout)
        total = num_task_cells * len(self.task_names) + num_shared_cells
        destinations = len(self.task_names) + (1 if to_shared else 0)  # rows: tasks in order, then the shared part
        self.routing = HardConcreteGate((destinations, total), log_alpha_init=log_alpha_init)
        self.to_shared = to_shared
        self.output_dim = self.shared_cells.output_dim

    def forward(self, task_inputs: Mapping[str, Tensor], shared_input: Tensor
                ) -> tuple[dict[str, Tensor], Tensor | None]:
        cells = torch.cat([self.task_cells[t](task_inputs[t]) for t in self.task_names]
                          + [self.shared_cells(shared_input)], dim=1)  # (B, C, H): tasks' cells, then shared
        z = self.routing(cells.shape[0])  # (B, T [+1], C)
        routed = torch.einsum("bdc,bch->bdh", z, cells)  # (B, T [+1], H)
        outputs = {t: routed[:, k] for k, t in enumerate(self.task_names)}
        return outputs, (routed[:, -1] if self.to_shared else None)


@register("mssm")
class MSSM(MultiTaskArchitecture):
    """embedding -> field-level coding per task and shared (FSCM) -> routed cell levels (CSSM) -> task towers."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_levels: int = 2,
        num_task_cells: int = 1,
        num_shared_cells: int = 2,
        cell_hidden: Sequence[int] = (128,),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        l0_weight: float = 1e-3,
        log_alpha_init: float = 1.0,
    ) -> None:
        super().__init__(features, tasks)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if l0_weight < 0:
            raise ValueError(f"l0_weight must be >= 0, got {l0_weight}")
        self.l0_weight = float(l0_weight)
        self.embedding = FeatureEmbedding(self.features)
        slices = feature_slices(self.embedding)
        field_of_column = torch.cat([torch.full((s.stop - s.start,), i) for i, s in enumerate(slices.values())])
        self.register_buffer("field_of_column", field_of_column, persistent=False)  # (D,) field index per column
        self.field_gates = HardConcreteGate((len(self.tasks) + 1, len(self.features)), log_alpha_init=log_alpha_init)
        self.levels = nn.ModuleList()
        width = self.embedding.output_dim
        for level in range(num_levels):
            self.levels.append(CellLevel(self.task_names, width, num_task_cells, num_shared_cells, cell_hidden,
                                         activation, dropout, to_shared=level < num_levels - 1,
                                         log_alpha_init=log_alpha_init))
            width = self.levels[-1].output_dim
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def field_inputs(self, flat: Tensor) -> Tensor:
        """FSCM: ``(B, D)`` -> ``(B, T + 1, D)``, unit ``u``'s copy with field ``f``'s columns scaled by ``z_{u,f}``."""
        z = self.field_gates(flat.shape[0])  # (B, T + 1, F)
        return flat.unsqueeze(1) * z.index_select(-1, self.field_of_column)  # (B, T + 1, D)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        units = self.field_inputs(self.embedding(features))
        task_inputs = {t: units[:, k] for k, t in enumerate(self.task_names)}
        shared_input: Tensor | None = units[:, -1]
        for level in self.levels:
            assert shared_input is not None
            task_inputs, shared_input = level(task_inputs, shared_input)
        return {t: squeeze_logit(self.towers[t](task_inputs[t])) for t in self.task_names}

    def coding_variables(self) -> list[HardConcreteGate]:
        """Every hard-concrete gate: the FSCM's field gates, then each level's routing."""
        return [self.field_gates, *(level.routing for level in self.levels)]

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """``l0_weight`` times the expected number of open coding variables (fields and cell routes)."""
        return self.l0_weight * sum(gate.l0_penalty() for gate in self.coding_variables())

    def shared_parameters(self) -> list[nn.Parameter]:
        """Embedding, field gates and every level before the last; at the last level the cells (all routed to every task)."""
        last = self.levels[-1]
        private = {id(p) for p in parameters_of(last.routing, self.towers)}
        return [p for p in self.parameters() if id(p) not in private]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        last = self.levels[-1]
        return [p for bank in [*last.task_cells.values(), last.shared_cells] for p in bank.last_layer_parameters()]
