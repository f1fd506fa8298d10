"""SENET field re-weighting (FiBiNET) as an interaction.

Huang, T., Zhang, Z., Zhang, J. "FiBiNET: Combining Feature Importance and
Bilinear feature Interaction for Click-Through Rate Prediction." RecSys 2019.

Reads one ``d``-vector per field (the input layer's per-field view: every
sparse and sequence feature of one ``embedding_dim``, dense features and
encoded sequence groups mapped to it by bias-free linear layers), squeezes each
field to its mean, excites the ``F`` means through two bias-free layers with
reduction ratio ``r`` and re-weights every field by its weight; the re-weighted
fields, flattened, are what the bottom reads. The computation is
:class:`~mtl_lightning.layers.interactions.SENet`.
"""

from __future__ import annotations

from torch import Tensor

from ..layers.interactions import SENet
from .base import Interaction, register_interaction


@register_interaction("senet")
class SENetInteraction(Interaction):
    """``(B, F, d) -> (B, F * d)``: the fields re-weighted by SENET."""

    view = "field"

    def __init__(self, input_dim: int, num_fields: int = 1, field_dim: int | None = None, reduction_ratio: int = 3,
                 excitation_activation: str = "relu") -> None:
        super().__init__(input_dim, num_fields, field_dim)
        assert self.field_dim is not None  # checked by Interaction for view="field"
        self.senet = SENet(self.num_fields, self.field_dim, reduction_ratio=reduction_ratio,
                           excitation_activation=excitation_activation, flatten=True)
        self.output_dim = int(self.senet.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.senet(x)  # (B, F * d)
