"""Preprocessing fitted on the training split: raw categorical encoders and dense normalisation.

Raw categorical columns (strings or integers of any range) become int64 ids
that a ``SparseFeature`` can embed:

* ``VocabularyEncoder(min_freq=1, max_size=None)``: the values seen at least
  ``min_freq`` times in the training split get ids ``1 .. n`` (most frequent
  first, ties broken by value, so the mapping is deterministic); everything else
  -- values seen too rarely, values first met in val/test/predict, nulls --
  gets the out-of-vocabulary id ``0``. ``num_ids = n + 1``.
* ``HashingEncoder(num_buckets)``: a value's id is ``1 + h(value) mod
  (num_buckets - 1)`` with ``h`` pandas' stable 64-bit hash (the same in every
  process and run); nulls get id ``0``. Nothing is learnt, so unseen values
  need no special case. ``num_ids = num_buckets``.

Incremental training (``ParquetDataModule(grow_vocabulary=True)``): a
vocabulary restored from a checkpoint grows on the next train split
(``VocabularyEncoder.grow``). Every value keeps its id; a value not in the
vocabulary that the new split holds at least ``min_freq`` times gets a new id
after the existing ones (most frequent first, ties by value). With
``max_size``, the vocabulary never holds more than ``max_size`` values: when
the newcomers do not fit, existing values and newcomers are ranked together by
their count -- cumulative over every split trained on for an existing value
(the vocabulary keeps these counts), the new split's for a newcomer -- with
existing values first on ties, then lower ids / more frequent newcomers; the
top ``max_size`` stay. An existing value that falls out is evicted (it maps
to the out-of-vocabulary id 0 from then on, and its count is forgotten) and its
id is given to an admitted newcomer (the smallest freed id to the most frequent
newcomer), whose embedding row the model then starts afresh. ``grow`` returns,
for each id of the grown vocabulary, the id the same value had before, or -1
for a new value: what the model needs to resize its tables.

``DenseNormalizer`` stores a per-dimension mean and standard deviation of
dense columns computed on the training split and maps ``x -> (x - mean) / std``
(a constant column keeps ``std = 1``).

``MissingFiller`` (``ParquetDataModule(fill_missing={"price": 0.0, "age": "mean"})``)
replaces the missing values (null or NaN) of a dense column by a constant or
by the mean of the values present in the training split, optionally adding a
0/1 feature ``<column>_missing``; a normaliser of that column is fitted on the
values present, and applied after filling.

Fitting is one streaming pass over the training files (``fit_preprocessing``,
row group by row group with pyarrow; vocabularies are counted with
``value_counts`` and merged with a group-by), so it never holds the split in
memory. Every object's ``state_dict()`` is plain Python data; the data module
puts it in its own ``state_dict`` so that checkpoints carry it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .files import open_file
from .paths import DataFile

FIT_READ_ROWS = 65_536
_MERGE_EVERY = 16


def _plain_array(column: pa.Array | pa.ChunkedArray, name: str, where: str) -> pa.Array:
    """A column as one ``int64`` or ``string`` array (dictionary-encoded columns are decoded)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    ctype = column.type
    if pa.types.is_integer(ctype):
        return column.cast(pa.int64())
    if pa.types.is_string(ctype) or pa.types.is_large_string(ctype):
        return column.cast(pa.string())
    raise TypeError(
        f"{where}: categorical column {name!r} has type {ctype}; a raw categorical must hold strings or integers"
    )


class CategoricalEncoder:
    """Maps one raw categorical column to ids in ``[0, num_ids)``; id 0 is out-of-vocabulary / null."""

    kind = ""

    def __init__(self, column: str) -> None:
        self.column = column

    @property
    def fitted(self) -> bool:
        return True

    @property
    def num_ids(self) -> int:
        raise TypeError(f"{type(self).__name__} must define num_ids")

    def partial_fit(self, values: pa.Array, where: str) -> None:
        """Account for one chunk of training values (encoders that learn nothing ignore it)."""

    def finish_fit(self) -> None:
        """Turn what ``partial_fit`` gathered into the mapping."""

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} must define transform")

    def state_dict(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} must define state_dict")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise TypeError(f"{type(self).__name__} must define load_state_dict")


class VocabularyEncoder(CategoricalEncoder):
    """Ids ``1..n`` for values seen ``>= min_freq`` times in training (at most ``max_size``), ``0`` otherwise."""

    kind = "vocabulary"

    def __init__(self, column: str, min_freq: int = 1, max_size: int | None = None) -> None:
        super().__init__(column)
        if int(min_freq) < 1:
            raise ValueError(f"categorical column {column!r}: min_freq must be >= 1, got {min_freq}")
        if max_size is not None and int(max_size) < 1:
            raise ValueError(f"categorical column {column!r}: max_size must be >= 1 or None, got {max_size}")
        self.min_freq = int(min_freq)
        self.max_size = None if max_size is None else int(max_size)
        self.values: pa.Array | None = None  # kept values in id order (id = position + 1)
        self.counts: np.ndarray | None = None  # int64, each value's count over the splits fitted or grown on
        self._counts: list[pa.Table] = []

    @property
    def fitted(self) -> bool:
        return self.values is not None

    @property
    def num_ids(self) -> int:
        if self.values is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet")
        return len(self.values) + 1

    def partial_fit(self, values: pa.Array, where: str) -> None:
        values = _plain_array(values, self.column, where)
        if self._counts and self._counts[0].schema.field("value").type != values.type:
            raise ValueError(
                f"{where}: categorical column {self.column!r} holds {values.type} values, but the training files "
                f"read before it hold {self._counts[0].schema.field('value').type}; give it one type in every file"
            )
        counted = pc.value_counts(values.drop_null())
        self._counts.append(pa.table({"value": counted.field("values"), "count": counted.field("counts")}))
        if len(self._counts) >= _MERGE_EVERY:
            self._counts = [self._merge()]

    def _merge(self) -> pa.Table:
        table = pa.concat_tables(self._counts)
        merged = table.group_by("value").aggregate([("count", "sum")])
        return pa.table({"value": merged["value"], "count": merged["count_sum"]})

    def finish_fit(self) -> None:
        if not self._counts:
            raise ValueError(f"categorical column {self.column!r}: the training split holds no value to fit on")
        merged = self._merge()
        value_type = merged.schema.field("value").type
        kept = merged.filter(pc.greater_equal(merged["count"], self.min_freq))
        kept = kept.sort_by([("count", "descending"), ("value", "ascending")])
        if self.max_size is not None:
            kept = kept.slice(0, self.max_size)
        self.values = kept["value"].combine_chunks() if kept.num_rows else pa.array([], value_type)
        self.counts = kept["count"].to_numpy().astype(np.int64) if kept.num_rows else np.zeros(0, np.int64)
        self._counts = []

    def grow(self) -> np.ndarray:
        """Extend the vocabulary with what ``partial_fit`` counted since (a new train split); see the module docstring.

        Returns ``sources``: for each id ``j`` of the grown vocabulary (``0`` to
        ``num_ids - 1``), the id its value had before, or ``-1`` for a value
        that is new to that id (a newcomer, possibly in an evicted value's id).
        ``sources[0] == 0``: the out-of-vocabulary id stays.
        """
        if self.values is None or self.counts is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet; nothing to grow")
        old = len(self.values)
        counts = self.counts.copy()
        if self._counts:
            merged = self._merge()
            if merged.schema.field("value").type != self.values.type:
                raise TypeError(f"categorical column {self.column!r} holds {merged.schema.field('value').type} "
                                f"values in the new train split but its vocabulary holds {self.values.type}")
            position = pc.index_in(merged["value"], value_set=self.values)
            known = position.is_valid()
            known_np = known.to_numpy(zero_copy_only=False)
            np.add.at(counts, position.to_numpy(zero_copy_only=False)[known_np].astype(np.int64),
                      merged["count"].to_numpy()[known_np])
            new = merged.filter(pc.and_(pc.invert(known), pc.greater_equal(merged["count"], self.min_freq)))
            new = new.sort_by([("count", "descending"), ("value", "ascending")])
        else:
            new = pa.table({"value": pa.array([], self.values.type), "count": pa.array([], pa.int64())})
        self._counts = []
        new_values = new["value"].combine_chunks() if new.num_rows else pa.array([], self.values.type)
        new_counts = new["count"].to_numpy().astype(np.int64) if new.num_rows else np.zeros(0, np.int64)
        if self.max_size is None or old + len(new_values) <= self.max_size:
            ids = np.arange(old + len(new_values))  # position in old values + new values
        else:  # rank every value, existing first on ties, then by id / by the newcomers' order
            pool_counts = np.concatenate([counts, new_counts])
            newcomer = np.concatenate([np.zeros(old, np.int64), np.ones(len(new_values), np.int64)])
            position = np.arange(old + len(new_values))
            kept = np.sort(np.lexsort((position, newcomer, -pool_counts))[: self.max_size])
            stay = kept[kept < old]
            admitted = kept[kept >= old]  # in the newcomers' order (count desc, value asc)
            free = np.setdiff1d(np.arange(old), stay)  # evicted ids, ascending
            slots = np.concatenate([free, np.arange(old, old + max(len(admitted) - len(free), 0))])
            ids = np.arange(max(old, len(stay) + len(admitted)))
            ids[slots[: len(admitted)]] = admitted
        pool = pa.concat_arrays([self.values, new_values]) if len(new_values) else self.values
        self.values = pool.take(pa.array(ids, pa.int64())) if len(ids) else pa.array([], self.values.type)
        self.counts = np.concatenate([counts, new_counts])[ids]
        return np.concatenate([[0], np.where(ids < old, ids + 1, -1)]).astype(np.int64)

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
        if self.values is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet")
        values = _plain_array(values, self.column, where)
        if values.type != self.values.type:
            raise TypeError(
                f"{where}: categorical column {self.column!r} holds {values.type} but its vocabulary was fitted "
                f"on {self.values.type} values"
            )
        position = pc.index_in(values, value_set=self.values)
        return pc.fill_null(pc.add(position.cast(pa.int64()), 1), 0).to_numpy()

    def state_dict(self) -> dict[str, Any]:
        if self.values is None:
            raise ValueError(f"the vocabulary of column {self.column!r} is not fitted yet")
        counts = self.counts if self.counts is not None else np.zeros(len(self.values), np.int64)
        return {
            "kind": self.kind, "min_freq": self.min_freq, "max_size": self.max_size,
            "value_type": str(self.values.type), "values": self.values.to_pylist(), "counts": counts.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value_type = {"string": pa.string(), "int64": pa.int64()}[state["value_type"]]
        self.min_freq, self.max_size = int(state["min_freq"]), state["max_size"]
        self.values = pa.array(state["values"], value_type)
        # a state written before counts were kept: every count 0 (ranked by id when a cap evicts)
        self.counts = np.asarray(state.get("counts") or [0] * len(self.values), dtype=np.int64)


class HashingEncoder(CategoricalEncoder):
    """``1 + hash(value) mod (num_buckets - 1)``; nulls get ``0``. Needs no fitting."""

    kind = "hashing"

    def __init__(self, column: str, num_buckets: int) -> None:
        super().__init__(column)
        if int(num_buckets) < 2:
            raise ValueError(f"categorical column {column!r}: num_buckets must be >= 2 (id 0 is null), got {num_buckets}")
        self.num_buckets = int(num_buckets)

    @property
    def num_ids(self) -> int:
        return self.num_buckets

    def transform(self, values: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
        values = _plain_array(values, self.column, where)
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_integer(values.type):
            raw = values.fill_null(0).to_numpy()
        else:
            raw = values.fill_null("").to_numpy(zero_copy_only=False)
        hashed = pd.util.hash_array(raw, categorize=False)
        ids = (1 + hashed % np.uint64(self.num_buckets - 1)).astype(np.int64)
        return np.where(valid, ids, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_buckets": self.num_buckets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_buckets = int(state["num_buckets"])


def make_encoder(column: str, spec: Mapping[str, Any] | None) -> CategoricalEncoder:
    """An encoder from a user spec: ``{"num_buckets": n}`` hashes, otherwise ``{"min_freq", "max_size"}`` builds a vocabulary.

    ``embedding_dim`` may appear in the spec too (it is read by the data module).
    """
    spec = dict(spec or {})
    spec.pop("embedding_dim", None)
    if "num_buckets" in spec:
        extra = set(spec) - {"num_buckets"}
        if extra:
            raise ValueError(f"categorical column {column!r}: hashing takes only num_buckets, got also {sorted(extra)}")
        return HashingEncoder(column, spec["num_buckets"])
    extra = set(spec) - {"min_freq", "max_size"}
    if extra:
        raise ValueError(
            f"categorical column {column!r}: unknown options {sorted(extra)}; use min_freq/max_size (vocabulary) "
            "or num_buckets (hashing), and embedding_dim"
        )
    return VocabularyEncoder(column, **spec)


def encoder_from_state(column: str, state: Mapping[str, Any]) -> CategoricalEncoder:
    encoder = HashingEncoder(column, state["num_buckets"]) if state["kind"] == "hashing" else VocabularyEncoder(column)
    encoder.load_state_dict(state)
    return encoder


class DenseNormalizer:
    """``(x - mean) / std`` per dimension of one dense column, statistics from the training split."""

    def __init__(self, column: str, dim: int = 1) -> None:
        self.column = column
        self.dim = dim
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self._count = 0
        self._sum = np.zeros(dim, dtype=np.float64)
        self._sum_sq = np.zeros(dim, dtype=np.float64)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def partial_fit(self, values: np.ndarray) -> None:
        values = values.reshape(len(values), -1).astype(np.float64)
        self._count += len(values)
        self._sum += values.sum(axis=0)
        self._sum_sq += np.square(values).sum(axis=0)

    def finish_fit(self) -> None:
        if self._count == 0:
            raise ValueError(f"dense column {self.column!r}: the training split holds no value to normalise with")
        mean = self._sum / self._count
        variance = np.maximum(self._sum_sq / self._count - np.square(mean), 0.0)
        std = np.sqrt(variance)
        self.mean = mean.astype(np.float32)
        self.std = np.where(std > 1e-12, std, 1.0).astype(np.float32)

    def apply(self, values: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise ValueError(f"the normalisation of dense column {self.column!r} is not fitted yet")
        shape = (1,) if values.ndim == 1 else (1, self.dim)
        return ((values - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        if self.mean is None or self.std is None:
            raise ValueError(f"the normalisation of dense column {self.column!r} is not fitted yet")
        return {"dim": self.dim, "mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dim = int(state["dim"])
        self.mean = np.asarray(state["mean"], dtype=np.float32)
        self.std = np.asarray(state["std"], dtype=np.float32)


MISSING_INDICATOR_SUFFIX = "_missing"


def dense_with_missing(column: pa.Array | pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    """A numeric column as float64 with NaN for every missing value (null or NaN); an infinite value is refused."""
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise ValueError(f"{where}: column {name!r} has type {column.type}; fill_missing applies to numeric columns")
    values = column.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
    if np.isinf(values).any():
        raise ValueError(f"{where}: column {name!r} has infinite values in {int(np.isinf(values).sum())} rows; "
                         "fill_missing fills null and NaN only")
    return values


class MissingFiller:
    """Fills the missing values (null or NaN) of one dense column with a constant or the training split's mean.

    ``fill`` is a number or ``"mean"`` (the mean of the values present in the
    training split). With ``indicator=True`` the data module adds the dense
    feature ``<column>_missing``: 1.0 where the value was missing, else 0.0.
    """

    def __init__(self, column: str, fill: float | str, indicator: bool = False) -> None:
        if isinstance(fill, str) and fill != "mean":
            raise ValueError(f"fill_missing[{column!r}]: expected a number or 'mean', got {fill!r}")
        if not isinstance(fill, str):
            if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not np.isfinite(fill):
                raise ValueError(f"fill_missing[{column!r}]: expected a finite number or 'mean', got {fill!r}")
            fill = float(fill)
        self.column = column
        self.fill = fill
        self.indicator = bool(indicator)
        self.value: float | None = None if fill == "mean" else float(fill)
        self._sum = 0.0
        self._count = 0

    @property
    def fitted(self) -> bool:
        return self.value is not None

    @property
    def indicator_name(self) -> str:
        return self.column + MISSING_INDICATOR_SUFFIX

    def partial_fit(self, values: np.ndarray) -> None:
        """Account for one chunk of training values (float64, NaN = missing)."""
        present = values[~np.isnan(values)]
        self._sum += float(present.sum())
        self._count += len(present)

    def finish_fit(self) -> None:
        if self.value is not None:
            return
        if self._count == 0:
            raise ValueError(f"fill_missing[{self.column!r}] = 'mean': the training split holds no value of "
                             f"{self.column!r} (every row is missing); give a number instead")
        self.value = self._sum / self._count

    def apply(self, column: pa.Array | pa.ChunkedArray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """``(filled float32 values, missing mask)`` of one chunk of the column."""
        if self.value is None:
            raise ValueError(f"fill_missing[{self.column!r}] = 'mean' is not fitted yet")
        values = dense_with_missing(column, self.column, where)
        missing = np.isnan(values)
        return np.where(missing, self.value, values).astype(np.float32), missing

    def state_dict(self) -> dict[str, Any]:
        if self.value is None:
            raise ValueError(f"fill_missing[{self.column!r}] = 'mean' is not fitted yet")
        return {"fill": self.fill, "value": self.value, "indicator": self.indicator}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fill, self.value, self.indicator = state["fill"], float(state["value"]), bool(state["indicator"])


def make_fillers(fill_missing: Mapping[str, Any] | None, indicator: bool | Sequence[str]) -> dict[str, MissingFiller]:
    """``MissingFiller`` per column of ``fill_missing``; ``indicator``: ``True`` for all of them, or a list of columns."""
    fill_missing = dict(fill_missing or {})
    if isinstance(indicator, str) or (not isinstance(indicator, bool) and not isinstance(indicator, Sequence)):
        raise TypeError(f"missing_indicator must be True/False or a list of column names, got {indicator!r}")
    flagged = set(fill_missing) if indicator is True else set() if indicator is False else set(indicator)
    unknown = sorted(flagged - set(fill_missing))
    if unknown:
        raise ValueError(f"missing_indicator names {unknown}, which are not in fill_missing ({sorted(fill_missing)})")
    return {name: MissingFiller(name, fill, name in flagged) for name, fill in fill_missing.items()}


def filler_from_state(column: str, state: Mapping[str, Any]) -> MissingFiller:
    filler = MissingFiller(column, state["fill"], state["indicator"])
    filler.load_state_dict(state)
    return filler


def fill_table(table: pa.Table, fillers: Mapping[str, MissingFiller], where: Any) -> pa.Table:
    """``table`` with the missing values of every filled column replaced, plus its indicator column if it has one."""
    for name, filler in fillers.items():
        if name in table.column_names:
            values, missing = filler.apply(table.column(name), str(where))
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.float32()))
            if filler.indicator:
                table = table.append_column(filler.indicator_name, pa.array(missing.astype(np.float32), pa.float32()))
    return table


def iter_chunks(files: Iterable[DataFile | Path], columns: Sequence[str], read_rows: int = FIT_READ_ROWS):
    """``(path, pa.Table)`` chunks of at most ``read_rows`` rows, for the given columns (partitions too) of every file."""
    for file in files:
        with open_file(file) as parquet:
            names = parquet.schema.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{parquet.path}: missing column(s) {missing} needed for fitting (columns: {names})")
            for table in parquet.iter_batches(read_rows, list(columns)):
                yield parquet.path, table


def fit_preprocessing(
    files: Sequence[DataFile | Path],
    encoders: Mapping[str, CategoricalEncoder],
    normalizers: Mapping[str, DenseNormalizer],
    dense_values: Any,
    read_rows: int = FIT_READ_ROWS,
    fillers: Mapping[str, MissingFiller] | None = None,
    progress: Any = None,
) -> None:
    """One streaming pass over the training ``files`` fitting every unfitted encoder, normaliser and filler.

    ``dense_values(column, path)`` turns a dense column into a checked float32
    array (the data module passes its own column check, so bad values are
    reported with the file and column). A column with a ``MissingFiller`` is
    read with its missing values instead: the filler's mean and the
    normaliser's statistics are those of the values present.
    ``progress(rows)``, if given, is called after each chunk.
    """
    fillers = dict(fillers or {})
    to_encode = {name: e for name, e in encoders.items() if not e.fitted}
    to_normalize = {name: n for name, n in normalizers.items() if not n.fitted}
    to_fill = {name: f for name, f in fillers.items() if not f.fitted}
    learning = {name: e for name, e in to_encode.items() if isinstance(e, VocabularyEncoder)}
    columns = list(dict.fromkeys([*learning, *to_normalize, *to_fill]))
    if not columns:
        return
    for path, table in iter_chunks(files, columns, read_rows):
        for name, encoder in learning.items():
            encoder.partial_fit(table.column(name), str(path))
        for name in dict.fromkeys([*to_normalize, *to_fill]):
            if name in fillers:
                raw = dense_with_missing(table.column(name), name, str(path))
                if name in to_fill:
                    to_fill[name].partial_fit(raw)
                if name in to_normalize:
                    to_normalize[name].partial_fit(raw[~np.isnan(raw)].astype(np.float32))
            else:
                to_normalize[name].partial_fit(dense_values(table.column(name), name, path))
        if progress is not None:
            progress(table.num_rows)
    for encoder in learning.values():
        encoder.finish_fit()
    for normalizer in to_normalize.values():
        normalizer.finish_fit()
    for filler in to_fill.values():
        filler.finish_fit()


def grow_vocabularies(
    files: Sequence[DataFile | Path], encoders: Mapping[str, CategoricalEncoder], read_rows: int = FIT_READ_ROWS,
) -> dict[str, np.ndarray]:
    """One streaming pass over ``files`` growing every fitted vocabulary (``VocabularyEncoder.grow``).

    Returns ``{column: sources}`` (see ``grow``) for every vocabulary; hashing encoders need nothing.
    """
    growing = {name: e for name, e in encoders.items() if isinstance(e, VocabularyEncoder)}
    if not growing:
        return {}
    for path, table in iter_chunks(files, list(growing), read_rows):
        for name, encoder in growing.items():
            encoder.partial_fit(table.column(name), str(path))
    return {name: encoder.grow() for name, encoder in growing.items()}


def encode_table(table: pa.Table, encoders: Mapping[str, CategoricalEncoder], where: Any) -> pa.Table:
    """``table`` with every encoded column replaced by its int64 ids (columns absent from ``table`` are skipped)."""
    for name, encoder in encoders.items():
        if name in table.column_names:
            ids = encoder.transform(table.column(name), str(where))
            table = table.set_column(table.column_names.index(name), name, pa.array(ids, pa.int64()))
    return table
