"""DCN-v2 cross network as an interaction.

Wang, R., Shivanna, R., Cheng, D., Jain, S., Lin, D., Hong, L., Chi, E.
"DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
Learning to Rank Systems." WWW 2021.

Stacked cross layers ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` over the flat
embedded input (full rank, low rank ``W = U V^T``, or a mixture of low-rank
experts), followed by the architecture's own bottom: the paper's stacked
structure. ``parallel_hidden`` adds a deep MLP beside the cross network
(the parallel structure), its output concatenated. The computation is
:class:`~mtl_lightning.layers.interactions.CrossNetworkV2`.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..layers.interactions import CrossNetworkV2
from .base import Interaction, register_interaction


@register_interaction("dcn_v2")
class DCNv2(Interaction):
    """``(B, D) -> (B, D)`` (plus the parallel MLP's width): ``num_layers`` cross layers."""

    view = "flat"

    def __init__(self, input_dim: int, num_fields: int = 1, field_dim: int | None = None, num_layers: int = 3,
                 low_rank: int | None = None, num_experts: int = 1, expert_activation: str = "relu",
                 parallel_hidden: Sequence[int] = (), parallel_activation: str = "relu",
                 parallel_dropout: float = 0.0) -> None:
        super().__init__(input_dim, num_fields, field_dim)
        self.cross = CrossNetworkV2(self.input_dim, num_layers=num_layers, low_rank=low_rank,
                                    num_experts=num_experts, expert_activation=expert_activation,
                                    parallel_hidden=tuple(parallel_hidden), parallel_activation=parallel_activation,
                                    parallel_dropout=parallel_dropout)
        self.output_dim = int(self.cross.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.cross(x)  # (B, output_dim)
