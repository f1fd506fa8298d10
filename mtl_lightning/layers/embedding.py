"""One layer turning a feature batch into dense vectors, flat or per field."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import DenseFeature, Feature, SequenceFeature, SparseFeature, feature_from_config


VOCABULARY_HINT = (
    "the vocabulary changed since the checkpoint was written, e.g. vocab_size was inferred again from data with "
    "more or fewer ids; to resume, build the model with the checkpoint's feature specs (its "
    "hyper_parameters['model']['init_args']['features'], e.g. passed as ParquetDataModule(features=...)), "
    "or start a new run (fit without ckpt_path) to train the new vocabulary; for day-by-day training, let "
    "ParquetDataModule(grow_vocabulary=True) grow it (docs/object-stores.md: Incremental training)"
)


def _table_rows(features: Sequence[Feature]) -> dict[str, int]:
    """``{feature: vocab_size}`` of the features that own an embedding table (sparse or sequence, not shared)."""
    return {f.name: f.vocab_size for f in features if not isinstance(f, DenseFeature) and not f.shared_with}


def vocabulary_mismatch(checkpoint_features: Sequence[Feature | dict], model_features: Sequence[Feature | dict]
                        ) -> str | None:
    """A message naming every table-owning feature whose ``vocab_size`` differs between the two spec lists, or ``None``.

    Features present in only one of the lists are not compared (they change
    the state dict's keys or other layers' shapes, which loading reports).
    """
    before = _table_rows([feature_from_config(f) for f in checkpoint_features])
    after = _table_rows([feature_from_config(f) for f in model_features])
    changed = [
        f"feature {name!r}: the checkpoint's table has {before[name]} rows, the model's {rows}"
        for name, rows in after.items() if name in before and before[name] != rows
    ]
    if not changed:
        return None
    return f"the checkpoint does not fit the model's embedding tables: {'; '.join(changed)} ({VOCABULARY_HINT})"


_DEFERRED = contextvars.ContextVar("mtl_lightning_deferred_tables", default=False)
INIT_CHUNK_ROWS = 65_536  # rows drawn per generator by FeatureEmbedding.initial_rows


@contextlib.contextmanager
def deferred_tables() -> Iterator[None]:
    """``FeatureEmbedding`` layers built inside allocate no tables (meta tensors) until :meth:`materialize_tables`.

    What ``TorchRecStrategy.tensor_init_context`` (``with
    trainer.init_module():``) uses, so that each process allocates and
    initialises only its own shards of the tables: see
    :meth:`FeatureEmbedding.initial_rows` for the values they start from.
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class _Block(NamedTuple):
    """Where a sparse feature's table lives: rows ``[offset, offset + vocab_size)`` of ``fused[key]``."""

    key: str
    offset: int
    vocab_size: int


class _Run(NamedTuple):
    """Consecutive spec positions served by columns ``[start, stop)`` of one grouped lookup."""

    key: str
    start: int
    stop: int


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

    Layout. The tables owned by sparse features are fused: all of them with the
    same ``embedding_dim`` ``d`` are blocks of rows of ONE weight,
    ``fused["dim<d>"]`` (an ``nn.Embedding`` of ``sum(vocab_size)`` rows, held
    as a module so that DDP knows when its gradient is sparse). Feature ``f``'s
    table is rows ``[offset_f, offset_f + vocab_f)``, blocks in spec order; a
    sparse feature with ``shared_with`` a sparse feature reads its owner's
    block. The forward stacks the ids of those features into ``(B, n)``, adds
    the per-column row offsets and does one lookup per ``d`` (one gradient,
    one optimizer update), instead of one per feature. Sequence features keep
    their own ``nn.Embedding`` in ``tables`` (row 0, the padding, is zero and
    never trained) and are pooled by one ``embedding_bag`` call each with id 0
    left out of the bag (a masked gather under ONNX export, and for ``max``
    pooling with sparse gradients, which ``embedding_bag`` lacks). A sequence
    sharing a sparse feature's table pools over that block of the fused weight
    (ids + offset, the block's first row taking the padding role of id 0).
    A sparse feature sharing a sequence's table looks it up on its own.

    The values are those of one ``nn.Embedding`` per table: each block is
    drawn in spec order as such a table would be (normal std 0.05, after the
    draw ``nn.Embedding`` makes on construction), so a seeded model starts
    from the same tables as with separate ones, and the outputs equal separate
    lookups into the blocks. Because a fused block no longer bounds its ids,
    ids of a fused lookup are checked: on CPU an id outside ``[0, vocab_size)``
    of its table raises ``ValueError`` naming the feature; on an accelerator
    (and under ``torch.compile``) the check is a device-side assert, as an
    out-of-range ``nn.Embedding`` lookup is there, so no host sync is added.
    Traced and ONNX exports skip it.

    Checkpoints: the ``state_dict`` keys are ``fused.dim<d>.weight`` (one per
    ``d``) and ``tables.<sequence>.weight``; this changed from the earlier
    ``tables.<feature>.weight`` per sparse table; checkpoints written before
    the fused layout still load (their tables are copied into the blocks).
    Loading a table of another size (the vocabulary changed since the
    checkpoint was written) raises ``ValueError`` naming the feature(s) and
    both sizes, not torch's bare ``size mismatch``. Read a table through :meth:`table_weight` / :meth:`table_grad`, not
    through the module tree.

    Set ``sparse = True`` (``MultiTaskLightningModule(sparse_embeddings=True)``
    does) to get sparse gradients for every table weight, for ``SparseAdam``.

    Deferred tables. Built inside :func:`deferred_tables` (which
    ``with trainer.init_module():`` under ``TorchRecStrategy`` enters), the
    layer holds its table weights as meta tensors (no memory) and one seed,
    ``table_seed``, drawn from torch's global generator (so ``seed_everything``
    fixes it). Row ``r`` of a table then starts from :meth:`initial_rows`:
    normal(0, 0.05) values drawn in chunks of ``INIT_CHUNK_ROWS`` rows, each
    chunk from its own generator seeded by (``table_seed``, owner feature,
    chunk index); the padding row 0 of a sequence-owned table is zero. Any
    range of rows can be produced without the rest of the table, so each
    process of a sharded run initialises only its shards, and the values do
    not depend on the sharding or the number of processes. They are not the
    values an eagerly built layer draws from the same global seed (those
    follow one ``nn.Embedding`` per table). :meth:`materialize_tables`
    allocates and fills the whole tables in this process; until then
    ``forward`` raises.
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

        # the fused weights: one block of rows per sparse-owned table, in spec order
        owners = [f for f in self.features if not isinstance(f, DenseFeature) and not f.shared_with]
        self._blocks: dict[str, _Block] = {}
        rows: dict[str, int] = {}
        for f in owners:
            if isinstance(f, SparseFeature):
                key = f"dim{f.embedding_dim}"
                self._blocks[f.name] = _Block(key, rows.get(key, 0), f.vocab_size)
                rows[key] = rows.get(key, 0) + f.vocab_size
        deferred = _DEFERRED.get()
        device = torch.device("meta") if deferred else None
        # one seed for every table's initial_rows; drawn only when deferred, so eager layers keep their values
        self.table_seed: int | None = int(torch.randint(0, 2**62, ())) if deferred else None
        # _weight= skips nn.Embedding's own initial draw; the blocks are drawn below
        self.fused = nn.ModuleDict(
            {key: nn.Embedding(n, int(key[3:]), _weight=torch.empty(n, int(key[3:]), device=device))
             for key, n in rows.items()}
        )
        self.tables = nn.ModuleDict()
        for f in owners:  # spec order: the random draws one nn.Embedding per table makes
            if deferred:
                if isinstance(f, SequenceFeature):
                    self.tables[f.name] = nn.Embedding(f.vocab_size, f.embedding_dim, padding_idx=0, device=device)
                continue
            if isinstance(f, SparseFeature):
                with torch.no_grad():
                    block = self._block_of(self.fused[self._blocks[f.name].key].weight, self._blocks[f.name])
                    block.normal_()  # nn.Embedding's reset_parameters draw, kept so seeded values do not change
                    block.normal_(std=0.05)
            else:
                self.tables[f.name] = nn.Embedding(f.vocab_size, f.embedding_dim, padding_idx=0)
                nn.init.normal_(self.tables[f.name].weight, std=0.05)
                with torch.no_grad():
                    self.tables[f.name].weight[0].zero_()

        # the grouped lookups: per fused weight, the sparse features reading it (spec order), their row
        # offsets and vocabularies (buffers, so they follow the module's device)
        self._groups: dict[str, list[str]] = {}
        for f in self.features:
            if isinstance(f, SparseFeature) and self._table_of[f.name] in self._blocks:
                self._groups.setdefault(self._blocks[self._table_of[f.name]].key, []).append(f.name)
        for key, group in self._groups.items():
            blocks = [self._blocks[self._table_of[n]] for n in group]
            self.register_buffer(f"_offsets_{key}", torch.tensor([b.offset for b in blocks]), persistent=False)
            self.register_buffer(f"_vocab_{key}", torch.tensor([b.vocab_size for b in blocks]), persistent=False)
        # spec order: runs of consecutive columns of one grouped lookup, and every other feature on its own
        grouped = {n for group in self._groups.values() for n in group}
        self._layout: list[_Run | Feature] = []
        for f in self.features:
            if f.name in grouped:
                key = self._blocks[self._table_of[f.name]].key
                column = self._groups[key].index(f.name)
                last = self._layout[-1] if self._layout else None
                if isinstance(last, _Run) and last.key == key and last.stop == column:
                    self._layout[-1] = _Run(key, last.start, column + 1)
                else:
                    self._layout.append(_Run(key, column, column + 1))
            else:
                self._layout.append(f)

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

    # ------------------------------------------------------------ deferred tables
    @property
    def deferred(self) -> bool:
        """Whether the tables are still unallocated (built inside :func:`deferred_tables`)."""
        return any(p.is_meta for p in self.embedding_parameters())

    def initial_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the table feature ``name`` reads, as a deferred layer initialises them.

        ``(stop - start, d)`` float32 on the CPU; see the class docstring
        (Deferred tables). Only the chunks holding those rows are drawn.
        """
        if self.table_seed is None:
            raise ValueError("initial_rows: this layer was not built inside deferred_tables(); its tables hold "
                             "their values already (table_weight)")
        owner = self._table_of.get(name)
        if owner is None:
            raise ValueError(f"{name!r} is not a sparse or sequence feature of this layer; those are {sorted(self._table_of)}")
        spec = next(f for f in self.features if f.name == owner)
        if not 0 <= start <= stop <= spec.vocab_size:
            raise ValueError(f"initial_rows({name!r}, {start}, {stop}): the table has {spec.vocab_size} rows")
        out = torch.empty(stop - start, spec.embedding_dim)
        for first in range(start - start % INIT_CHUNK_ROWS, stop, INIT_CHUNK_ROWS):
            size = min(INIT_CHUNK_ROWS, spec.vocab_size - first)
            key = f"{self.table_seed}:{owner}:{first // INIT_CHUNK_ROWS}".encode()
            generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(),
                                                                     "little") >> 1)
            chunk = torch.randn(size, spec.embedding_dim, generator=generator).mul_(0.05)
            if first == 0 and isinstance(spec, SequenceFeature):
                chunk[0] = 0.0  # the padding row
            lo, hi = max(start, first), min(stop, first + size)
            out[lo - start : hi - start] = chunk[lo - first : hi - first]
        return out

    def materialize_tables(self) -> None:
        """Allocate the deferred tables in this process and fill them with :meth:`initial_rows`."""
        if not self.deferred:
            return
        for holder in self._holders():
            holder.weight = nn.Parameter(torch.empty(holder.weight.shape), requires_grad=holder.weight.requires_grad)
        with torch.no_grad():
            for owner in self.table_layout():
                table = self.table_weight(owner)
                table.copy_(self.initial_rows(owner, 0, table.shape[0]))

    @staticmethod
    def _block_of(tensor: Tensor, block: _Block) -> Tensor:
        return tensor[block.offset : block.offset + block.vocab_size]

    def _holders(self) -> list[nn.Embedding]:
        return [*self.fused.values(), *self.tables.values()]

    @property
    def sparse(self) -> bool:
        """Whether the table lookups produce sparse gradients (for ``SparseAdam``)."""
        return any(holder.sparse for holder in self._holders())

    @sparse.setter
    def sparse(self, value: bool) -> None:
        for holder in self._holders():
            holder.sparse = bool(value)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Every table weight (what a sparse optimizer updates): the fused weights, then the sequence tables."""
        return [holder.weight for holder in self._holders()]

    def table_layout(self) -> dict[str, tuple[str, int, int]]:
        """Where each table lives in ``state_dict``: ``{owner feature: (key, first row, rows)}``.

        One entry per feature that owns a table (sparse or sequence, not
        ``shared_with``), in spec order; ``key`` is relative to this layer
        (``fused.dim<d>.weight`` or ``tables.<feature>.weight``) and the table
        is rows ``[first row, first row + rows)`` of it. Used to move tables
        between this layout and one tensor per table (TorchRec sharding).
        """
        layout = {}
        for f in self.features:
            if isinstance(f, DenseFeature) or f.shared_with:
                continue
            block = self._blocks.get(f.name)
            layout[f.name] = ((f"fused.{block.key}.weight", block.offset, block.vocab_size) if block is not None
                              else (f"tables.{f.name}.weight", 0, f.vocab_size))
        return layout

    def _table_parameter(self, name: str) -> tuple[nn.Parameter, _Block | None]:
        """The weight holding the table feature ``name`` reads (following ``shared_with``) and its block in it."""
        if name not in self._table_of:
            raise ValueError(f"{name!r} is not a sparse or sequence feature of this layer; those are {sorted(self._table_of)}")
        owner = self._table_of[name]
        if owner in self._blocks:
            block = self._blocks[owner]
            return self.fused[block.key].weight, block
        return self.tables[owner].weight, None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Also load checkpoints of the earlier layout: ``tables.<feature>.weight`` for every sparse table.

        Each such table is copied into its block of ``fused.dim<d>.weight``,
        provided every block of that weight is in the checkpoint (otherwise the
        keys are left for the usual missing/unexpected key report).

        A table whose number of rows differs from the checkpoint's raises
        ``ValueError`` naming the feature and both sizes (the vocabulary
        changed since the checkpoint was written), instead of torch's bare
        ``size mismatch``. A fused weight holds several features' tables, so
        its message lists them all; ``MultiTaskLightningModule`` compares the
        checkpoint's feature specs first and names the very feature.
        """
        self._check_table_rows(state_dict, prefix)
        for key, holder in self.fused.items():
            fused_key = f"{prefix}fused.{key}.weight"
            owners = [name for name, block in self._blocks.items() if block.key == key]
            old = {name: f"{prefix}tables.{name}.weight" for name in owners}
            if fused_key in state_dict or not all(k in state_dict for k in old.values()):
                continue
            parts = [state_dict.pop(old[name]) for name in owners]  # owners are in block (spec) order
            state_dict[fused_key] = torch.cat([p.to(holder.weight.dtype) for p in parts])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_table_rows(self, state_dict: Mapping[str, Tensor], prefix: str) -> None:
        """Raise ``ValueError`` when a table of ``state_dict`` has another number of rows than this layer's."""
        changed = []
        for key, holder in self.fused.items():
            value = state_dict.get(f"{prefix}fused.{key}.weight")
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] != holder.num_embeddings:
                owners = [name for name, block in self._blocks.items() if block.key == key]
                if len(owners) == 1:  # the weight is that one feature's table
                    changed.append(f"feature {owners[0]!r}: the checkpoint's table has {value.shape[0]} rows, the "
                                   f"model's {holder.num_embeddings}")
                    continue
                blocks = ", ".join(f"{name!r} ({self._blocks[name].vocab_size})" for name in owners)
                changed.append(
                    f"the checkpoint's {prefix}fused.{key}.weight has {value.shape[0]} rows, the model's "
                    f"{holder.num_embeddings}: it holds the tables of the features {blocks} (model vocab_size in "
                    "parentheses), one or more of which have another vocab_size in the checkpoint"
                )
        sizes = {name: block.vocab_size for name, block in self._blocks.items()}  # the earlier layout's tables
        sizes.update({name: table.num_embeddings for name, table in self.tables.items()})
        for name, rows in sizes.items():
            value = state_dict.get(f"{prefix}tables.{name}.weight")
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] != rows:
                changed.append(
                    f"feature {name!r}: the checkpoint's table has {value.shape[0]} rows, the model's {rows}")
        if changed:
            raise ValueError(f"the checkpoint does not fit the model's embedding tables: {'; '.join(changed)} "
                             f"({VOCABULARY_HINT})")

    def table_weight(self, name: str) -> Tensor:
        """The ``(vocab_size, d)`` table feature ``name`` reads (its owner's, with ``shared_with``).

        For a sparse-owned table this is a view of its rows of the fused weight
        (writes under ``torch.no_grad()`` reach the parameter; gradients flow to it).
        """
        weight, block = self._table_parameter(name)
        return weight if block is None else self._block_of(weight, block)

    def table_grad(self, name: str) -> Tensor | None:
        """The gradient of :meth:`table_weight` ``(name)`` as a dense ``(vocab_size, d)`` tensor, or ``None``.

        A sparse gradient is densified (duplicate rows summed) into a new
        tensor; a dense one is returned as a view of the parameter's gradient.
        """
        weight, block = self._table_parameter(name)
        grad = weight.grad
        if grad is None:
            return None
        if grad.is_sparse:
            return grad.to_dense() if block is None else grad.narrow_copy(0, block.offset, block.vocab_size).to_dense()
        return grad if block is None else self._block_of(grad, block)

    def _column(self, x: Mapping[str, Tensor], name: str) -> Tensor:
        try:
            return x[name]
        except KeyError:
            raise ValueError(f"the batch has no feature {name!r}; it has {sorted(x)}") from None

    @staticmethod
    def _check_ids(ids: Tensor, vocab: Tensor | int, names: Sequence[str]) -> None:
        """Ids ``(B, n)`` (or ``(B, L)`` for one feature) must lie in ``[0, vocab)`` (per column)."""
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
            return
        bad = (ids < 0) | (ids >= vocab)
        if ids.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), f"FeatureEmbedding: an id of {list(names)} is outside [0, vocab_size)")
            return
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            # a (B, n) group has one name and one vocabulary per column; a (B, L) sequence has one of each
            name, limit = (names[column], int(vocab[column])) if isinstance(vocab, Tensor) else (names[0], vocab)
            raise ValueError(
                f"feature {name!r} has id {int(ids[row, column])}, outside [0, {limit}) of its embedding table"
            )

    def _lookup(self, x: Mapping[str, Tensor], key: str) -> Tensor:
        """The embeddings of every sparse feature reading ``fused[key]``: one lookup, ``(B, n, d)``."""
        names = self._groups[key]
        ids = torch.stack([self._column(x, n) for n in names], dim=1)  # (B, n)
        self._check_ids(ids, getattr(self, f"_vocab_{key}"), names)
        holder = self.fused[key]
        rows = ids + getattr(self, f"_offsets_{key}")  # (B, n)
        if holder.sparse:
            return F.embedding(rows, holder.weight, sparse=True)  # (B, n, d)
        # the same rows; index_select's backward is one index_add_ into the zero gradient, where embedding's
        # dense backward sorts the B*n ids first (CPU, more than 3000 ids): measured 2.1 ms -> 0.8 ms at B=2048, n=16
        return holder.weight.index_select(0, rows.reshape(-1)).view(*rows.shape, holder.embedding_dim)  # (B, n, d)

    def _embed(self, f: Feature, value: Tensor) -> Tensor:
        """A feature outside the grouped lookups: dense values, a pooled sequence, a sparse id into a sequence table."""
        if isinstance(f, DenseFeature):
            value = value.float()
            return value.unsqueeze(-1) if value.dim() == 1 else value
        owner = self._table_of[f.name]
        if isinstance(f, SparseFeature):
            return self.tables[owner](value)  # (B, d); a sequence-owned table, id 0 is its padding
        if owner in self._blocks:  # a sparse feature's block of a fused weight
            block = self._blocks[owner]
            self._check_ids(value, block.vocab_size, [f.name])
            holder, ids, padding = self.fused[block.key], value + block.offset, block.offset
        else:
            holder, ids, padding = self.tables[owner], value, 0
        if (f.pooling == "max" and holder.sparse) or torch.onnx.is_in_onnx_export():
            # embedding_bag has no sparse gradient for max, and ONNX has no embedding_bag with padding
            emb = F.embedding(ids, holder.weight, padding_idx=padding, sparse=holder.sparse)  # (B, L, d)
            mask = (value != 0).unsqueeze(-1)  # (B, L, 1)
            if f.pooling == "max":
                pooled = emb.masked_fill(~mask, float("-inf")).amax(dim=1)
                return torch.where(mask.any(dim=1), pooled, torch.zeros_like(pooled))
            summed = (emb * mask).sum(dim=1)  # (B, d)
            return summed if f.pooling == "sum" else summed / mask.sum(dim=1).clamp(min=1)
        # id 0 is left out of the bag (and gets no gradient from it); an empty bag pools to zeros
        return F.embedding_bag(ids, holder.weight, mode=f.pooling, padding_idx=padding, sparse=holder.sparse)  # (B, d)

    def _parts(self, x: Mapping[str, Tensor]) -> list[tuple[Feature | None, Tensor]]:
        """Spec-ordered pieces: ``(None, (B, k, d))`` for a run of grouped sparse features, ``(f, (B, width))`` else."""
        looked_up = {key: self._lookup(x, key) for key in self._groups}
        return [
            (None, looked_up[item.key][:, item.start : item.stop]) if isinstance(item, _Run)
            else (item, self._embed(item, self._column(x, item.name)))
            for item in self._layout
        ]

    def forward(self, x: Mapping[str, Tensor], view: str = "flat") -> Tensor:
        if self.table_seed is not None and self.deferred:
            raise RuntimeError(
                "this FeatureEmbedding's tables are deferred (built inside deferred_tables(), e.g. `with "
                "trainer.init_module():` under TorchRecStrategy) and hold no values yet: train it under that "
                "TorchRecStrategy, which allocates each process's shards, or call materialize_tables() first")
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


def grown_rows(layer: FeatureEmbedding, sources: Mapping[str, tuple[int, Tensor]]) -> dict[str, tuple[Tensor, int]]:
    """How the table weights of ``layer`` take the rows of a checkpoint written before some vocabularies grew.

    ``sources`` maps a table-owning feature whose vocabulary grew to
    ``(rows before, index)``: ``index[j]`` is the row of that feature's old
    table that its row ``j`` takes, or ``-1`` for a new row (``index`` has the
    feature's current ``vocab_size`` entries). Returns, for every weight of the
    layer holding such a table (its ``state_dict`` key relative to the layer),
    ``(rows, checkpoint rows)``: ``rows[r]`` is the row of the checkpoint's
    weight that row ``r`` of the layer's weight takes, or ``-1``; blocks of the
    features that did not grow keep their rows. Incremental training
    (``MultiTaskLightningModule`` on loading a checkpoint) copies the old rows
    there and leaves the ``-1`` rows as the layer initialised them.
    """
    blocks: dict[str, list[tuple[int, str, int]]] = {}
    for owner, (key, first, rows) in layer.table_layout().items():
        blocks.setdefault(key, []).append((first, owner, rows))
    grown: dict[str, tuple[Tensor, int]] = {}
    for key, parts in blocks.items():
        if not any(owner in sources for _, owner, _ in parts):
            continue
        pieces, old_first = [], 0
        for _, owner, rows in sorted(parts):
            if owner in sources:
                before, index = sources[owner]
                index = torch.as_tensor(index, dtype=torch.long)
                if len(index) != rows or int(index.max()) >= before:
                    raise ValueError(f"feature {owner!r}: its table has {rows} rows, but the vocabulary growth gives "
                                     f"{len(index)} rows taken from a table of {before}")
                pieces.append(torch.where(index >= 0, index + old_first, -1))
                old_first += before
            else:
                pieces.append(torch.arange(old_first, old_first + rows))
                old_first += rows
        grown[key] = (torch.cat(pieces), old_first)
    return grown
