"""Pooling a padded id sequence into one vector per row; id 0 is padding and never pooled.

:data:`POOLINGS` maps each ``SequenceFeature.pooling`` name to a function
``(embeddings (B, L, d), mask (B, L)) -> (B, d)`` over the non-padding
positions; a row of padding pools to zeros. :func:`pool_sequence` is what
``FeatureEmbedding`` calls: ``torch.nn.functional.embedding_bag`` where it
computes the same (one fused kernel), the table's masked function otherwise
(``max`` with sparse gradients, which ``embedding_bag`` lacks, and ONNX
export, which has no ``embedding_bag`` with padding). A pooling that needs more
than the sequence (a query, parameters) reads :func:`sequence_embeddings`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sequence_embeddings(ids: Tensor, weight: Tensor, offset: int = 0, sparse: bool = False) -> tuple[Tensor, Tensor]:
    """``(B, L, d)`` rows ``ids + offset`` of ``weight`` and the ``(B, L)`` mask of non-padding positions (id != 0).

    ``offset`` places the table inside a larger weight (a block of a fused
    weight); its first row, ``offset``, is the padding row and gets no gradient.
    """
    rows = ids if offset == 0 else ids + offset
    return F.embedding(rows, weight, padding_idx=offset, sparse=sparse), ids != 0


def masked_sum(embeddings: Tensor, mask: Tensor) -> Tensor:
    """Sum over the positions where ``mask``: ``(B, L, d), (B, L) -> (B, d)``."""
    return (embeddings * mask.unsqueeze(-1)).sum(dim=1)


def masked_mean(embeddings: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions where ``mask`` (zeros for a row without any)."""
    return masked_sum(embeddings, mask) / mask.unsqueeze(-1).sum(dim=1).clamp(min=1)


def masked_max(embeddings: Tensor, mask: Tensor) -> Tensor:
    """Elementwise maximum over the positions where ``mask`` (zeros for a row without any)."""
    mask = mask.unsqueeze(-1)  # (B, L, 1)
    pooled = embeddings.masked_fill(~mask, float("-inf")).amax(dim=1)
    return torch.where(mask.any(dim=1), pooled, torch.zeros_like(pooled))


#: ``pooling`` name -> ``(embeddings (B, L, d), mask (B, L)) -> (B, d)``.
POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": masked_mean, "sum": masked_sum, "max": masked_max}


def pool_sequence(ids: Tensor, weight: Tensor, pooling: str, offset: int = 0, sparse: bool = False) -> Tensor:
    """Pool the ``(B, L)`` sequence ``ids`` (rows ``ids + offset`` of ``weight``) into ``(B, d)``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    if (pooling == "max" and sparse) or torch.onnx.is_in_onnx_export():
        return POOLINGS[pooling](*sequence_embeddings(ids, weight, offset, sparse))
    # id 0 (row ``offset``) is left out of the bag and gets no gradient from it; an empty bag pools to zeros
    rows = ids if offset == 0 else ids + offset
    return F.embedding_bag(rows, weight, mode=pooling, padding_idx=offset, sparse=sparse)  # (B, d)


__all__ = ["POOLINGS", "pool_sequence", "sequence_embeddings", "masked_sum", "masked_mean", "masked_max"]
