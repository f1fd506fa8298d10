"""Dense columns fitted on the training split: ``DenseNormalizer`` and ``MissingFiller``.

``DenseNormalizer`` stores a per-dimension mean and standard deviation of
dense columns computed on the training split and maps ``x -> (x - mean) / std``
(a constant column keeps ``std = 1``).

``MissingFiller`` (``ParquetDataModule(fill_missing={"price": 0.0, "age": "mean"})``)
replaces the missing values (null or NaN) of a dense column by a constant or
by the mean of the values present in the training split, optionally adding a
0/1 feature ``<column>_missing``; a normaliser of that column is fitted on the
values present, and applied after filling.

Both are fitted by ``datamodules.fitting``; their ``state_dict()`` is plain
Python data that the data module keeps in its checkpoints.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa


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
