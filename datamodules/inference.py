"""Feature specs inferred from a split's Parquet schema and a statistics pass."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature

from .columns import _list_values


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

