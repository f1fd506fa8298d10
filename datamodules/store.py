"""The column store: checked rows of a split (or of a streamed chunk) as a few row-major blocks.

Each split is read row group by row group with pyarrow, checked, and written
into a ``ColumnStore``: a few row-major blocks, one per dtype (ids as int32,
row ids and integer keys as int64, dense values and labels as float32), allocated
once from the files' footers. A batch is built by indexing every block with a
slice of a row permutation (``index_select``), so a batch costs one gather per
block, whatever the number of columns. Batches are
``{"features": {name: Tensor}, "labels": {task: Tensor}, "row_id": Tensor}`` (``mtl_lightning.batch.Batch``)
with int64 ids.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from mtl_lightning.batch import Batch
from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature
from mtl_lightning.tasks import Task

from .columns import (
    _column, _dense_array, _key_dtype, _label_array, _sequence_array, _sparse_array, _weight_array, check_implied_labels,
    check_missing_values, key_array,
)
from .encoders import CategoricalEncoder, DenseNormalizer, MissingFiller, encode_table, fill_table
from .files import ParquetReader, open_file
from .paths import DataFile, as_data_file


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
    page. Faulting them in one by one is slow on virtual machines, one populated
    mapping is not (measured: docs/performance.md, "What makes it fast"). Small
    blocks and other systems use ``np.zeros``.
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

    @property
    def device(self) -> torch.device:
        """Where the blocks are (the host, unless ``datamodules.placement`` copied them to the training device)."""
        return next(iter(self.blocks.values())).device if self.blocks else torch.device("cpu")

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

    def batch(self, index: Tensor | slice) -> Batch:
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
        ignore_label: float | None = -1,
        fillers: Mapping[str, MissingFiller] | None = None,
        sample_weights: bool = True,
    ) -> None:
        self.features = list(features)
        self.sample_weights = sample_weights  # read the tasks' sample weight columns (not in a predict split)
        self.fillers = dict(fillers or {})
        self._indicators = {f.indicator_name for f in self.fillers.values() if f.indicator}
        self.ignore_label = ignore_label
        self.implied_labels = dict(implied_labels or {})
        self.tasks = list(tasks)
        self.row_id = row_id
        self.keys = list(keys)
        self.encoders = dict(encoders or {})
        self.normalizers = dict(normalizers or {})

    @property
    def columns(self) -> list[str]:
        names = [f.name for f in self.features if f.name not in self._indicators]  # indicators come from their column
        names += [t.label for t in self.tasks] + self.keys + [t.sample_weight for t in self.weighted_tasks]
        names += [c for pair in self.implied_labels.items() for c in pair]
        return list(dict.fromkeys(names + ([self.row_id] if self.row_id else [])))

    @property
    def weighted_tasks(self) -> list[Task]:
        """The tasks whose sample weights are read (``Task(sample_weight=...)``; none without ``sample_weights``)."""
        return [t for t in self.tasks if t.sample_weight] if self.sample_weights else []

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
        slots += [Slot("weights", t.name, "float32") for t in self.weighted_tasks]
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
        table = fill_table(table, self.fillers, path)
        if self.implied_labels:  # counted in this table
            check_implied_labels(table, self.implied_labels, path)
        if store is None:
            store, at = ColumnStore(self.slots(table.schema, path), table.num_rows), 0
        rows = slice(at, at + table.num_rows)
        try:
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
        except ValueError:
            # a column refused: if for missing values, name every feature column with missing values at once
            # (scanned only now, so that a table without any costs nothing more)
            check_missing_values(table, self.features, path)
            raise
        for t in self.tasks:
            store.array("labels", t.name)[rows] = _label_array(_column(table, t.label, path, "label"), t, path,
                                                                 self.ignore_label)
        for t in self.weighted_tasks:
            store.array("weights", t.name)[rows] = _weight_array(_column(table, t.sample_weight, path, "sample weight"),
                                                                 t, path)
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



def read_split(
    files: Sequence[DataFile | Path],
    features: Sequence[Feature],
    tasks: Sequence[Task],
    row_id: str | None = None,
    labels_required: bool = True,
    keys: Sequence[str] = (),
    implied_labels: Mapping[str, str] | None = None,
    encoders: Mapping[str, CategoricalEncoder] | None = None,
    normalizers: Mapping[str, DenseNormalizer] | None = None,
    ignore_label: float | None = -1,
    fillers: Mapping[str, MissingFiller] | None = None,
    progress: Any = None,
) -> ColumnStore:
    """Read and check every row group of every file of a split into one ``ColumnStore``.

    The store is allocated once from the files' footers and filled row group by
    row group, so the Arrow data of only one row group is alive at a time.
    ``encoders``/``normalizers`` (fitted) are applied on the way; ``keys`` are
    numeric columns carried through as ``batch["keys"]`` (for prediction
    files). With ``labels_required=False`` (prediction) only the labels every
    file has are read and ``implied_labels`` are not checked. ``ignore_label``
    is the label value that means "no label" (see ``columns._label_array``).
    ``fillers`` fill missing dense values; ``progress(rows)``, if given, is called after each row group.
    """
    files = [as_data_file(file) for file in files]
    parquets: list[ParquetReader] = []
    try:
        for file in files:  # read errors name the file (and column); partition columns are appended
            parquets.append(open_file(file))
        schemas = [parquet.schema for parquet in parquets]
        if not labels_required:
            tasks = [t for t in tasks if all(t.label in schema.names for schema in schemas)]
        for path, parquet in zip(files, parquets):
            if parquet.metadata.num_rows == 0:
                raise ValueError(f"{path}: file is empty (0 rows)")
        convert = TableConverter(features, tasks, row_id, keys, encoders, normalizers,
                                 implied_labels if labels_required else None, ignore_label=ignore_label,
                                 fillers=fillers, sample_weights=labels_required)
        store = ColumnStore(convert.slots(schemas[0], files[0].path), sum(p.metadata.num_rows for p in parquets))
        at = 0
        for path, parquet, schema in zip(files, parquets, schemas):
            present = [c for c in convert.columns if c in schema.names]  # a missing column is reported by convert
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, present)
                if table.num_rows:
                    convert(table, parquet.path, at, store=store, at=at)
                    at += table.num_rows
                if progress is not None:
                    progress(table.num_rows)
    finally:
        for parquet in parquets:
            parquet.close()
    return store

