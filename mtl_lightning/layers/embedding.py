"""One layer turning a feature batch into dense vectors, flat or per field."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import DenseFeature, Feature, SequenceFeature, SparseFeature, feature_from_config

class FeatureEmbedding(nn.Module):
    """Embeds sparse ids, pools sequences and passes dense values through.

    * ``forward(x)`` / ``view="flat"`` -> ``(B, D)``: sparse embeddings, pooled
      sequence embeddings and dense values concatenated in spec order;
      ``output_dim == D``.
    * ``view="field"`` -> ``(B, F, d)``: one ``d``-vector per feature. Every
      sparse and sequence feature must have the same ``embedding_dim`` ``d``;
      each dense feature is mapped to ``d`` by its own bias-free linear layer
      (created only when ``field_view=True``); ``num_fields == F``.

    ``shared_with`` makes a feature reuse another feature's table (same
    ``embedding_dim`` required; ids are checked against the owner's vocabulary).
    Sequence pooling ignores id 0 (padding); a row of padding pools to zeros.
    Each sequence is pooled by one ``embedding_bag`` call with id 0 left out of
    the bag. Set ``sparse = True`` (``MultiTaskLightningModule(sparse_embeddings=True)``
    does) to get sparse gradients for the tables, for ``SparseAdam``.
    """

    def __init__(self, features: Sequence[Feature | dict], field_view: bool = False) -> None:
        super().__init__()
        self.features = tuple(feature_from_config(f) for f in features)
        if not self.features:
            raise ValueError("FeatureEmbedding needs at least one feature")
        names = [f.name for f in self.features]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"feature names must be unique, duplicated: {duplicated}")
        by_name = {f.name: f for f in self.features}
        self.tables = nn.ModuleDict()
        self._table_of: dict[str, str] = {}
        for f in self.features:
            if isinstance(f, DenseFeature):
                continue
            owner = f.shared_with or f.name
            if owner not in by_name or isinstance(by_name[owner], DenseFeature):
                raise ValueError(f"feature {f.name!r}: shared_with={owner!r} is not a sparse or sequence feature")
            if by_name[owner].shared_with:
                raise ValueError(f"feature {f.name!r}: shares {owner!r}, which itself shares another table")
            if by_name[owner].embedding_dim != f.embedding_dim:
                raise ValueError(
                    f"feature {f.name!r}: embedding_dim {f.embedding_dim} differs from shared table "
                    f"{owner!r} ({by_name[owner].embedding_dim})"
                )
            self._table_of[f.name] = owner
        for f in self.features:
            if not isinstance(f, DenseFeature) and not f.shared_with:
                padding_idx = 0 if isinstance(f, SequenceFeature) else None
                self.tables[f.name] = nn.Embedding(f.vocab_size, f.embedding_dim, padding_idx=padding_idx)
                nn.init.normal_(self.tables[f.name].weight, std=0.05)
                if padding_idx is not None:
                    with torch.no_grad():
                        self.tables[f.name].weight[0].zero_()
        self.output_dim = sum(f.dim if isinstance(f, DenseFeature) else f.embedding_dim for f in self.features)
        self.num_fields = len(self.features)
        self.field_dim: int | None = None
        self.dense_projections = nn.ModuleDict()
        if field_view:
            dims = {f.embedding_dim for f in self.features if not isinstance(f, DenseFeature)}
            if len(dims) > 1:
                raise ValueError(f"the per-field view needs one embedding_dim for all features, got {sorted(dims)}")
            self.field_dim = dims.pop() if dims else 16
            for f in self.features:
                if isinstance(f, DenseFeature):
                    self.dense_projections[f.name] = nn.Linear(f.dim, self.field_dim, bias=False)

    @property
    def sparse(self) -> bool:
        """Whether the tables produce sparse gradients (for ``SparseAdam``)."""
        return any(table.sparse for table in self.tables.values())

    @sparse.setter
    def sparse(self, value: bool) -> None:
        for table in self.tables.values():
            table.sparse = bool(value)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding tables' weights (what a sparse optimizer updates)."""
        return [table.weight for table in self.tables.values()]

    def _column(self, x: Mapping[str, Tensor], name: str) -> Tensor:
        try:
            return x[name]
        except KeyError:
            raise ValueError(f"the batch has no feature {name!r}; it has {sorted(x)}") from None

    def _embed(self, f: Feature, value: Tensor) -> Tensor:
        if isinstance(f, DenseFeature):
            value = value.float()
            return value.unsqueeze(-1) if value.dim() == 1 else value
        table = self.tables[self._table_of[f.name]]
        if isinstance(f, SparseFeature):
            return table(value)  # (B, d)
        if (f.pooling == "max" and table.sparse) or torch.onnx.is_in_onnx_export():
            # embedding_bag has no sparse gradient for max, and ONNX has no embedding_bag with padding
            emb = table(value)  # (B, L, d)
            mask = (value != 0).unsqueeze(-1)  # (B, L, 1)
            if f.pooling == "max":
                pooled = emb.masked_fill(~mask, float("-inf")).amax(dim=1)
                return torch.where(mask.any(dim=1), pooled, torch.zeros_like(pooled))
            summed = (emb * mask).sum(dim=1)  # (B, d)
            return summed if f.pooling == "sum" else summed / mask.sum(dim=1).clamp(min=1)
        # id 0 is left out of the bag (and gets no gradient from it); an empty bag pools to zeros
        return F.embedding_bag(value, table.weight, mode=f.pooling, padding_idx=0, sparse=table.sparse)  # (B, d)

    def forward(self, x: Mapping[str, Tensor], view: str = "flat") -> Tensor:
        parts = [self._embed(f, self._column(x, f.name)) for f in self.features]
        if view == "flat":
            return torch.cat(parts, dim=-1)  # (B, D)
        if view == "field":
            if self.field_dim is None:
                raise ValueError("construct FeatureEmbedding(..., field_view=True) to use view='field'")
            fields = [
                self.dense_projections[f.name](p) if isinstance(f, DenseFeature) else p
                for f, p in zip(self.features, parts)
            ]
            return torch.stack(fields, dim=1)  # (B, F, d)
        raise ValueError(f"view must be 'flat' or 'field', got {view!r}")
