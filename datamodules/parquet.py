"""``ParquetDataModule``: Parquet files to whole multi-task batches, with no per-row Python.

Each split is read row group by row group with pyarrow, checked, and written
into a ``ColumnStore``: a few row-major blocks, one per dtype (ids as int32,
row ids and integer keys as int64, dense values and labels as float32), allocated
once from the files' footers. A batch is built by indexing every block with a
slice of a row permutation (``index_select``), so a batch costs one gather per
block, whatever the number of columns. Batches are
``{"features": {name: Tensor}, "labels": {task: Tensor}, "row_id": Tensor}``
with int64 ids.

Order and sharding (``ParquetBatches``):

* train: every epoch a new permutation of all rows, seeded by ``seed + epoch``
  (the same on every rank), so resuming at epoch ``e`` reproduces epoch ``e``'s
  order; val/test/predict keep file order.
* under DDP (``torch.distributed`` initialised) rank ``r`` of ``W`` takes the
  ``r``-th contiguous block of the (permuted) row order. Evaluation and
  prediction splits are cut into blocks whose sizes differ by at most one row:
  every row exactly once. For training every rank must run the same number of
  steps, so when ``N`` is not a multiple of ``W`` the order is padded with its
  first ``W*ceil(N/W) - N`` rows (fewer than ``W`` rows seen twice in that
  epoch, different ones every epoch, as ``DistributedSampler`` does).
* with ``num_workers > 0`` each worker yields every ``num_workers``-th batch
  of its rank's block, so the batches are the same as with no workers.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import math
import mmap
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtl_lightning.features import (
    DenseFeature, Feature, SequenceFeature, SparseFeature, feature_from_config, feature_to_config,
)
from mtl_lightning.tasks import Task, check_tasks

from .encoders import (
    CategoricalEncoder, DenseNormalizer, encode_table, encoder_from_state, fit_preprocessing, make_encoder,
)

# Each worker yields exactly its share of len() batches (see ParquetBatches.__iter__),
# so Lightning's generic warning about IterableDataset lengths does not apply.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has .__len__. defined.*")

PathSpec = str | Path | Sequence[str | Path]
SPLITS = ("train", "val", "test", "predict")


# --------------------------------------------------------------------------- paths
def resolve_paths(spec: PathSpec) -> list[Path]:
    """Files from a file, a folder (every ``*.parquet`` below it, sorted), a glob, or a list of those."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise ValueError(f"{path}: folder holds no .parquet file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(p) for p in globlib.glob(str(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"{item}: no such file, folder or matching glob")
            files.extend(matches)
    return files


# ------------------------------------------------------------------ column checks
def _column(table: pa.Table, name: str, path: Path, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValueError(f"{path}: missing {what} column {name!r} (columns: {table.column_names})")
    return table.column(name)


def _list_values(column: pa.ChunkedArray) -> pa.Array:
    return pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else pa.array([], pa.int64())


def _check_ids(values: pa.Array | pa.ChunkedArray, vocab_size: int, path: Path, name: str) -> None:
    if len(values) == 0:
        return
    bounds = pc.min_max(values)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low is not None and low < 0:
        raise ValueError(f"{path}: column {name!r} has a negative id ({low}); ids must be in [0, {vocab_size})")
    if high is not None and high >= vocab_size:
        raise ValueError(f"{path}: column {name!r} has id {high} >= vocab_size {vocab_size}; ids must be in [0, {vocab_size})")


def _sparse_array(column: pa.ChunkedArray, feature: SparseFeature, path: Path) -> np.ndarray:
    if not pa.types.is_integer(column.type):
        raise ValueError(
            f"{path}: column {feature.name!r} is a SparseFeature but has type {column.type}; "
            "it must hold integer ids (encode raw categories first)"
        )
    if column.null_count:
        raise ValueError(f"{path}: column {feature.name!r} has {column.null_count} null ids")
    _check_ids(column, feature.vocab_size, path, feature.name)
    return column.to_numpy().astype(np.int64, copy=False)


def _dense_array(column: pa.ChunkedArray, feature: DenseFeature, path: Path) -> np.ndarray:
    ctype = column.type
    if feature.dim == 1:
        if not (pa.types.is_floating(ctype) or pa.types.is_integer(ctype)):
            raise ValueError(f"{path}: column {feature.name!r} is a DenseFeature but has type {ctype}; it must be numeric")
        if column.null_count:
            raise ValueError(f"{path}: column {feature.name!r} has {column.null_count} null values")
        values = column.to_numpy().astype(np.float32, copy=False)
    else:
        if not (pa.types.is_list(ctype) or pa.types.is_fixed_size_list(ctype) or pa.types.is_large_list(ctype)):
            raise ValueError(f"{path}: column {feature.name!r} is a DenseFeature of dim {feature.dim} but has type {ctype}; "
                             f"it must be a list of {feature.dim} numbers")
        flat = _list_values(column)
        if len(flat) != len(column) * feature.dim or column.null_count:
            raise ValueError(f"{path}: column {feature.name!r}: every row must hold exactly {feature.dim} values")
        values = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), feature.dim)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum())
        raise ValueError(f"{path}: column {feature.name!r} has NaN or infinite values in {bad} rows")
    return values


def _sequence_array(
    column: pa.ChunkedArray, feature: SequenceFeature, path: Path, out: np.ndarray | None = None
) -> np.ndarray:
    ctype = column.type
    if not (pa.types.is_list(ctype) or pa.types.is_large_list(ctype) or pa.types.is_fixed_size_list(ctype)) or not (
        pa.types.is_integer(ctype.value_type)
    ):
        raise ValueError(f"{path}: column {feature.name!r} is a SequenceFeature but has type {ctype}; it must be list<int>")
    if column.null_count:
        raise ValueError(f"{path}: column {feature.name!r} has {column.null_count} null lists (use an empty list)")
    values = pc.list_flatten(column)
    if values.null_count:
        raise ValueError(f"{path}: column {feature.name!r} has null ids inside lists")
    _check_ids(values, feature.vocab_size, path, feature.name)
    return pad_lists(column, feature.max_len, out)


def pad_lists(column: pa.Array | pa.ChunkedArray, max_len: int, out: np.ndarray | None = None) -> np.ndarray:
    """Ragged ``list<int>`` -> ``(N, max_len)`` int64, right-padded with 0; longer lists keep their first ``max_len`` ids.

    Vectorised over the list offsets, chunk by chunk, with no per-row Python:
    the kept ids, in order, fill the cells ``position < length`` of the
    ``(rows, max_len)`` block in row-major order, so one boolean-mask
    assignment places them all (lists that all hold exactly ``max_len`` ids
    are one reshape). ``out``, if given, is a zero-filled ``(N, max_len)``
    array (a strided view is fine, e.g. columns of a ``ColumnStore`` block)
    written in place; padding is not written. The column must have no null
    lists (``_sequence_array`` checks that).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if out is None:
        out = np.zeros((len(column), max_len), dtype=np.int64)
    elif out.shape != (len(column), max_len):
        raise ValueError(f"pad_lists: out has shape {out.shape}, expected {(len(column), max_len)}")
    row = 0
    for chunk in chunks:
        rows = len(chunk)
        if rows == 0:
            continue
        block = out[row : row + rows]
        row += rows
        if pa.types.is_fixed_size_list(chunk.type):
            width = min(chunk.type.list_size, max_len)
            values = chunk.flatten().to_numpy(zero_copy_only=False).reshape(rows, chunk.type.list_size)
            block[:, :width] = values[:, :width]
            continue
        offsets = chunk.offsets.to_numpy().astype(np.int64, copy=False)  # absolute positions in chunk.values
        first, last = int(offsets[0]), int(offsets[-1])
        values = chunk.values.slice(first, last - first).to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        if (lengths == max_len).all():
            block[...] = values.reshape(rows, max_len)
            continue
        if lengths.max() > max_len:  # keep the first max_len ids of longer lists
            rows_of = np.repeat(np.arange(rows, dtype=np.int64), lengths)  # value i belongs to list rows_of[i]
            values = values[np.arange(last - first, dtype=np.int64) - (offsets[:-1] - first)[rows_of] < max_len]
        # the kept ids, in row-major order, are exactly the (row, position < length) cells
        block[np.arange(max_len) < np.minimum(lengths, max_len)[:, None]] = values
    return out


def _label_array(column: pa.ChunkedArray, task: Task, path: Path) -> np.ndarray:
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        raise ValueError(f"{path}: label column {task.label!r} of task {task.name!r} has type {column.type}; it must be numeric")
    # a null label is a missing label: it becomes NaN and is left out of the task's loss
    values = column.cast(pa.float32()).fill_null(float("nan"))
    return values.to_numpy().astype(np.float32, copy=False)


def key_array(column: pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    """A key column carried to prediction files: integers stay int64, floats become float64."""
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_floating(column.type):
        return column.to_numpy().astype(np.float64, copy=False)
    raise ValueError(
        f"{path}: key column {name!r} has type {column.type}; keys must be numeric "
        "(join string keys afterwards on row_id, the row's position in the split)"
    )


def check_implied_labels(table: pa.Table, implied_labels: Mapping[str, str], path: Path) -> None:
    """Reject rows where a label column is positive (> 0) but the label column it implies is 0.

    ``implied_labels`` maps a label column to the one it implies, e.g.
    ``{"purchase": "click", "conversion": "click"}``: a purchase (or a
    conversion) on a row that was not clicked is a data error. Null and NaN
    values are missing labels and never count as a violation.
    """
    for label, implied in implied_labels.items():
        positive = pc.fill_null(pc.greater(_column(table, label, path, "label").cast(pa.float64()), 0.0), False)
        absent = pc.fill_null(pc.equal(_column(table, implied, path, "label").cast(pa.float64()), 0.0), False)
        bad = pc.sum(pc.and_(positive, absent).cast(pa.int64())).as_py() or 0
        if bad:
            raise ValueError(
                f"{path}: {bad} rows have {label!r} > 0 where {implied!r} is 0, but {label!r} implies {implied!r} "
                f"(e.g. a purchase without a click); fix the labels or drop those rows"
            )


# ------------------------------------------------------------------ inference
def infer_features(
    files: Sequence[Path], exclude: set[str], embedding_dim: int = 16, stat_files: Sequence[Path] | None = None
) -> list[Feature]:
    """Feature specs from the schema of ``files[0]`` and a min/max pass over ``stat_files``.

    Integer columns become ``SparseFeature`` (vocab = max id + 1), float columns
    ``DenseFeature``, list<int> columns ``SequenceFeature`` (vocab = max id + 1,
    max_len = longest list), fixed-size float lists ``DenseFeature(dim=size)``.
    Columns in ``exclude`` (labels, row id) are skipped; any other type is an error.
    """
    schema = pq.read_schema(files[0])
    features: list[Feature] = []
    stat_files = list(stat_files or files)
    for field in schema:
        name, ftype = field.name, field.type
        if name in exclude:
            continue
        is_list = pa.types.is_list(ftype) or pa.types.is_large_list(ftype) or pa.types.is_fixed_size_list(ftype)
        if pa.types.is_integer(ftype) or (is_list and pa.types.is_integer(ftype.value_type)):
            high, longest = 0, 0
            for path in stat_files:
                column = pq.read_table(path, columns=[name]).column(name)
                values = _list_values(column) if is_list else column
                if len(values):
                    high = max(high, pc.max(values).as_py() or 0)
                if is_list:
                    longest = max(longest, pc.max(pc.list_value_length(column)).as_py() or 0)
            if is_list:
                features.append(SequenceFeature(name, vocab_size=max(high + 1, 2), max_len=max(longest, 1),
                                                embedding_dim=embedding_dim))
            else:
                features.append(SparseFeature(name, vocab_size=high + 1, embedding_dim=embedding_dim))
        elif pa.types.is_floating(ftype):
            features.append(DenseFeature(name))
        elif pa.types.is_fixed_size_list(ftype) and pa.types.is_floating(ftype.value_type):
            features.append(DenseFeature(name, dim=ftype.list_size))
        else:
            raise ValueError(
                f"{files[0]}: cannot infer a feature spec for column {name!r} of type {ftype}; "
                "pass features=..., list it in categorical=... (raw categories) or exclude=..."
            )
    return features


# --------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class Slot:
    """One column of a ``ColumnStore``: its place in a batch, its dtype and the shape of one row's value."""

    section: str  # "features", "labels", "keys" or "row_id"
    name: str
    dtype: str  # the storage dtype, a numpy name: "int32", "int64", "float32" or "float64"
    shape: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return math.prod(self.shape)


def _zeros(rows: int, width: int, dtype: str) -> np.ndarray:
    """A zero-filled ``(rows, width)`` block, its pages mapped up front where Linux allows (``MAP_POPULATE``).

    The reader fills a block column by column, so its first pass touches every
    page. Faulting them in one by one is slow on virtual machines (measured on
    the 2-core development VM: 0.1-0.4 s per 160 MB); one populated mapping
    takes about 0.05 s. Small blocks and other systems use ``np.zeros``.
    """
    nbytes = rows * width * np.dtype(dtype).itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or nbytes < 1 << 24:
        return np.zeros((rows, width), dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(mapping, dtype=dtype).reshape(rows, width)  # the array keeps the mapping alive


class ColumnStore:
    """Rows (a split, or a streamed chunk) as a few row-major blocks, one per storage dtype.

    Every column of one dtype sits side by side in one ``(N, K)`` matrix:
    sparse ids and padded sequences in an int32 block (an id is below its
    ``vocab_size``; a feature with ``vocab_size > 2**31 - 1`` is stored as
    int64), row ids and integer keys in an int64 block, dense features and
    labels in a float32 block, float keys in a float64 block. Columns of one
    value per row come first in a block, wider ones (sequences, dense vectors)
    after them. A batch is one ``index_select`` per block (four gathers at
    most, not one per column); then the one-value columns come out of one
    transposed copy as contiguous ``(B,)`` tensors and each wider column as a
    contiguous ``(B, *shape)`` copy, so a batch never holds a view of the
    store. Ids come out as int64 (the batch contract), whatever their storage.
    ``features``, ``labels``, ``keys`` and ``row_id`` return the whole store in
    that batch form (a copy); ``column``/``array`` give views of the storage.
    """

    def __init__(self, slots: Sequence[Slot], num_rows: int, blocks: Mapping[str, Tensor] | None = None) -> None:
        self.slots = tuple(slots)
        self.num_rows = int(num_rows)
        self._start: dict[tuple[str, str], int] = {}
        self._layout: list[tuple[str, list[int], list[int], int]] = []  # dtype, narrow slots, wide slots, width
        for dtype in dict.fromkeys(slot.dtype for slot in self.slots):
            mine = [i for i, slot in enumerate(self.slots) if slot.dtype == dtype]
            narrow = [i for i in mine if self.slots[i].shape == ()]
            wide = [i for i in mine if self.slots[i].shape != ()]
            width = 0
            for i in narrow + wide:
                self._start[(self.slots[i].section, self.slots[i].name)] = width
                width += self.slots[i].width
            self._layout.append((dtype, narrow, wide, width))
        if blocks is None:
            blocks = {dtype: torch.from_numpy(_zeros(self.num_rows, width, dtype)) for dtype, _, _, width in self._layout}
        self.blocks = dict(blocks)

    def _slot(self, section: str, name: str) -> Slot:
        for slot in self.slots:
            if slot.section == section and slot.name == name:
                return slot
        raise KeyError(f"the store has no {section} column {name!r}")

    def column(self, section: str, name: str) -> Tensor:
        """A view of one column: ``(N,)`` or ``(N, *shape)``."""
        slot = self._slot(section, name)
        start = self._start[(section, name)]
        block = self.blocks[slot.dtype]
        if slot.shape == ():
            return block[:, start]
        return block[:, start : start + slot.width].unflatten(1, slot.shape)

    def array(self, section: str, name: str) -> np.ndarray:
        """A writable numpy view of one column (what the reader fills)."""
        return self.column(section, name).numpy()

    def _section(self, section: str) -> dict[str, Tensor]:
        return self.batch(slice(None)).get(section, {})

    @property
    def features(self) -> dict[str, Tensor]:
        return self._section("features")

    @property
    def labels(self) -> dict[str, Tensor]:
        return self._section("labels")

    @property
    def keys(self) -> dict[str, Tensor]:
        return self._section("keys")

    @property
    def row_id(self) -> Tensor:
        return self.batch(slice(None))["row_id"]

    def _rows(self, index: Tensor | slice) -> dict[str, Tensor]:
        return {dtype: (block[index] if isinstance(index, slice) else block.index_select(0, index))
                for dtype, block in self.blocks.items()}

    def take(self, index: Tensor) -> "ColumnStore":
        """The rows at ``index`` (a tensor of positions) as a new store (gathered, so copied)."""
        return ColumnStore(self.slots, len(index), self._rows(index))

    @staticmethod
    def concat(stores: Sequence["ColumnStore"]) -> "ColumnStore":
        """The rows of ``stores`` (same slots) one after another."""
        if len(stores) == 1:
            return stores[0]
        for other in stores[1:]:
            if other.slots != stores[0].slots:
                changed = sorted(set(other.slots) ^ set(stores[0].slots), key=str)
                raise ValueError(f"cannot join rows whose columns differ: {changed} (a key column must have one "
                                 "type, integer or float, in every file)")
        blocks = {dtype: torch.cat([s.blocks[dtype] for s in stores]) for dtype in stores[0].blocks}
        return ColumnStore(stores[0].slots, sum(s.num_rows for s in stores), blocks)

    def batch(self, index: Tensor | slice) -> dict[str, Any]:
        """``{"features", "labels", "row_id"[, "keys"]}`` of the rows at ``index``, as compact tensors."""
        values: list[Tensor | None] = [None] * len(self.slots)
        rows = self._rows(index)
        for dtype, narrow, wide, _ in self._layout:
            block = rows[dtype]
            out = torch.int64 if dtype == "int32" else None  # ids leave as int64
            if narrow:
                columns = block[:, : len(narrow)].t()  # (K, B): each row one column
                columns = columns.to(out) if out is not None else columns.contiguous()
                for i, column in zip(narrow, columns):
                    values[i] = column
            for i in wide:
                slot = self.slots[i]
                start = self._start[(slot.section, slot.name)]
                value = block[:, start : start + slot.width]
                value = value.to(out) if out is not None else value.contiguous()
                values[i] = value.unflatten(1, slot.shape)
        batch: dict[str, Any] = {"features": {}, "labels": {}}
        for slot, value in zip(self.slots, values):
            if slot.section == "row_id":
                batch["row_id"] = value
            else:
                batch.setdefault(slot.section, {})[slot.name] = value
        return batch


class TableConverter:
    """Checks Arrow tables and writes them into a ``ColumnStore`` (encoders and normalisation applied).

    Used by the in-memory reader (``read_split``: every row group of every file
    into one preallocated store) and by streaming (one store per chunk).
    """

    def __init__(
        self,
        features: Sequence[Feature],
        tasks: Sequence[Task],
        row_id: str | None = None,
        keys: Sequence[str] = (),
        encoders: Mapping[str, CategoricalEncoder] | None = None,
        normalizers: Mapping[str, DenseNormalizer] | None = None,
        implied_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.features = list(features)
        self.implied_labels = dict(implied_labels or {})
        self.tasks = list(tasks)
        self.row_id = row_id
        self.keys = list(keys)
        self.encoders = dict(encoders or {})
        self.normalizers = dict(normalizers or {})

    @property
    def columns(self) -> list[str]:
        names = [f.name for f in self.features] + [t.label for t in self.tasks] + self.keys
        names += [c for pair in self.implied_labels.items() for c in pair]
        return list(dict.fromkeys(names + ([self.row_id] if self.row_id else [])))

    def slots(self, schema: pa.Schema, path: Path) -> list[Slot]:
        """The store layout: features in spec order, labels, row id, then keys (dtype from ``schema``)."""
        slots: list[Slot] = []
        for f in self.features:
            if isinstance(f, (SparseFeature, SequenceFeature)):
                ids = "int32" if f.vocab_size <= np.iinfo(np.int32).max else "int64"
                slots.append(Slot("features", f.name, ids, (f.max_len,) if isinstance(f, SequenceFeature) else ()))
            else:
                slots.append(Slot("features", f.name, "float32", () if f.dim == 1 else (f.dim,)))
        slots += [Slot("labels", t.name, "float32") for t in self.tasks]
        slots.append(Slot("row_id", "row_id", "int64"))
        for k in self.keys:
            if k not in schema.names:
                raise ValueError(f"{path}: missing key column {k!r} (columns: {schema.names})")
            slots.append(Slot("keys", k, _key_dtype(schema.field(k).type, k, path)))
        return slots

    def __call__(
        self, table: pa.Table, path: Path, first_row: int, store: ColumnStore | None = None, at: int = 0
    ) -> ColumnStore:
        """Check ``table`` and write it to rows ``[at, at + len)`` of ``store`` (a new store if ``None``).

        ``first_row`` is the table's first position in the split (the row ids
        when there is no row id column).
        """
        table = encode_table(table, self.encoders, path)
        if self.implied_labels:  # counted in this table
            check_implied_labels(table, self.implied_labels, path)
        if store is None:
            store, at = ColumnStore(self.slots(table.schema, path), table.num_rows), 0
        rows = slice(at, at + table.num_rows)
        for f in self.features:
            column = _column(table, f.name, path, "feature")
            if isinstance(f, SparseFeature):
                store.array("features", f.name)[rows] = _sparse_array(column, f, path)
            elif isinstance(f, DenseFeature):
                values = _dense_array(column, f, path)
                if f.name in self.normalizers:
                    values = self.normalizers[f.name].apply(values)
                store.array("features", f.name)[rows] = values
            else:
                _sequence_array(column, f, path, out=store.array("features", f.name)[rows])
        for t in self.tasks:
            store.array("labels", t.name)[rows] = _label_array(_column(table, t.label, path, "label"), t, path)
        if self.row_id:
            column = _column(table, self.row_id, path, "row id")
            if not pa.types.is_integer(column.type):
                raise ValueError(f"{path}: row id column {self.row_id!r} has type {column.type}; it must be integer")
            store.array("row_id", "row_id")[rows] = column.to_numpy()
        else:
            store.array("row_id", "row_id")[rows] = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
        for k in self.keys:
            column = _column(table, k, path, "key")
            target = store.array("keys", k)
            if _key_dtype(column.type, k, path) != target.dtype.name:
                raise ValueError(f"{path}: key column {k!r} has type {column.type}, but earlier files hold "
                                 f"{'integers' if target.dtype.kind == 'i' else 'floats'}; give it one type in every file")
            target[rows] = key_array(column, k, path)
        return store


def _key_dtype(arrow_type: pa.DataType, name: str, path: Path) -> str:
    if pa.types.is_integer(arrow_type):
        return "int64"
    if pa.types.is_floating(arrow_type):
        return "float64"
    raise ValueError(
        f"{path}: key column {name!r} has type {arrow_type}; keys must be numeric "
        "(join string keys afterwards on row_id, the row's position in the split)"
    )


def read_split(
    files: Sequence[Path],
    features: Sequence[Feature],
    tasks: Sequence[Task],
    row_id: str | None = None,
    labels_required: bool = True,
    keys: Sequence[str] = (),
    implied_labels: Mapping[str, str] | None = None,
    encoders: Mapping[str, CategoricalEncoder] | None = None,
    normalizers: Mapping[str, DenseNormalizer] | None = None,
) -> ColumnStore:
    """Read and check every row group of every file of a split into one ``ColumnStore``.

    The store is allocated once from the files' footers and filled row group by
    row group, so the Arrow data of only one row group is alive at a time.
    ``encoders``/``normalizers`` (fitted) are applied on the way; ``keys`` are
    numeric columns carried through as ``batch["keys"]`` (for prediction
    files). With ``labels_required=False`` (prediction) only the labels every
    file has are read and ``implied_labels`` are not checked.
    """
    files = [Path(path) for path in files]
    parquets = [pq.ParquetFile(path) for path in files]
    try:
        schemas = [parquet.schema_arrow for parquet in parquets]
        if not labels_required:
            tasks = [t for t in tasks if all(t.label in schema.names for schema in schemas)]
        for path, parquet in zip(files, parquets):
            if parquet.metadata.num_rows == 0:
                raise ValueError(f"{path}: file is empty (0 rows)")
        convert = TableConverter(features, tasks, row_id, keys, encoders, normalizers,
                                 implied_labels if labels_required else None)
        store = ColumnStore(convert.slots(schemas[0], files[0]), sum(p.metadata.num_rows for p in parquets))
        at = 0
        for path, parquet, schema in zip(files, parquets, schemas):
            present = [c for c in convert.columns if c in schema.names]  # a missing column is reported by convert
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=present)
                if table.num_rows:
                    convert(table, path, at, store=store, at=at)
                    at += table.num_rows
    finally:
        for parquet in parquets:
            parquet.close()
    return store


# -------------------------------------------------------------------- batching
def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ParquetBatches(IterableDataset):
    """Yields whole batches of one split for one rank (and worker); see the module docstring."""

    def __init__(
        self,
        store: ColumnStore,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pad_to_equal: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store = store
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad_to_equal = pad_to_equal
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        rank, world = _distributed()
        return (self.rank if self.rank is not None else rank, self.world_size if self.world_size is not None else world)

    def shard_bounds(self) -> tuple[int, int, int]:
        """``(start, stop, padded_total)`` of this rank's block in the (possibly padded) row order."""
        rank, world = self._rank_world()
        n = self.store.num_rows
        if self.pad_to_equal:
            per = math.ceil(n / world)
            return rank * per, (rank + 1) * per, per * world
        return rank * n // world, (rank + 1) * n // world, n

    def _num_batches(self) -> int:
        start, stop, _ = self.shard_bounds()
        size = stop - start
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def __len__(self) -> int:
        return self._num_batches()

    def order(self) -> Tensor | None:
        """This epoch's row order (``None`` means file order, served as zero-copy slices)."""
        start, stop, total = self.shard_bounds()
        n = self.store.num_rows
        if not self.shuffle and total == n:
            return None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if total > n:
            order = torch.cat([order, order[: total - n]])
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, stop, _ = self.shard_bounds()
        order = self.order()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, self._num_batches(), workers):
            lo = start + i * self.batch_size
            hi = min(lo + self.batch_size, stop)
            yield self.store.batch(slice(lo, hi) if order is None else order[lo:hi])


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` that tells its ``ParquetBatches`` the current epoch before each pass."""

    def __init__(self, dataset: ParquetBatches, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0

    def __iter__(self):  # type: ignore[override]
        self.dataset.set_epoch(self.epoch_fn() if self.epoch_fn is not None else self._passes)
        self._passes += 1
        return super().__iter__()


# ----------------------------------------------------------------- data module
class ParquetDataModule(L.LightningDataModule):
    """Parquet splits to multi-task batches.

    Args:
        train, val, test, predict: a file, a folder, a glob, or a list of them.
        tasks: the tasks; each task's label is read from column ``Task.label``
            (labels are optional in the predict split).
        features: feature specs; ``None`` infers them (``infer_features``) from
            the train split's schema and a statistics pass over every split.
        batch_size: rows per batch.
        shuffle: reshuffle the train split every epoch.
        num_workers: DataLoader worker processes.
        seed: base seed of the train order (epoch ``e`` uses ``seed + e``).
        row_id: an integer column carried through as ``batch["row_id"]``; by
            default the row's position in its split.
        embedding_dim: embedding size of inferred sparse and sequence features.
        exclude: columns that are neither features nor labels of these tasks
            (other labels, keys, truth columns); only used when inferring features.
        drop_last: drop the last incomplete train batch.
        pin_memory: pin batches in page-locked memory (for GPU training).
        streaming: read every split incrementally (row group by row group)
            through a shuffle buffer instead of loading it; see
            ``datamodules.streaming`` for the order, sharding and memory bound.
        shuffle_buffer: rows held by each worker's shuffle buffer (streaming).
        read_rows: rows read from Parquet at a time (streaming and fitting).
        categorical: raw categorical columns (strings or integers) to encode,
            as a list of column names (vocabulary, ``min_freq=1``) or a mapping
            ``{column: {"min_freq": 2, "max_size": None}}`` (vocabulary with an
            out-of-vocabulary id 0) or ``{column: {"num_buckets": 1000}}``
            (hashing); ``"embedding_dim"`` may be added to either. Fitted on the
            train split; each column becomes a ``SparseFeature`` whose
            ``vocab_size`` is the encoder's number of ids (a ``SparseFeature``
            given in ``features`` for the column keeps its other fields).
        normalize: ``True`` standardises every dense feature, a list of names
            only those, with mean and standard deviation from the train split.
        keys: numeric columns carried as ``batch["keys"]`` (written next to the
            predictions by ``ParquetPredictionWriter``).
        group: an integer column (e.g. ``user_id``, which may also be a
            feature) put in every batch the Trainer sees as ``batch["group"]``;
            the training module then logs group AUC (``val/<task>/gauc``).
        implied_labels: label columns that imply another label column, e.g.
            ``{"purchase": "click", "conversion": "click"}``; a file with a
            positive label on a row where the implied label is 0 is rejected
            (the error names the file and the number of rows; when streaming,
            the rows of the chunk being read). Checked in every labelled split.

    The fitted encoders and statistics (and the resolved feature specs) are the
    data module's ``state_dict``, saved in every Lightning checkpoint and restored
    with ``ckpt_path=`` (they then replace the data module's own), so
    validation, test and prediction use the mapping the model was trained with.
    """

    def __init__(
        self,
        train: PathSpec | None = None,
        val: PathSpec | None = None,
        test: PathSpec | None = None,
        predict: PathSpec | None = None,
        tasks: Sequence[Task | dict] = (),
        features: Sequence[Feature | dict] | None = None,
        batch_size: int = 1024,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        row_id: str | None = None,
        embedding_dim: int = 16,
        exclude: Sequence[str] = (),
        drop_last: bool = False,
        pin_memory: bool = False,
        streaming: bool = False,
        shuffle_buffer: int = 65_536,
        read_rows: int = 65_536,
        categorical: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
        normalize: bool | Sequence[str] = False,
        keys: Sequence[str] = (),
        group: str | None = None,
        implied_labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.paths = {"train": train, "val": val, "test": test, "predict": predict}
        if all(v is None for v in self.paths.values()):
            raise ValueError("ParquetDataModule needs at least one of train, val, test, predict")
        self.tasks = check_tasks(tasks)
        self.features: list[Feature] | None = (
            [feature_from_config(f) for f in features] if features is not None else None
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.row_id = row_id
        self.embedding_dim = embedding_dim
        self.exclude = set(exclude)
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.implied_labels = dict(implied_labels or {})
        self.stores: dict[str, ColumnStore] = {}
        self.streaming = streaming
        if shuffle_buffer < 1 or read_rows < 1:
            raise ValueError(f"shuffle_buffer and read_rows must be >= 1, got {shuffle_buffer} and {read_rows}")
        self.shuffle_buffer = shuffle_buffer
        self.read_rows = read_rows
        if categorical is None:
            categorical = {}
        elif isinstance(categorical, str) or not isinstance(categorical, Mapping):
            categorical = {name: {} for name in ([categorical] if isinstance(categorical, str) else categorical)}
        self.categorical = {name: dict(spec or {}) for name, spec in categorical.items()}
        self.encoders: dict[str, CategoricalEncoder] = {
            name: make_encoder(name, spec) for name, spec in self.categorical.items()
        }
        if not isinstance(normalize, bool) and (isinstance(normalize, str) or not isinstance(normalize, Sequence)):
            raise TypeError(f"normalize must be True/False or a list of dense column names, got {normalize!r}")
        self.normalize = normalize if isinstance(normalize, bool) else list(normalize)
        self.normalizers: dict[str, DenseNormalizer] = {}
        self.keys = list(keys)
        self.group = group

    def files(self, split: str) -> list[Path]:
        spec = self.paths[split]
        return [] if spec is None else resolve_paths(spec)

    def infer(self) -> list[Feature]:
        """Feature specs inferred from the data (the statistics pass covers every given split)."""
        all_files = [p for s in SPLITS for p in self.files(s)]
        first = next(p for s in SPLITS for p in self.files(s))
        exclude = {t.label for t in self.tasks} | ({self.row_id} if self.row_id else set()) | self.exclude
        exclude |= set(self.categorical) | set(self.keys)
        exclude |= {column for pair in self.implied_labels.items() for column in pair}
        return infer_features([first], exclude, self.embedding_dim, stat_files=all_files)

    def prepare_features(self) -> list[Feature]:
        if self.features is None:
            self.features = self.infer()
        if self.encoders or self.normalize:
            self._prepare_preprocessing()
        return self.features

    # ------------------------------------------------------- preprocessing
    def _dense_features(self) -> dict[str, DenseFeature]:
        return {f.name: f for f in self.features or [] if isinstance(f, DenseFeature)}

    def preprocessing_fitted(self) -> bool:
        """Whether every categorical encoder and dense normaliser has its mapping."""
        return all(e.fitted for e in self.encoders.values()) and all(n.fitted for n in self.normalizers.values())

    def _prepare_preprocessing(self) -> None:
        """Create the normalisers, fit what is unfitted on the train split, then give encoded columns their vocab sizes."""
        dense = self._dense_features()
        wanted = list(dense) if self.normalize is True else ([] if self.normalize is False else self.normalize)
        for name in wanted:
            if name not in dense:
                raise ValueError(f"normalize names {name!r}, which is not a dense feature (dense: {sorted(dense)})")
            if name not in self.normalizers:
                self.normalizers[name] = DenseNormalizer(name, dense[name].dim)
        if not self.preprocessing_fitted() and self.paths["train"] is not None:
            fit_preprocessing(
                self.files("train"), self.encoders, self.normalizers,
                lambda column, name, path: _dense_array(column, dense[name], path), read_rows=max(self.read_rows, 65_536),
            )
        if all(e.fitted for e in self.encoders.values()):
            self._resolve_categorical_features()

    def _resolve_categorical_features(self) -> None:
        by_name = {f.name: f for f in self.features or []}
        for name, encoder in self.encoders.items():
            spec = self.categorical.get(name, {})
            given = by_name.get(name)
            if given is not None and not isinstance(given, SparseFeature):
                raise ValueError(
                    f"categorical column {name!r} is given as a {type(given).__name__}; it must be a SparseFeature"
                )
            if given is None:
                by_name[name] = SparseFeature(name, encoder.num_ids, int(spec.get("embedding_dim", self.embedding_dim)))
            elif given.vocab_size != encoder.num_ids:
                by_name[name] = dataclasses.replace(given, vocab_size=encoder.num_ids)
        self.features = list(by_name.values())

    def _require_fitted(self, split: str) -> None:
        if not self.preprocessing_fitted():
            unfitted = [n for n, e in self.encoders.items() if not e.fitted]
            unfitted += [n for n, z in self.normalizers.items() if not z.fitted]
            raise ValueError(
                f"cannot read the {split} split: the encoders/statistics of {unfitted} are not fitted; give train=... "
                "to fit them, or restore them from a checkpoint (trainer.predict/validate/test(..., ckpt_path=...), "
                "or dm.load_state_dict(torch.load(path)['ParquetDataModule']))"
            )

    def state_dict(self) -> dict[str, Any]:
        """Resolved feature specs, fitted encoders and normalisation statistics (plain data, saved in checkpoints)."""
        if not (self.encoders or self.normalizers) or not self.preprocessing_fitted():
            return {}
        return {
            "features": [feature_to_config(f) for f in self.features or []],
            "encoders": {name: e.state_dict() for name, e in self.encoders.items()},
            "normalization": {name: z.state_dict() for name, z in self.normalizers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's features, encoders and statistics; splits read with another mapping are re-read."""
        if not state_dict or state_dict == self.state_dict():
            return
        features = [feature_from_config(dict(f)) for f in state_dict["features"]]
        if self.features is not None and self.preprocessing_fitted() and features != self.features:
            warnings.warn("the checkpoint's feature specs differ from the data module's; using the checkpoint's")
        self.features = features
        self.encoders = {name: encoder_from_state(name, s) for name, s in state_dict["encoders"].items()}
        self.normalizers = {}
        for name, s in state_dict["normalization"].items():
            self.normalizers[name] = DenseNormalizer(name, int(s["dim"]))
            self.normalizers[name].load_state_dict(s)
        self.stores.clear()

    # ---------------------------------------------------------------- group
    def _carried_keys(self) -> list[str]:
        """``keys`` plus the group column (read like a key, moved to ``batch["group"]`` by the hook below)."""
        return self.keys + ([self.group] if self.group and self.group not in self.keys else [])

    def _check_group(self) -> None:
        for split in SPLITS:
            for path in self.files(split):
                schema = pq.read_schema(path)
                if self.group not in schema.names:
                    raise ValueError(f"{path}: missing group column {self.group!r} (columns: {schema.names})")
                if not pa.types.is_integer(schema.field(self.group).type):
                    raise ValueError(f"{path}: group column {self.group!r} has type {schema.field(self.group).type}; "
                                     "it must hold integer ids (e.g. user ids)")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.group and isinstance(batch, dict) and "keys" in batch:
            keys = batch["keys"]
            batch["group"] = keys[self.group] if self.group in self.keys else keys.pop(self.group)
            if not keys:
                del batch["keys"]
        return batch

    def setup(self, stage: str | None = None) -> None:
        self.prepare_features()
        if self.group:
            self._check_group()
        if not self.preprocessing_fitted() or self.streaming:
            # streams are opened by dataset(); unfitted encoders wait for load_state_dict (a checkpoint)
            return
        wanted = {
            "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",), None: SPLITS
        }[stage]
        for split in wanted:
            if self.paths[split] is not None and split not in self.stores:
                self.stores[split] = read_split(
                    self.files(split), self.features, self.tasks, self.row_id, labels_required=split != "predict",
                    keys=self._carried_keys(), implied_labels=self.implied_labels, encoders=self.encoders,
                    normalizers=self.normalizers,
                )

    def dataset(
        self, split: str, rank: int | None = None, world_size: int | None = None
    ) -> ParquetBatches | ParquetStream:
        """The batch stream of a split (``rank``/``world_size`` default to the DDP process group)."""
        if self.streaming:
            return self._stream(split, rank, world_size)
        if split not in self.stores:
            if self.paths.get(split) is None:
                raise ValueError(f"no {split} data was given to ParquetDataModule")
            self.prepare_features()
            self._require_fitted(split)
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        train = split == "train"
        return ParquetBatches(
            self.stores[split], self.batch_size, shuffle=train and self.shuffle, seed=self.seed,
            drop_last=train and self.drop_last, pad_to_equal=train, rank=rank, world_size=world_size,
        )

    def _stream(self, split: str, rank: int | None, world_size: int | None) -> ParquetStream:
        if self.paths.get(split) is None:
            raise ValueError(f"no {split} data was given to ParquetDataModule")
        self.prepare_features()
        self._require_fitted(split)
        files = self.files(split)
        tasks = list(self.tasks)
        if split == "predict":  # labels are optional in the predict split: use those every file has
            schemas = [set(pq.read_schema(path).names) for path in files]
            tasks = [t for t in tasks if all(t.label in names for names in schemas)]
        process_rank, process_world = _distributed()
        train = split == "train"
        return ParquetStream(
            list_row_groups(files),
            TableConverter(self.features, tasks, self.row_id, self._carried_keys(), self.encoders, self.normalizers,
                           implied_labels=self.implied_labels if split != "predict" else None),
            self.batch_size, shuffle=train and self.shuffle, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            drop_last=train and self.drop_last, pad_to_equal=train,
            rank=process_rank if rank is None else rank,
            world_size=process_world if world_size is None else world_size, read_rows=self.read_rows,
        )

    def _loader(self, split: str) -> DataLoader:
        # Lightning's own sampler epoch: the number of training epochs already run. Unlike
        # ``trainer.current_epoch`` it is right when resuming from a checkpoint written at the
        # end of an epoch (by ModelCheckpoint, before the epoch counts as completed).
        epoch_fn = (lambda: self.trainer.fit_loop.epoch_progress.current.processed) if self.trainer is not None else None
        return EpochDataLoader(
            self.dataset(split), epoch_fn=epoch_fn, num_workers=self.num_workers, pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        # no val split: an empty list tells Lightning to skip validation
        return self._loader("val") if self.paths["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


from .streaming import ParquetStream, list_row_groups  # noqa: E402  (streaming reuses the column store above)
