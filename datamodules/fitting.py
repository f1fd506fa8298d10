"""The fitting pass: one streaming read of the training split fits every encoder, normaliser and filler.

Fitting reads the training split chunk by chunk (``read_rows`` rows of the
needed columns at a time) and never holds it in memory: vocabularies are
counted with ``value_counts`` and merged with a group-by
(``VocabularyEncoder.partial_fit``), normalisers and fills keep running sums.
A data module hands the pass its chunks (``fit_chunks``, ``grow_chunks``), so
the pass does not depend on the file format; ``fit_preprocessing`` and
``grow_vocabularies`` read Parquet files for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .dense import DenseNormalizer, MissingFiller, dense_with_missing
from .files import open_file
from .paths import DataFile

FIT_READ_ROWS = 65_536
Chunks = Iterable[tuple[Any, pa.Table]]  # (where: a path or a name for error messages, a table of the needed columns)


def _learns(encoder: Any) -> bool:
    """Whether a categorical encoder learns a mapping from data (a vocabulary, or a column sharing one); hashing
    does not."""
    return bool(getattr(encoder, "learns", callable(getattr(encoder, "grow", None))))


def iter_chunks(files: Iterable[DataFile | Path], columns: Sequence[str], read_rows: int = FIT_READ_ROWS) -> Chunks:
    """``(path, pa.Table)`` chunks of at most ``read_rows`` rows, for the given columns (partitions too) of every file."""
    for file in files:
        with open_file(file) as parquet:
            names = parquet.schema.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{parquet.path}: missing column(s) {missing} needed for fitting (columns: {names})")
            for table in parquet.iter_batches(read_rows, list(columns)):
                yield parquet.path, table


def columns_to_fit(
    encoders: Mapping[str, Any], normalizers: Mapping[str, DenseNormalizer],
    fillers: Mapping[str, MissingFiller] | None = None,
) -> list[str]:
    """The columns a fitting pass reads: those of every unfitted vocabulary, normaliser and filler (empty: nothing to fit)."""
    learning = [name for name, e in encoders.items() if not e.fitted and _learns(e)]
    normalizing = [name for name, n in normalizers.items() if not n.fitted]
    filling = [name for name, f in (fillers or {}).items() if not f.fitted]
    return list(dict.fromkeys([*learning, *normalizing, *filling]))


def fit_chunks(
    chunks: Chunks,
    encoders: Mapping[str, Any],
    normalizers: Mapping[str, DenseNormalizer],
    dense_values: Any,
    fillers: Mapping[str, MissingFiller] | None = None,
    progress: Any = None,
) -> None:
    """Fit every unfitted encoder, normaliser and filler on ``chunks`` (tables holding ``columns_to_fit``).

    ``dense_values(column, name, where)`` turns a dense column into a checked float32
    array (the data module passes its own column check, so bad values are
    reported with the file and column). A column with a ``MissingFiller`` is
    read with its missing values instead: the filler's mean and the
    normaliser's statistics are those of the values present.
    ``progress(rows)``, if given, is called after each chunk.
    """
    fillers = dict(fillers or {})
    to_normalize = {name: n for name, n in normalizers.items() if not n.fitted}
    to_fill = {name: f for name, f in fillers.items() if not f.fitted}
    learning = {name: e for name, e in encoders.items() if not e.fitted and _learns(e)}
    for where, table in chunks:
        for name, encoder in learning.items():
            encoder.partial_fit(table.column(name), str(where))
        for name in dict.fromkeys([*to_normalize, *to_fill]):
            if name in fillers:
                raw = dense_with_missing(table.column(name), name, str(where))
                if name in to_fill:
                    to_fill[name].partial_fit(raw)
                if name in to_normalize:
                    to_normalize[name].partial_fit(raw[~np.isnan(raw)].astype(np.float32))
            else:
                to_normalize[name].partial_fit(dense_values(table.column(name), name, where))
        if progress is not None:
            progress(table.num_rows)
    for encoder in learning.values():
        encoder.finish_fit()
    for normalizer in to_normalize.values():
        normalizer.finish_fit()
    for filler in to_fill.values():
        filler.finish_fit()


def fit_preprocessing(
    files: Sequence[DataFile | Path],
    encoders: Mapping[str, Any],
    normalizers: Mapping[str, DenseNormalizer],
    dense_values: Any,
    read_rows: int = FIT_READ_ROWS,
    fillers: Mapping[str, MissingFiller] | None = None,
    progress: Any = None,
) -> None:
    """One streaming pass over the Parquet training ``files`` fitting every unfitted encoder, normaliser and filler.

    ``fit_chunks`` over ``iter_chunks(files, columns_to_fit(...), read_rows)``; nothing is read when all are fitted.
    """
    columns = columns_to_fit(encoders, normalizers, fillers)
    if columns:
        fit_chunks(iter_chunks(files, columns, read_rows), encoders, normalizers, dense_values, fillers, progress)


def vocabulary_columns(encoders: Mapping[str, Any]) -> list[str]:
    """The columns of the encoders that can grow (vocabularies; hashing encoders need nothing)."""
    return [name for name, encoder in encoders.items() if _learns(encoder)]


def grow_chunks(chunks: Chunks, encoders: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Grow every fitted vocabulary on ``chunks`` (tables holding ``vocabulary_columns``; ``VocabularyEncoder.grow``).

    A column sharing a vocabulary (``vocabulary_of``) adds its values to its
    owner's counts and grows with it. Returns ``{column: sources}`` (see
    ``grow``) for every vocabulary that grew itself (not for the columns sharing one).
    """
    growing = {name: encoders[name] for name in vocabulary_columns(encoders)}
    for where, table in chunks:
        for name, encoder in growing.items():
            encoder.partial_fit(table.column(name), str(where))
    return {name: encoder.grow() for name, encoder in growing.items() if callable(getattr(encoder, "grow", None))}


def grow_vocabularies(
    files: Sequence[DataFile | Path], encoders: Mapping[str, Any], read_rows: int = FIT_READ_ROWS,
) -> dict[str, np.ndarray]:
    """One streaming pass over the Parquet ``files`` growing every fitted vocabulary (``grow_chunks``)."""
    columns = vocabulary_columns(encoders)
    if not columns:
        return {}
    return grow_chunks(iter_chunks(files, columns, read_rows), encoders)
