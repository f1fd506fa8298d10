"""Feature specs inferred from a split's Parquet schema and a statistics pass."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lightning.pytorch.utilities import rank_zero_info

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature

from .columns import _list_values, fill_advice
from .files import check_unique, read_column, read_schema

# An inferred id column is refused when its max id is this many times its number of distinct ids (and above
# SPARSE_IDS_MIN_VOCAB): its table would be mostly rows no id uses (one id 9,999,999 among 50 users: 10M rows).
SPARSE_IDS_RATIO = 100
SPARSE_IDS_MIN_VOCAB = 10_000


def encode_advice(names: Sequence[str]) -> str:
    """How to encode ``names`` instead of inferring them, as the data module's arguments."""
    vocabularies = {name: {} for name in names}
    return (f"encode {'it' if len(names) == 1 else 'them'}: ParquetDataModule(categorical={vocabularies!r}) (a "
            "vocabulary of the values seen, nulls get id 0; num_buckets per column hashes instead), or give "
            "the features in features=")


def check_inferred_vocab(name: str, vocab_size: int, distinct: int, max_vocab: int) -> None:
    """Refuse an inferred id column whose table would be mostly unused rows or larger than ``max_vocab`` rows."""
    advice = encode_advice([name])
    if vocab_size > max_vocab:
        raise ValueError(
            f"feature {name!r}: its largest id {vocab_size - 1} would make an embedding table of {vocab_size:,} rows, "
            f"above max_inferred_vocab={max_vocab:,}; {advice}"
        )
    if vocab_size > SPARSE_IDS_MIN_VOCAB and vocab_size > SPARSE_IDS_RATIO * distinct:
        raise ValueError(
            f"feature {name!r}: its largest id is {vocab_size - 1} but it holds at most {distinct:,} distinct ids, so "
            f"an inferred table of {vocab_size:,} rows would be almost all unused; {advice}"
        )


def _looks_like_label(column: pa.ChunkedArray, ignore_label: float | None) -> bool:
    """Whether a float column holds only 0, 1, null/NaN and the ignore label (and at least one 0 and one 1)."""
    values = column.to_numpy().astype(np.float64, copy=False) if column.null_count == 0 else (
        column.cast(pa.float64()).fill_null(float("nan")).to_numpy())
    values = values[~np.isnan(values)]
    if ignore_label is not None:
        values = values[values != ignore_label]
    return values.size > 0 and bool(np.isin(values, (0.0, 1.0)).all()) and 0 < values.sum() < values.size


def _whole_numbers(column: pa.ChunkedArray) -> tuple[bool, int]:
    """``(every value present is a whole number, number of distinct values present)`` of a float column."""
    values = column.cast(pa.float64()).fill_null(float("nan")).to_numpy()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return False, 0
    return bool(np.isfinite(values).all() and (values == np.floor(values)).all()), int(np.unique(values).size)


def infer_features(
    files: Sequence[Path],
    exclude: set[str],
    embedding_dim: int = 16,
    stat_files: Sequence[Path] | None = None,
    max_vocab: int = 1 << 24,
    ignore_label: float | None = -1,
    encoded: Collection[str] = (),
) -> list[Feature]:
    """Feature specs from the schema of ``files[0]`` and a statistics pass over ``stat_files``.

    Integer columns become ``SparseFeature`` (vocab = max id + 1), float columns
    ``DenseFeature``, list<int> columns ``SequenceFeature`` (vocab = max id + 1,
    max_len = longest list), fixed-size float lists ``DenseFeature(dim=size)``.
    Columns in ``exclude`` (labels, row id) are skipped; any other type is an error.
    A raw categorical column (``encoded``) that holds lists (of strings or
    integers) becomes ``SequenceFeature(name, vocab_size=2, max_len=longest
    list)`` in its place, the vocabulary size to be set by its encoder once
    fitted; a scalar one is skipped (its encoder makes its ``SparseFeature``).

    Guards: an id column whose table would exceed ``max_vocab`` rows, or whose
    max id is more than ``SPARSE_IDS_RATIO`` times its number of distinct ids
    (counted per file and summed, an upper bound), is refused
    (``check_inferred_vocab``); a float column that holds only 0/1 (null, NaN
    and ``ignore_label`` aside) looks like a label of another task and gets a
    warning naming it (list it in ``exclude=``/``labels=`` if it is one).
    Every column refused (strings, ids too large, other types) is named in one
    ``ValueError``, with the ``categorical=`` that encodes those it can.

    A Hive partition key of strings (``day=2026-11-01`` folders) is left out,
    with a log line: it is a constant of each folder, not a feature, unless
    asked for (``categorical=['day']``, or ``features=``). An integer key
    (``day=3``) is an id column like any other.
    """
    schema = read_schema(files[0])  # with the partition columns; errors name the file
    check_unique(schema, [name for name in schema.names if name not in exclude], files[0])
    features: list[Feature] = []
    stat_files = list(stat_files or files)
    string_keys = [p.name for p in getattr(files[0], "partitions", ()) if p.dtype != "int64" and p.name not in exclude]
    if string_keys:
        rank_zero_info(f"Hive partition key(s) {string_keys} of strings are left out of the inferred features; "
                       f"ParquetDataModule(categorical={string_keys!r}) makes them features")
    refused: list[str] = []
    encodable: list[str] = []  # what categorical= makes features
    fillable: list[str] = []  # what fill_missing= makes features
    for field in schema:
        name, ftype = field.name, field.type
        is_list = pa.types.is_list(ftype) or pa.types.is_large_list(ftype) or pa.types.is_fixed_size_list(ftype)
        if name in encoded and is_list:
            longest = max((pc.max(pc.list_value_length(read_column(path, name, like=(files[0], ftype)))).as_py() or 0
                           for path in stat_files), default=0)
            features.append(SequenceFeature(name, vocab_size=2, max_len=max(longest, 1), embedding_dim=embedding_dim))
            continue
        if name in exclude or name in encoded or name in string_keys:
            continue
        if pa.types.is_string(ftype) or pa.types.is_large_string(ftype) or pa.types.is_dictionary(ftype):
            refused.append(f"column {name!r} holds {ftype} values (raw categories)")
            encodable.append(name)
            continue
        if pa.types.is_integer(ftype) or (is_list and pa.types.is_integer(ftype.value_type)):
            high, longest, distinct, nulls = 0, 0, 0, 0
            for path in stat_files:
                column = read_column(path, name, like=(files[0], ftype))  # there, of the same kind, or an error
                values = _list_values(column) if is_list else column
                nulls += column.null_count
                if len(values):
                    high = max(high, pc.max(values).as_py() or 0)
                    distinct += pc.count_distinct(values).as_py()
                if is_list:
                    longest = max(longest, pc.max(pc.list_value_length(column)).as_py() or 0)
            if nulls and not is_list:
                refused.append(f"column {name!r} holds integer ids and {nulls:,} nulls")
                encodable.append(name)
                continue
            try:
                check_inferred_vocab(name, max(high + 1, 2) if is_list else high + 1, distinct, max_vocab)
            except ValueError as error:
                refused.append(str(error).split("; encode it:")[0])
                if not is_list:
                    encodable.append(name)
                continue
            if is_list:
                features.append(SequenceFeature(name, vocab_size=max(high + 1, 2), max_len=max(longest, 1),
                                                embedding_dim=embedding_dim))
            else:
                features.append(SparseFeature(name, vocab_size=high + 1, embedding_dim=embedding_dim))
        elif pa.types.is_floating(ftype):
            columns = [read_column(path, name, like=(files[0], ftype)) for path in stat_files]
            missing = sum(column.null_count + int(pc.sum(pc.is_nan(column)).as_py() or 0) for column in columns)
            if missing:
                like_label = all(_looks_like_label(column, ignore_label) for column in columns)
                refused.append(f"column {name!r} holds numbers and {missing:,} missing values (null or NaN)" + (
                    f", and only 0/1 besides, like a label: if it is one, ParquetDataModule(labels=[{name!r}])"
                    if like_label else ""))
                fillable.append(name)
                continue
            if all(_looks_like_label(column, ignore_label) for column in columns):
                warnings.warn(
                    f"column {name!r} holds only 0/1 values, like a label; it is inferred as a dense feature. If it is "
                    f"the label of another task (a feature that is a label leaks the answer), pass "
                    f"ParquetDataModule(labels=[{name!r}])", stacklevel=2,
                )
            else:
                whole = [_whole_numbers(column) for column in columns]
                if all(ok for ok, _ in whole) and sum(count for _, count in whole) > 2:
                    warnings.warn(
                        f"column {name!r} is stored as {ftype} but holds only whole numbers ({sum(c for _, c in whole):,} "
                        f"distinct values counted per file), like integer ids written as floats; it is inferred as a "
                        f"dense feature (a quantity). If it holds ids (users, items, categories), make it categorical: "
                        f"ParquetDataModule(categorical=[{name!r}]) (a vocabulary of its values) or "
                        f"ParquetDataModule(categorical={{{name!r}: {{'num_buckets': 1_000_000}}}}) (hashing), or "
                        f"write it as an integer column "
                        f"(inferred as ids). If it is a quantity (a count), give features=... to state it",
                        stacklevel=2,
                    )
            features.append(DenseFeature(name))
        elif pa.types.is_fixed_size_list(ftype) and pa.types.is_floating(ftype.value_type):
            features.append(DenseFeature(name, dim=ftype.list_size))
        else:
            refused.append(f"column {name!r} of type {ftype} has no feature spec to infer (give it in features=, "
                           f"or leave it out: ParquetDataModule(exclude=[{name!r}]))")
    if refused:
        advice = [encode_advice(encodable)] if encodable else []
        advice += [fill_advice(fillable)] if fillable else []
        raise ValueError(f"{files[0]}: cannot infer the features of {len(refused)} column(s):\n  - "
                         + "\n  - ".join(refused) + "".join(f"\n  {line}" for line in advice))
    return features

