"""``FeatureEmbedding``'s tables as TorchRec collections: what ``TorchRecStrategy`` puts in the layer's place.

:class:`TorchRecEmbedding` computes what the ``FeatureEmbedding`` it replaces
computes (same features, same ``(B, D)`` flat and ``(B, F, d)`` field views,
same ``output_dim``), with one table per feature that owns one (sparse or
sequence, not ``shared_with``) held by TorchRec instead of PyTorch modules:

* ``bags``, an ``EmbeddingBagCollection`` (sum pooling) holding every table
  that no max-pooled sequence reads; a feature sharing a table is one more
  ``feature_names`` entry of that table's config;
* ``sequences``, an ``EmbeddingCollection`` (one vector per id, pooled here)
  holding the tables a max-pooled sequence reads (TorchRec's bags pool by sum or
  mean only).

Each batch becomes one ``KeyedJaggedTensor`` per collection, keyed by feature
name: a sparse feature contributes its one id per row, a sequence its non-zero
ids (id 0 is padding and never looked up, so a row of padding is an empty bag
and pools to zeros, and row 0 of a sequence-owned table is never trained, as
in ``FeatureEmbedding``). A sparse feature reading a sequence's table skips id 0
as well (there it reads the padding row, which is zero). Mean pooling is the
sum divided by the number of ids. Outputs are read by feature name, never by
position (sharded collections return their keys in another order).

The layer's ``dense_projections`` (field view) move over unchanged (the same
parameters). Ids are checked like ``FeatureEmbedding`` checks them: outside
``[0, rows)`` of the table they read raises ``ValueError`` naming the feature
(on CPU; a device-side assert elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..features import DenseFeature, Feature, SequenceFeature, SparseFeature
from ..layers.embedding import INIT_CHUNK_ROWS, FeatureEmbedding
from ..layers.input_views import InputViews
from ._torchrec import require_torchrec


@dataclass(frozen=True)
class TableSpec:
    """One table: its owner feature, shape, the features reading it, where it sits in ``FeatureEmbedding``."""

    name: str
    rows: int
    dim: int
    readers: tuple[str, ...]
    unpooled: bool  # in the EmbeddingCollection (a max-pooled or an encoded sequence reads it)
    plain_key: str  # FeatureEmbedding state_dict key holding it, relative to the layer
    first_row: int  # its rows are [first_row, first_row + rows) of plain_key


def table_specs(layer: FeatureEmbedding) -> dict[str, TableSpec]:
    """The tables of ``layer``, by owner feature, in spec order."""
    features = {f.name: f for f in layer.features}
    readers: dict[str, list[str]] = {}
    for f in layer.features:
        if not isinstance(f, DenseFeature):
            readers.setdefault(f.shared_with or f.name, []).append(f.name)
    specs = {}
    for owner, (key, first, rows) in layer.table_layout().items():
        if "." in owner:
            raise ValueError(f"feature {owner!r}: TorchRec names a table after its feature and refuses a '.' in it; "
                             "rename the column (e.g. with '_')")
        unpooled = any(isinstance(features[n], SequenceFeature) and (features[n].pooling == "max" or features[n].encoded)
                       for n in readers[owner])
        specs[owner] = TableSpec(owner, rows, features[owner].embedding_dim, tuple(readers[owner]), unpooled, key,
                                 first)
    return specs


def is_sharded_tensor(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def write_table(target: Tensor, rows: Tensor | Callable[[int, int], Tensor]) -> None:
    """Fill ``target`` (a plain tensor, or this rank's shards of a ShardedTensor) with a whole table's values.

    ``rows`` is the table, or a function giving its rows ``[start, stop)``
    (``FeatureEmbedding.initial_rows`` of a deferred layer), called for at
    most ``INIT_CHUNK_ROWS`` rows at a time and only for the rows this rank holds.
    """
    read = (lambda a, b: rows[a:b]) if isinstance(rows, Tensor) else rows
    pieces = ([(shard.tensor, shard.metadata.shard_offsets, shard.metadata.shard_sizes)
               for shard in target.local_shards()] if is_sharded_tensor(target)
              else [(target, (0, 0), tuple(target.shape))])
    with torch.no_grad():
        for tensor, (row, column), (num_rows, num_columns) in pieces:
            local = tensor.view(num_rows, num_columns)
            for first in range(0, num_rows, INIT_CHUNK_ROWS):
                last = min(num_rows, first + INIT_CHUNK_ROWS)
                local[first:last].copy_(read(row + first, row + last)[:, column : column + num_columns])


class TorchRecEmbedding(InputViews, nn.Module):
    """A ``FeatureEmbedding`` whose tables are TorchRec collections; see the module docstring.

    Args:
        layer: the layer to replace; its tables' values are copied in
            (``copy_tables_from``) when the collections are not on the meta
            device, else by the caller after sharding.
        device: where the collections are built; ``"meta"`` allocates nothing
            (``TorchRecStrategy`` builds them there and copies the values into
            each rank's shards).
    """

    #: Its tables train from the backward pass through it (fused optimizers inside it; ``data_parallel``
    #: tables from their gradients), not from gradients a weighting strategy computes beforehand and hands
    #: to the optimizer: ``WeightingStrategy.backward_through_model`` reads this.
    trains_in_backward = True

    def __init__(self, layer: FeatureEmbedding, device: torch.device | str | None = None) -> None:
        super().__init__()
        require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, PoolingType

        tables = [p for p in layer.embedding_parameters() if not p.is_meta]
        device = torch.device(device) if device is not None else tables[0].device if tables else torch.device("cpu")
        self.features: tuple[Feature, ...] = layer.features
        self.embedded_dim = layer.embedded_dim
        self.output_dim = layer.output_dim
        self.num_fields = layer.num_fields
        self.field_dim = layer.field_dim
        self._slices = layer.feature_slices()
        # the same parameters: the field view's projections, the sequence encoders and the interaction
        self.dense_projections = layer.dense_projections
        self.group_projections = layer.group_projections
        self.encoders = layer.encoders
        self.interaction = layer.interaction
        self.tables = table_specs(layer)
        self._by_name = {f.name: f for f in self.features}
        self._table_of = {reader: spec.name for spec in self.tables.values() for reader in spec.readers}
        # an encoded sequence keeps its padding positions (its group's members stay aligned; the encoders mask them)
        self._encoded = {m.name for members in self.encoders.groups.values() for m in members}
        self._skip_padding = {
            name for name, owner in self._table_of.items()
            if name not in self._encoded and (isinstance(self._by_name[name], SequenceFeature)
                                              or isinstance(self._by_name[owner], SequenceFeature))
        }
        # spec order: every feature, except that an encoded group stands at its first member (by its key)
        firsts = {members[0].name: key for key, members in self.encoders.groups.items()}
        self._items: list[Feature | str] = [firsts.get(f.name, f) for f in self.features
                                            if f.name not in self._encoded or f.name in firsts]
        bag_tables = [t for t in self.tables.values() if not t.unpooled]
        sequence_tables = [t for t in self.tables.values() if t.unpooled]
        # each collection's keys: first the sparse features that read one id per row with no padding (checked and
        # laid out as one (n, B) block), then the others; the key order is free, outputs are read by name
        self._plain: dict[str, list[str]] = {}
        keys: dict[str, list[str]] = {}
        for collection, tables in (("bags", bag_tables), ("sequences", sequence_tables)):
            names = [n for t in tables for n in t.readers]
            plain = [n for n in names if isinstance(self._by_name[n], SparseFeature) and n not in self._skip_padding]
            self._plain[collection] = plain
            keys[collection] = plain + [n for n in names if n not in plain]
            self.register_buffer(f"_vocab_{collection}", torch.tensor(
                [self.tables[self._table_of[n]].rows for n in plain], dtype=torch.long), persistent=False)
        self._bag_keys, self._sequence_keys = keys["bags"], keys["sequences"]
        self.bags = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                                       feature_names=list(t.readers), pooling=PoolingType.SUM) for t in bag_tables],
            device=device,
        ) if bag_tables else None
        self.sequences = EmbeddingCollection(
            tables=[EmbeddingConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                                    feature_names=list(t.readers)) for t in sequence_tables],
            device=device,
        ) if sequence_tables else None
        if device.type != "meta":
            self.copy_tables_from(layer)

    # ------------------------------------------------------------------ tables
    def collections(self) -> dict[str, nn.Module]:
        """``{"bags": ..., "sequences": ...}``, those that exist (sharded ones after ``TorchRecStrategy`` set up)."""
        return {name: module for name, module in (("bags", self.bags), ("sequences", self.sequences))
                if module is not None}

    def table_tensors(self) -> dict[str, Tensor]:
        """``{owner feature: weight}``: a ShardedTensor (this rank's shards) or a plain tensor (data_parallel)."""
        found = {}
        for module in self.collections().values():
            for key, value in module.state_dict().items():
                # "embedding_bags.<table>.weight" / "embeddings.<table>.weight"
                found[key.split(".")[-2]] = value
        missing = set(self.tables) - set(found)
        if missing:
            raise RuntimeError(f"TorchRecEmbedding: no weight found for tables {sorted(missing)}")
        return found

    def copy_tables_from(self, layer: FeatureEmbedding) -> None:
        """Write the values of ``layer``'s tables into this layer's (into this rank's shards once sharded).

        A deferred ``layer`` (built inside ``deferred_tables()``) gives its
        ``initial_rows``, drawn only for the rows this rank holds.
        """
        targets = self.table_tensors()
        deferred = layer.deferred
        for name in self.tables:
            write_table(targets[name], (lambda a, b, name=name: layer.initial_rows(name, a, b)) if deferred
                        else layer.table_weight(name).detach())

    def load_plain_tables(self, state_dict: Mapping[str, Tensor], prefix: str) -> list[str]:
        """Write tables from a ``FeatureEmbedding`` state dict (keys under ``prefix``); returns the keys read."""
        targets = self.table_tensors()
        used = []
        for spec in self.tables.values():
            key = prefix + spec.plain_key
            if key not in state_dict:
                raise ValueError(f"the checkpoint has no {key!r}, which holds the table of feature {spec.name!r}")
            value = state_dict[key]
            if value.dim() != 2 or value.shape[1] != spec.dim or value.shape[0] < spec.first_row + spec.rows:
                raise ValueError(f"the checkpoint's {key!r} has shape {tuple(value.shape)}, too small for the table "
                                 f"of feature {spec.name!r} ({spec.rows} x {spec.dim} from row {spec.first_row}): the "
                                 "vocabulary or embedding_dim changed since it was written")
            write_table(targets[spec.name], value[spec.first_row : spec.first_row + spec.rows])
            used.append(key)
        return used

    # ----------------------------------------------------------------- forward
    def _column(self, x: Mapping[str, Tensor], name: str) -> Tensor:
        try:
            return x[name]
        except KeyError:
            raise ValueError(f"the batch has no feature {name!r}; it has {sorted(x)}") from None

    def _jagged(self, x: Mapping[str, Tensor], collection: str, keys: list[str]) -> tuple[Any, dict[str, Tensor]]:
        """The ``KeyedJaggedTensor`` of ``keys`` and, per key that skips padding, its ids per row ``(B,)``."""
        from torchrec import KeyedJaggedTensor

        plain = self._plain[collection]
        values, lengths, counts = [], [], {}
        if plain:  # one id per row each: checked together, laid out key-major as KeyedJaggedTensor wants
            ids = torch.stack([self._column(x, name) for name in plain])  # (n, B)
            FeatureEmbedding._check_ids(ids.t(), getattr(self, f"_vocab_{collection}"), plain)
            values.append(ids.reshape(-1))
            lengths.append(torch.ones_like(values[0]))
        for name in keys[len(plain):]:
            ids = self._column(x, name)
            FeatureEmbedding._check_ids(ids if ids.dim() > 1 else ids.unsqueeze(1), self.tables[self._table_of[name]].rows,
                                        [name])
            if name in self._encoded:  # every position, padding included: (B * L) ids, L per row
                values.append(ids.reshape(-1))
                lengths.append(torch.full_like(ids[:, 0], ids.shape[1]))
            elif name in self._skip_padding:
                present = ids != 0  # (B,) or (B, L)
                count = present.long() if ids.dim() == 1 else present.sum(dim=1)  # (B,)
                values.append(ids[present])
                lengths.append(count)
                counts[name] = count
            else:
                values.append(ids.reshape(-1))
                lengths.append(torch.ones_like(ids.reshape(-1)))
        jagged = KeyedJaggedTensor(keys=keys, values=torch.cat(values).long(), lengths=torch.cat(lengths).int())
        return jagged, counts

    def _lookup(self, x: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """``{feature: (B, d)}`` for every sparse and pooled sequence feature, and ``{feature: ((B, L, d), ids)}``
        for every encoded sequence."""
        out: dict[str, Tensor] = {}
        sequences: dict[str, tuple[Tensor, Tensor]] = {}
        if self.bags is not None:
            jagged, counts = self._jagged(x, "bags", self._bag_keys)
            pooled = self.bags(jagged).to_dict()  # by name: sharded outputs come in another key order
            for name in self._bag_keys:
                value = pooled[name]  # (B, d), summed
                f = self._by_name[name]
                if isinstance(f, SequenceFeature) and f.pooling == "mean":
                    value = value / counts[name].clamp(min=1).unsqueeze(1).to(value.dtype)
                out[name] = value
        if self.sequences is not None:
            jagged, counts = self._jagged(x, "sequences", self._sequence_keys)
            unpooled = self.sequences(jagged)
            for name in self._sequence_keys:
                f, rows = self._by_name[name], unpooled[name]
                if name in self._encoded:
                    sequences[name] = (rows.to_padded_dense(desired_length=f.max_len, padding_value=0.0),
                                       self._column(x, name))  # (B, L, d), (B, L)
                elif isinstance(f, SparseFeature):  # one id per row, none where it was skipped (reads as zeros)
                    out[name] = rows.to_padded_dense(desired_length=1, padding_value=0.0)[:, 0]  # (B, d)
                elif f.pooling == "max":
                    padded = rows.to_padded_dense(desired_length=f.max_len, padding_value=float("-inf"))  # (B, L, d)
                    best = padded.amax(dim=1)
                    out[name] = torch.where((counts[name] > 0).unsqueeze(1), best, torch.zeros_like(best))
                else:
                    summed = rows.to_padded_dense(desired_length=f.max_len, padding_value=0.0).sum(dim=1)  # (B, d)
                    out[name] = (summed if f.pooling == "sum"
                                 else summed / counts[name].clamp(min=1).unsqueeze(1).to(summed.dtype))
        return out, sequences

    def _parts(self, x: Mapping[str, Tensor]) -> list[tuple[Feature | str, Tensor]]:
        """Spec-ordered pieces, as ``FeatureEmbedding._parts`` gives them (see ``InputViews``)."""
        embedded, sequences = self._lookup(x)
        for f in self.features:
            if isinstance(f, DenseFeature):
                value = self._column(x, f.name).float()
                embedded[f.name] = value.unsqueeze(-1) if value.dim() == 1 else value  # (B, dim)
        parts: list[tuple[Feature | str, Tensor]] = []
        for item in self._items:
            if isinstance(item, str):  # an encoded group
                members = self.encoders.groups[item]
                parts.append((item, self.encoders.encode(item, [sequences[m.name] for m in members],
                                                         [embedded[q] for q in self.encoders.queries[item]])))
            else:
                parts.append((item, embedded[item.name]))
        return parts


def replace_feature_embeddings(root: nn.Module, device: torch.device | str) -> dict[str, TorchRecEmbedding]:
    """Put a :class:`TorchRecEmbedding` in place of every ``FeatureEmbedding`` under ``root``.

    Returns ``{module path: new layer}`` (the first path of each; a layer
    referenced from several places is replaced everywhere by one new layer).
    The new layers' collections are built on ``device`` without values when it
    is ``"meta"``: the caller copies the old layers' tables in after sharding,
    with ``new.copy_tables_from(old)``, using the old layers kept in
    ``new.source`` until then.
    """
    replaced: dict[int, TorchRecEmbedding] = {}
    paths: dict[str, TorchRecEmbedding] = {}
    for path, module in list(root.named_modules()):
        for child_name, child in list(module._modules.items()):
            if not isinstance(child, FeatureEmbedding):
                continue
            if id(child) not in replaced:
                new = TorchRecEmbedding(child, device=device)
                new.__dict__["source"] = child  # not a submodule: dropped by the caller once copied
                replaced[id(child)] = new
                paths[f"{path}.{child_name}" if path else child_name] = new
            setattr(module, child_name, replaced[id(child)])
    return paths


__all__ = ["TorchRecEmbedding", "TableSpec", "table_specs", "replace_feature_embeddings", "write_table"]
