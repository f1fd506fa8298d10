"""One layer turning a feature batch into dense vectors, flat or per field."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import DenseFeature, Feature, SequenceFeature, SparseFeature, feature_from_config

PADDING_ROW = 0  # row 0 of every fused table: all zeros, never updated, left out of sequence pooling


class TableView:
    """One feature's embedding table as rows of the fused weight (``weight`` is a view, shape ``(vocab, d)``)."""

    def __init__(self, fused: nn.Parameter, offset: int, num_embeddings: int) -> None:
        self._fused = fused
        self.offset = offset
        self.num_embeddings = num_embeddings
        self.embedding_dim = fused.shape[1]

    @property
    def weight(self) -> Tensor:
        return self._fused[self.offset : self.offset + self.num_embeddings]


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
    In a table owned by a sequence feature, id 0 is padding for every feature
    that uses it (a zero vector that is never trained).

    Layout (what makes it fast): all tables of one ``embedding_dim`` are rows
    of ONE fused ``nn.Embedding`` ``weights["dim<d>"]``, ``(1 + sum of vocab sizes, d)``;
    its row 0 is the shared padding row. All sparse features of that dim are
    looked up together (their ids plus per-feature row offsets, one
    ``embedding`` call); each sequence is one ``embedding_bag`` call with the
    padding row excluded. ``tables[name].weight`` is a view of a table's rows.
    Set ``sparse = True`` (``MultiTaskLightningModule(sparse_embeddings=True)``
    does) to get sparse gradients for the fused weights, for ``SparseAdam``.
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
        # one fused table per embedding dim, an nn.Embedding (so DDP knows when its gradient is
        # sparse); each owner's table is a block of rows after the padding row
        self.weights = nn.ModuleDict()
        self._offset: dict[str, int] = {}  # owner name -> first row in its fused weight
        owners = [f for f in self.features if not isinstance(f, DenseFeature) and not f.shared_with]
        for dim in dict.fromkeys(f.embedding_dim for f in owners):
            rows = 1
            for f in owners:
                if f.embedding_dim == dim:
                    self._offset[f.name] = rows
                    rows += f.vocab_size
            table = nn.Embedding(rows, dim, padding_idx=PADDING_ROW)
            weight = table.weight
            with torch.no_grad():
                weight.normal_(std=0.05)
                weight[PADDING_ROW].zero_()
                for f in owners:
                    if f.embedding_dim == dim and isinstance(f, SequenceFeature):
                        weight[self._offset[f.name]].zero_()  # id 0 of a sequence table: padding, never read
            self.weights[self._key(dim)] = table
        self._padded_tables = {f.name for f in owners if isinstance(f, SequenceFeature)}

        # the grouped lookup of sparse features: per dim, their names and row offsets (in spec order)
        self._sparse_groups: dict[int, list[str]] = {}
        for f in self.features:
            if isinstance(f, SparseFeature):
                self._sparse_groups.setdefault(f.embedding_dim, []).append(f.name)
        for dim, group in self._sparse_groups.items():
            offsets = torch.tensor([self._offset[self._table_of[n]] for n in group], dtype=torch.long)
            self.register_buffer(f"_offsets_{dim}", offsets, persistent=False)
            padded = torch.tensor([self._table_of[n] in self._padded_tables for n in group])
            self.register_buffer(f"_padded_{dim}", padded if padded.any() else None, persistent=False)
        # runs of consecutive spec positions served by consecutive columns of one grouped lookup
        self._layout: list[tuple[str, object]] = []
        for f in self.features:
            if isinstance(f, SparseFeature):
                column = self._sparse_groups[f.embedding_dim].index(f.name)
                last = self._layout[-1] if self._layout else None
                if last is not None and last[0] == "sparse" and last[1][0] == f.embedding_dim and last[1][2] == column:
                    self._layout[-1] = ("sparse", (f.embedding_dim, last[1][1], column + 1))
                else:
                    self._layout.append(("sparse", (f.embedding_dim, column, column + 1)))
            else:
                self._layout.append(("sequence" if isinstance(f, SequenceFeature) else "dense", f))

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

    @staticmethod
    def _key(dim: int) -> str:
        return f"dim{dim}"

    @property
    def sparse(self) -> bool:
        """Whether the fused tables produce sparse gradients (for ``SparseAdam``)."""
        return any(table.sparse for table in self.weights.values())

    @sparse.setter
    def sparse(self, value: bool) -> None:
        for table in self.weights.values():
            table.sparse = bool(value)

    @property
    def tables(self) -> dict[str, TableView]:
        """Each table owner's rows of its fused weight: ``tables[name].weight`` is ``(vocab_size, d)``."""
        by_name = {f.name: f for f in self.features}
        return {
            name: TableView(self.weights[self._key(by_name[name].embedding_dim)].weight, offset, by_name[name].vocab_size)
            for name, offset in self._offset.items()
        }

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The fused embedding weights (what a sparse optimizer updates)."""
        return [table.weight for table in self.weights.values()]

    def _column(self, x: Mapping[str, Tensor], name: str) -> Tensor:
        try:
            return x[name]
        except KeyError:
            raise ValueError(f"the batch has no feature {name!r}; it has {sorted(x)}") from None

    def _sequence_rows(self, ids: Tensor, owner: str) -> Tensor:
        """Fused-weight rows of a sequence's ids; id 0 (padding) goes to the padding row."""
        return (ids + self._offset[owner]).masked_fill(ids == 0, PADDING_ROW)

    def _sparse_lookup(self, x: Mapping[str, Tensor], dim: int) -> Tensor:
        ids = torch.stack([self._column(x, n) for n in self._sparse_groups[dim]], dim=1)  # (B, n)
        rows = ids + getattr(self, f"_offsets_{dim}")
        padded = getattr(self, f"_padded_{dim}")
        if padded is not None:
            rows = rows.masked_fill((ids == 0) & padded, PADDING_ROW)
        return F.embedding(rows, self.weights[self._key(dim)].weight, padding_idx=PADDING_ROW, sparse=self.sparse)  # (B, n, d)

    def _pool(self, f: SequenceFeature, ids: Tensor) -> Tensor:
        weight = self.weights[self._key(f.embedding_dim)].weight
        rows = self._sequence_rows(ids, self._table_of[f.name])  # (B, L)
        if (f.pooling == "max" and self.sparse) or torch.onnx.is_in_onnx_export():
            # embedding_bag has no sparse gradient for max, and ONNX has no embedding_bag with padding
            emb = F.embedding(rows, weight, padding_idx=PADDING_ROW, sparse=self.sparse)  # (B, L, d)
            mask = (rows != PADDING_ROW).unsqueeze(-1)  # (B, L, 1)
            if f.pooling == "max":
                pooled = emb.masked_fill(~mask, float("-inf")).amax(dim=1)
                return torch.where(mask.any(dim=1), pooled, torch.zeros_like(pooled))
            summed = (emb * mask).sum(dim=1)  # (B, d); the padding row is zero anyway
            return summed if f.pooling == "sum" else summed / mask.sum(dim=1).clamp(min=1)
        # padding rows are left out of the bag; an empty bag pools to zeros
        return F.embedding_bag(rows, weight, mode=f.pooling, padding_idx=PADDING_ROW, sparse=self.sparse)  # (B, d)

    def _parts(self, x: Mapping[str, Tensor]) -> list[tuple[Feature | None, Tensor]]:
        """Spec-ordered pieces: ``(None, (B, k, d))`` for a run of k sparse features, ``(feature, (B, width))`` otherwise."""
        grouped = {dim: self._sparse_lookup(x, dim) for dim in self._sparse_groups}
        parts: list[tuple[Feature | None, Tensor]] = []
        for kind, item in self._layout:
            if kind == "sparse":
                dim, start, stop = item  # type: ignore[misc]
                parts.append((None, grouped[dim][:, start:stop]))
            elif kind == "sequence":
                parts.append((item, self._pool(item, self._column(x, item.name))))  # type: ignore[arg-type]
            else:
                value = self._column(x, item.name).float()  # type: ignore[union-attr]
                parts.append((item, value.unsqueeze(-1) if value.dim() == 1 else value))  # type: ignore[arg-type]
        return parts

    def forward(self, x: Mapping[str, Tensor], view: str = "flat") -> Tensor:
        if view == "flat":
            parts = [p.flatten(1) if f is None else p for f, p in self._parts(x)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (B, D)
        if view == "field":
            if self.field_dim is None:
                raise ValueError("construct FeatureEmbedding(..., field_view=True) to use view='field'")
            fields = [
                p if f is None else (self.dense_projections[f.name](p) if isinstance(f, DenseFeature) else p).unsqueeze(1)
                for f, p in self._parts(x)
            ]
            return fields[0] if len(fields) == 1 else torch.cat(fields, dim=1)  # (B, F, d)
        raise ValueError(f"view must be 'flat' or 'field', got {view!r}")
