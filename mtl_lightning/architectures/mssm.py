"""MSSM: Multiple-level Sparse Sharing Model.

Ding, K., Dong, X., He, Y., Cheng, L., Fu, C., Huan, Z., Li, H., Yan, T.,
Zhang, L., Zhang, X., Mo, L. "MSSM: A Multiple-level Sparse Sharing Model for
Efficient Multi-Task Learning." SIGIR 2021.

Sparse sharing at two levels:

* Field-level Sparse Connection Module (FSCM): every unit ``j`` (each task,
  and the shared part) reads its own selection of the input fields. Field
  ``i``'s embedding ``e_i`` enters unit ``j`` scaled by a sparse mask computed
  from the field itself, ``w_ij = relu(tanh(g_ij . e_i))`` with a learnable
  vector ``g_ij`` (the relu gives exact zeros, so a task can drop a field for
  some or all examples): ``E_j = [w_1j e_1, ..., w_nj e_n]``. A dense feature is
  a field too (``e_i`` its values).
* Cell-level Sparse Sharing Module (CSSM): levels of cells (sub-networks); at
  each level every task has ``num_task_cells`` cells reading the task's input
  (``E_j`` at the first level, whose first linear layer is the paper's
  ``u_j = E_j W_j^E``) and ``num_shared_cells`` shared cells read the shared
  input. The next input of unit ``i`` (a task, or the shared part below the last
  level; after the last level, the task's tower input) is the routed,
  transformed sum of ALL cells ``u_j`` of the level, as in SNR-Trans:
  ``v_i = sum_j (z_ij W_ij) u_j``, with a transformation matrix ``W_ij`` and a
  binary coding variable ``z_ij`` per connection.

The coding variables are hard-concrete gates (Louizos et al., ICLR 2018, as in
SNR, which MSSM builds on): sampled in training, deterministic at evaluation,
exact zeros possible; their expected L0 norm times ``l0_weight`` is returned
by ``auxiliary_loss`` (the paper's ``lambda_0 L_reg``; its L2 term is the
optimizer's ``weight_decay``).

Choices where the short paper is open: ``g`` starts standard normal (so a
field's mask starts away from 0 for a good share of the examples); a coding
variable is one scalar per connection (cell to destination); hard-concrete
``beta = 2/3, gamma = -0.1, zeta = 1.1`` and ``log alpha`` starting near
``log_alpha_init``; ``W_ij`` start uniform in ``(-1/sqrt(H), 1/sqrt(H))``
(``transform_dim`` wide); cells are MLPs (``cell_hidden``) with the activation
after every layer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, FeatureEmbedding, HardConcreteGate, feature_slices
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class FieldSparseConnection(nn.Module):
    """FSCM: ``(B, D)`` flat embedding -> ``(B, U, D)``, unit ``j``'s copy with field ``i`` scaled by ``w_ij``."""

    def __init__(self, embedding: FeatureEmbedding, num_units: int) -> None:
        super().__init__()
        spans = dict.fromkeys((s.start, s.stop) for s in feature_slices(embedding).values())
        slices = [slice(start, stop) for start, stop in spans]  # a sequence group's members share one slice
        membership = torch.zeros(embedding.output_dim, len(slices))  # (D, F): column c belongs to field i
        for i, columns in enumerate(slices):
            membership[columns, i] = 1.0
        self.register_buffer("membership", membership, persistent=False)
        self.g = nn.Parameter(torch.randn(num_units, embedding.output_dim))  # g_ij, laid out over field i's columns

    def masks(self, flat: Tensor) -> Tensor:
        """``w_ij = relu(tanh(g_ij . e_i))``: ``(B, U, F)``."""
        return torch.relu(torch.tanh((flat.unsqueeze(1) * self.g) @ self.membership))

    def forward(self, flat: Tensor) -> Tensor:
        return flat.unsqueeze(1) * (self.masks(flat) @ self.membership.T)  # (B, U, D)


class CellLevel(nn.Module):
    """One CSSM level: task and shared cells, and ``v_i = sum_j z_ij W_ij u_j`` for every destination ``i``."""

    def __init__(self, task_names: Sequence[str], input_dim: int, num_task_cells: int, num_shared_cells: int,
                 cell_hidden: Sequence[int], transform_dim: int, activation: str, dropout: float, to_shared: bool,
                 log_alpha_init: float) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.task_cells = nn.ModuleDict(
            {t: ExpertBank(num_task_cells, input_dim, cell_hidden, activation, dropout) for t in task_names})
        self.shared_cells = ExpertBank(num_shared_cells, input_dim, cell_hidden, activation, dropout)
        cells = num_task_cells * len(self.task_names) + num_shared_cells
        destinations = len(self.task_names) + (1 if to_shared else 0)  # tasks in order, then the shared part
        self.routing = HardConcreteGate((destinations, cells), log_alpha_init=log_alpha_init)
        width = self.shared_cells.output_dim
        bound = 1.0 / math.sqrt(width)
        self.transforms = nn.Parameter(torch.empty(destinations, cells, width, transform_dim).uniform_(-bound, bound))
        self.to_shared = to_shared
        self.output_dim = transform_dim

    def cells(self, task_inputs: Mapping[str, Tensor], shared_input: Tensor) -> Tensor:
        """Every cell's output ``u_j``: ``(B, C, H)``, the tasks' cells in task order, then the shared ones."""
        return torch.cat([self.task_cells[t](task_inputs[t]) for t in self.task_names]
                         + [self.shared_cells(shared_input)], dim=1)

    def forward(self, task_inputs: Mapping[str, Tensor], shared_input: Tensor
                ) -> tuple[dict[str, Tensor], Tensor | None]:
        u = self.cells(task_inputs, shared_input)  # (B, C, H)
        z = self.routing(u.shape[0])  # (B, I, C)
        transformed = torch.einsum("bch,ichk->bick", u, self.transforms)  # (B, I, C, K)
        v = torch.einsum("bic,bick->bik", z, transformed)  # (B, I, K)
        return {t: v[:, k] for k, t in enumerate(self.task_names)}, (v[:, -1] if self.to_shared else None)


@register("mssm")
class MSSM(MultiTaskArchitecture):
    """embedding -> per-unit field masks (FSCM) -> routed, transformed cell levels (CSSM) -> task towers."""

    interaction_refused = ("its field-level sparse connections (FSCM) select the input layer's columns field by "
                           "field, and a feature interaction's output has no fields")

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_levels: int = 2,
        num_task_cells: int = 1,
        num_shared_cells: int = 1,
        cell_hidden: Sequence[int] = (128,),
        transform_dim: int = 64,
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        l0_weight: float = 1e-3,
        log_alpha_init: float = 1.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if transform_dim < 1:
            raise ValueError(f"transform_dim must be >= 1, got {transform_dim}")
        if l0_weight < 0:
            raise ValueError(f"l0_weight must be >= 0, got {l0_weight}")
        self.l0_weight = float(l0_weight)
        self.embedding = self.input_layer()
        self.fields = FieldSparseConnection(self.embedding, num_units=len(self.tasks) + 1)  # tasks, then shared
        self.levels = nn.ModuleList()
        width = self.embedding.output_dim
        for level in range(num_levels):
            self.levels.append(CellLevel(self.task_names, width, num_task_cells, num_shared_cells, cell_hidden,
                                         transform_dim, activation, dropout, to_shared=level < num_levels - 1,
                                         log_alpha_init=log_alpha_init))
            width = self.levels[-1].output_dim
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        units = self.fields(self.embedding(features))  # (B, T + 1, D)
        task_inputs = {t: units[:, k] for k, t in enumerate(self.task_names)}
        shared_input: Tensor | None = units[:, -1]
        for level in self.levels:
            assert shared_input is not None
            task_inputs, shared_input = level(task_inputs, shared_input)
        return {t: squeeze_logit(self.towers[t](task_inputs[t])) for t in self.task_names}

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """``l0_weight`` times the expected number of open coding variables over every level."""
        return self.l0_weight * sum(level.routing.l0_penalty() for level in self.levels)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Embedding, field masks and every level but the last one's routing and transformations (and the towers).

        Every cell of the last level may be routed to every task, so the cells are shared.
        """
        last = self.levels[-1]
        private = {id(p) for p in parameters_of(last.routing, [last.transforms], self.towers)}
        return [p for p in self.parameters() if id(p) not in private]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        last = self.levels[-1]
        return [p for bank in [*last.task_cells.values(), last.shared_cells] for p in bank.last_layer_parameters()]
