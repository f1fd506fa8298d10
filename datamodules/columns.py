"""Column checks: Arrow columns to checked numpy arrays, errors naming the file and the column.

Used by the column store (``store.TableConverter``) and by feature inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature
from mtl_lightning.tasks import Task


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
        hint = (f"; a column of lists is a SequenceFeature: give SequenceFeature({feature.name!r}, vocab_size, max_len) "
                "in features=" if pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                or pa.types.is_fixed_size_list(column.type) else "")
        raise ValueError(
            f"{path}: column {feature.name!r} is a SparseFeature but has type {column.type}; "
            f"it must hold integer ids (encode raw categories first){hint}"
        )
    if column.null_count:
        raise ValueError(f"{path}: column {feature.name!r} has {column.null_count} null ids")
    _check_ids(column, feature.vocab_size, path, feature.name)
    return column.to_numpy().astype(np.int64, copy=False)


def fill_advice(names: Sequence[str]) -> str:
    """How to fill the missing values of the dense columns ``names``, as the data module's arguments."""
    means = {name: "mean" for name in names}
    return (f"fill them: ParquetDataModule(fill_missing={means!r}, missing_indicator=True) (the train split's mean, "
            "or a constant such as 0.0, and a 0/1 feature <column>_missing)")


def _missing(column: pa.ChunkedArray, feature: Feature) -> int:
    """Rows of ``column`` with a missing value for ``feature``: null, NaN (dense), a null list or a null id inside."""
    if isinstance(feature, DenseFeature):
        if feature.dim != 1 or not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            return column.null_count
        nan = pc.sum(pc.is_nan(column)).as_py() if pa.types.is_floating(column.type) else 0
        return column.null_count + int(nan or 0)
    if isinstance(feature, SequenceFeature) and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return column.null_count + int(pc.sum(pc.is_null(pc.list_flatten(column))).as_py() or 0)
    return column.null_count


def check_missing_values(table: pa.Table, features: Sequence[Feature], path: Path) -> None:
    """Refuse missing values in feature columns, naming every such column of ``table`` in one ``ValueError``.

    A dense column gets the ``fill_missing=`` that fills it, an id column the ``categorical=`` that maps
    nulls to id 0; a sequence column needs an empty list instead of a null one. Missing columns are left
    to the per-column checks (``_column``).
    """
    found: list[tuple[Feature, int]] = []
    for feature in features:
        if feature.name in table.column_names:
            count = _missing(table.column(feature.name), feature)
            if count:
                found.append((feature, count))
    if not found:
        return
    parts = [f"{f.name!r} ({count:,} in the {table.num_rows:,} rows read, a {type(f).__name__})" for f, count in found]
    dense = [f.name for f, _ in found if isinstance(f, DenseFeature) and f.dim == 1]
    ids = [f.name for f, _ in found if isinstance(f, SparseFeature)]
    lists = [f.name for f, _ in found if isinstance(f, SequenceFeature) or (isinstance(f, DenseFeature) and f.dim > 1)]
    advice = []
    if dense:
        advice.append(fill_advice(dense).replace("fill them", "fill the numbers"))
    if ids:
        vocabularies = {name: {} for name in ids}
        advice.append(f"encode the ids: ParquetDataModule(categorical={vocabularies!r}) (nulls get id 0)")
    if lists:
        advice.append(f"write an empty list instead of a null one (or of a null id) in {lists}")
    raise ValueError(f"{path}: {len(found)} feature column(s) have missing values (null or NaN): "
                     + ", ".join(parts) + "; " + "; ".join(advice))


_FILL_ADVICE = ("to fill missing values pass ParquetDataModule(fill_missing={{{name!r}: 0.0}}) (a constant) or "
                "fill_missing={{{name!r}: 'mean'}} (the train split's mean), and missing_indicator=True to add a 0/1 "
                "feature {name}_missing")


def _dense_array(column: pa.ChunkedArray, feature: DenseFeature, path: Path) -> np.ndarray:
    ctype = column.type
    if feature.dim == 1:
        if not (pa.types.is_floating(ctype) or pa.types.is_integer(ctype)):
            raise ValueError(f"{path}: column {feature.name!r} is a DenseFeature but has type {ctype}; it must be numeric")
        if column.null_count:
            raise ValueError(f"{path}: column {feature.name!r} has {column.null_count} null values; "
                             + _FILL_ADVICE.format(name=feature.name))
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
        advice = (" " + _FILL_ADVICE.format(name=feature.name)) if feature.dim == 1 and not np.isinf(values).any() else ""
        raise ValueError(f"{path}: column {feature.name!r} has NaN or infinite values in {bad} rows;{advice or ' '}"
                         + ("" if advice else "a dense feature must be finite"))
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


def _label_array(column: pa.ChunkedArray, task: Task, path: Path, ignore_label: float | None = -1) -> np.ndarray:
    """A task's labels as float32, null -> NaN (a missing label), checked like a feature.

    A binary label must be 0 or 1 (bool and integer columns are accepted), the
    ignore label, or null/NaN; a multi-class label must be a class id (an integer
    in ``[0, num_classes)``, in an integer or float column), the ignore label, or
    null/NaN; a regression label must be finite (as float32), the ignore label, or
    null/NaN. Anything else (``inf``, ``-2``, ``0.5`` for a binary task, ``3`` or
    ``1.5`` for a task of 3 classes) is refused with the file, the column, the
    number of bad rows and an example value: it would otherwise train on silently
    wrong numbers.
    """
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        raise ValueError(f"{path}: label column {task.label!r} of task {task.name!r} has type {column.type}; it must be numeric")
    # a null label is a missing label: it becomes NaN and is left out of the task's loss
    values = column.cast(pa.float32(), safe=False).fill_null(float("nan")).to_numpy().astype(np.float32, copy=False)
    missing = np.isnan(values)
    if ignore_label is not None:
        missing |= values == np.float32(ignore_label)
    if task.kind == "binary":
        bad = ~missing & (values != 0) & (values != 1)
        allowed = "0 or 1"
    elif task.kind == "multiclass":
        bad = ~missing & ((values < 0) | (values >= task.output_dim) | (values != np.floor(values)))
        allowed = f"a class id 0..{task.output_dim - 1} (num_classes={task.output_dim})"
    else:
        bad = ~missing & ~np.isfinite(values)
        allowed = "a finite number (as float32)"
    count = int(np.count_nonzero(bad))
    if count:
        example = column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)[np.flatnonzero(bad)[0]]
        ignore = f", the ignore label {ignore_label:g}" if ignore_label is not None else ""
        raise ValueError(
            f"{path}: label column {task.label!r} of {task.kind} task {task.name!r} has {count} rows whose label is "
            f"not {allowed}{ignore} or null/NaN (e.g. {example!r}); fix or drop those rows (a missing label is null, "
            f"NaN or the ignore label, set with ParquetDataModule(ignore_label=...))"
        )
    return values


def _weight_array(column: pa.ChunkedArray, task: Task, path: Path) -> np.ndarray:
    """A task's per-row sample weights as float32: every value must be a finite number >= 0 (no null).

    Anything else is refused with the file, the column, the number of bad rows
    and an example: a negative weight would push the loss of its row up, a
    non-finite one turn the loss into NaN, and a null has no meaning to guess.
    """
    where = f"{path}: sample weight column {task.sample_weight!r} of task {task.name!r}"
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        raise ValueError(f"{where} has type {column.type}; it must be numeric")
    values = column.cast(pa.float64(), safe=False).fill_null(float("nan")).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(values) | (values < 0)
    count = int(np.count_nonzero(bad))
    if count:
        raise ValueError(f"{where} has {count} rows whose weight is negative, null or not finite (e.g. "
                         f"{values[np.flatnonzero(bad)[0]]!r}); every sample weight must be a finite number >= 0")
    return values.astype(np.float32)


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


def _key_dtype(arrow_type: pa.DataType, name: str, path: Path) -> str:
    if pa.types.is_integer(arrow_type):
        return "int64"
    if pa.types.is_floating(arrow_type):
        return "float64"
    raise ValueError(
        f"{path}: key column {name!r} has type {arrow_type}; keys must be numeric "
        "(join string keys afterwards on row_id, the row's position in the split)"
    )

