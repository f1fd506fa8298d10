"""Embedding tables trained with sparse gradients (``MultiTaskLightningModule(sparse_embeddings=True)``).

:func:`enable_sparse_embeddings` switches every ``FeatureEmbedding`` of a model
to sparse gradients (refused for a weighting strategy that needs the tables'
per-task gradients); :func:`check_sparse_strategy` refuses a multi-process
strategy that would reduce sparse gradients wrongly (all but DDP on gloo);
:func:`embedding_tables` lists the weights ``optim.LazySparseAdam`` updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers.embedding import FeatureEmbedding
from .weighting import WeightingStrategy


def embedding_tables(model: nn.Module) -> list[nn.Parameter]:
    """Every embedding table weight of ``model``'s ``FeatureEmbedding`` layers."""
    return [p for m in model.modules() if isinstance(m, FeatureEmbedding) for p in m.embedding_parameters()]


def enable_sparse_embeddings(model: nn.Module, weighting: WeightingStrategy) -> None:
    """Make every ``FeatureEmbedding`` of ``model`` produce sparse gradients; ``ValueError`` where it cannot."""
    layers = [m for m in model.modules() if isinstance(m, FeatureEmbedding)]
    if not layers or not embedding_tables(model):
        raise ValueError(f"sparse_embeddings=True: {type(model).__name__} has no FeatureEmbedding table to make sparse")
    if weighting.needs_embedding_gradients:
        raise ValueError(
            f"sparse_embeddings=True cannot be combined with weighting {type(weighting).__name__!r}: it works on "
            "per-task gradients of the shared parameters, embedding tables included, which sparse gradients do "
            "not provide; use sparse_embeddings=False"
        )
    for layer in layers:
        layer.sparse = True


def check_sparse_strategy(strategy: Any) -> None:
    """Sparse gradients are reduced correctly by DDP on gloo only; anything else multi-process is refused."""
    world_size = getattr(strategy, "world_size", 1)
    if world_size <= 1:
        return
    from lightning.pytorch.strategies import DDPStrategy

    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    if type(strategy) is not DDPStrategy or backend != "gloo":
        raise ValueError(
            f"sparse_embeddings=True under {type(strategy).__name__} (process group backend {backend!r}) is not "
            "supported: only DDPStrategy with the gloo backend all-reduces sparse gradients correctly. Use "
            "strategy=DDPStrategy(process_group_backend='gloo') or sparse_embeddings=False"
        )


__all__ = ["check_sparse_strategy", "embedding_tables", "enable_sparse_embeddings"]
