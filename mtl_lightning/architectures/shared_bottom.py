"""Shared-Bottom multi-task network.

Caruana, R. "Multitask Learning." Machine Learning 28, 41-75 (1997).

All tasks share the embeddings and one bottom MLP (hard parameter sharing);
each task has its own tower MLP on top of the shared representation and ends
in one logit.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


@register("shared_bottom")
class SharedBottom(MultiTaskArchitecture):
    """embedding -> shared bottom MLP -> one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        bottom_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if len(bottom_hidden) == 0:
            raise ValueError("bottom_hidden must list at least one layer size")
        self.embedding = self.input_layer()
        self.bottom = MLP(self.embedding.output_dim, bottom_hidden, activation=activation, dropout=dropout,
                          batch_norm=batch_norm)
        self.towers = self._towers(self.bottom.output_dim, tower_hidden, activation, dropout)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        shared = self.bottom(self.embedding(features))  # (B, H)
        return {name: squeeze_logit(tower(shared)) for name, tower in self.towers.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.bottom)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.bottom.last_linear())
