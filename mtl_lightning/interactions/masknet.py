"""MaskNet as an interaction.

Wang, Z., She, Q., Zhang, J. "MaskNet: Introducing Feature-Wise
Multiplication to CTR Ranking Models by Instance-Guided Mask." DLP-KDD 2021.

MaskBlocks over the flat embedded input ``v_emb``: each block multiplies its
input by an instance-guided mask (a two-layer MLP of ``v_emb``), then a
bias-free hidden layer, LayerNorm and ReLU. ``mode="serial"`` chains
``num_blocks`` blocks (the first masks ``LayerNorm(v_emb)``, each next one the
previous output); ``mode="parallel"`` runs ``num_blocks`` blocks on ``v_emb``
side by side and concatenates them (``parallel_hidden`` adds the paper's MLP
on top). The computation is :class:`~mtl_lightning.layers.interactions.MaskNet`.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..layers.interactions import MaskNet
from .base import Interaction, register_interaction


@register_interaction("masknet")
class MaskNetInteraction(Interaction):
    """``(B, D) -> (B, block_dim)`` (serial) or ``(B, num_blocks * block_dim)`` (parallel, without an MLP)."""

    view = "flat"

    def __init__(self, input_dim: int, num_fields: int = 1, field_dim: int | None = None, mode: str = "serial",
                 num_blocks: int = 3, block_dim: int = 64, reduction_ratio: float = 2.0,
                 parallel_hidden: Sequence[int] = (), parallel_activation: str = "relu",
                 parallel_dropout: float = 0.0) -> None:
        super().__init__(input_dim, num_fields, field_dim)
        self.masknet = MaskNet(self.input_dim, mode=mode, num_blocks=num_blocks, block_dim=block_dim,
                               reduction_ratio=reduction_ratio, parallel_hidden=tuple(parallel_hidden),
                               parallel_activation=parallel_activation, parallel_dropout=parallel_dropout)
        self.output_dim = int(self.masknet.output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.masknet(x)  # (B, output_dim)
