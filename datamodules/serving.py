"""Serving: raw rows to the model's input, with the preprocessing fitted in training.

``mtl_lightning.export.export_onnx`` / ``export_torchscript`` write, next to
the model file, ``<name>.preprocessing.json``: the model's feature specs (in
its input order) and what the data module fitted on the train split -- the
vocabularies (``categorical=``), the hashing parameters (``num_buckets``), the
normalisation statistics (``normalize=``) and the missing-value fills
(``fill_missing=``, with their indicator features). :class:`Preprocessor`
applies them to raw rows exactly as ``ParquetDataModule`` does in training and
prediction (it runs the same converter), so a raw row served through the
exported files gives what ``trainer.predict`` gives::

    import onnxruntime, pyarrow.parquet as pq
    from datamodules.serving import Preprocessor

    preprocess = Preprocessor.load("model.preprocessing.json")
    rows = pq.read_table("requests.parquet")            # raw columns: strings, NaN, ...
    session = onnxruntime.InferenceSession("model.onnx")
    outputs = session.run(None, preprocess.numpy(rows))  # one array per task, in the model's output order

    model = torch.jit.load("model.pt")
    probabilities = model(preprocess(rows))              # {task: (B,) tensor}

Rows may be a ``pyarrow.Table``, a pandas ``DataFrame``, a mapping of column
name to values, or a list of row dicts; columns the model does not read
(labels, keys) are ignored. A raw categorical value never seen in training, or
null, gets id 0 (as in training); an integer id column given as it is (no
encoder) keeps its ids, and an id outside the feature's vocabulary becomes 0,
as the exported model does. A missing column, a wrong type or a missing dense
value that was not filled in training is refused with an error naming the
column. ``export_torchscript`` also writes ``<name>.preprocessing.pt``, the
same transform as a TorchScript module (see ``mtl_lightning.export``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from mtl_lightning.features import Feature, SparseFeature, feature_from_config, feature_to_config

from .encoders import DenseNormalizer, encoder_from_state, filler_from_state
from .store import TableConverter

PREPROCESSING_FORMAT = "mtl-lightning-preprocessing/1"


def _table(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        return pa.Table.from_pandas(rows, preserve_index=False)
    if isinstance(rows, Mapping):
        return pa.table({name: values if isinstance(values, (pa.Array, pa.ChunkedArray)) else
                         (values.tolist() if isinstance(values, np.ndarray) and values.dtype == object else values)
                         for name, values in rows.items()})
    if isinstance(rows, Sequence) and all(isinstance(row, Mapping) for row in rows):
        return pa.Table.from_pylist(list(rows))
    raise TypeError(f"rows must be a pyarrow Table, a pandas DataFrame, a mapping of columns or a list of row dicts, "
                    f"got {type(rows).__name__}")


class Preprocessor:
    """Raw rows -> ``{feature: Tensor}`` in the model's input form, from a preprocessing state (see the module docstring).

    ``state`` is what ``export`` writes (``Preprocessor.load(path)`` reads the
    file): ``{"features": [...], "encoders": {...}, "normalization": {...},
    "fill_missing": {...}}``; a data module's ``state_dict()`` has the same keys.
    """

    def __init__(self, state: Mapping[str, Any]) -> None:
        if "features" not in state:
            raise ValueError("the preprocessing state has no 'features' (expected a file written by "
                             "mtl_lightning.export or a ParquetDataModule's state_dict())")
        self.features: list[Feature] = [feature_from_config(dict(f)) for f in state["features"]]
        self.encoders = {name: encoder_from_state(name, s) for name, s in state.get("encoders", {}).items()}
        self.normalizers = {}
        for name, s in state.get("normalization", {}).items():
            self.normalizers[name] = DenseNormalizer(name, int(s["dim"]))
            self.normalizers[name].load_state_dict(s)
        self.fillers = {name: filler_from_state(name, s) for name, s in state.get("fill_missing", {}).items()}
        self._convert = TableConverter(self.features, (), encoders=self.encoders, normalizers=self.normalizers,
                                       fillers=self.fillers)
        self._pass_through = {f.name: f.vocab_size for f in self.features
                              if isinstance(f, SparseFeature) and f.name not in self.encoders}

    @classmethod
    def load(cls, path: str | Path) -> "Preprocessor":
        """Read a ``<name>.preprocessing.json`` written by ``mtl_lightning.export``."""
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read the preprocessing file ({error})") from None
        if not isinstance(state, dict) or state.get("format") != PREPROCESSING_FORMAT:
            raise ValueError(f"{path}: not a preprocessing file of format {PREPROCESSING_FORMAT!r}")
        return cls(state)

    @property
    def input_names(self) -> list[str]:
        """The model's inputs, in order (an indicator feature is made from its column)."""
        return [f.name for f in self.features]

    def __call__(self, rows: Any) -> dict[str, Tensor]:
        """``{feature: Tensor}``: int64 ids, float32 dense values, padded int64 sequences; see the module docstring."""
        table = _table(rows)
        for name, vocab_size in self._pass_through.items():  # unknown ids -> 0, as the exported model does
            if name in table.column_names and pa.types.is_integer(table.column(name).type):
                ids = table.column(name)
                known = pc.and_(pc.greater_equal(ids, 0), pc.less(ids, vocab_size))
                table = table.set_column(table.column_names.index(name), name,
                                         pc.if_else(pc.fill_null(known, True), ids, pa.scalar(0, ids.type)))
        with torch.no_grad():
            store = self._convert(table, Path("rows"), 0)
            return store.batch(slice(None))["features"]

    def numpy(self, rows: Any) -> dict[str, np.ndarray]:
        """The same as numpy arrays, e.g. the feed of an ONNX Runtime session."""
        return {name: value.numpy() for name, value in self(rows).items()}


def preprocessing_state(features: Sequence[Feature], data_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preprocessing file's content: ``features`` (the model's) and the fitted parts of a data module's state."""
    data_state = dict(data_state or {})
    configs = [feature_to_config(f) for f in features]
    if "features" in data_state:
        theirs = {f["name"]: dict(f) for f in data_state["features"]}
        differ = [c["name"] for c in configs if theirs.get(c["name"]) not in (None, c)]
        if differ:
            raise ValueError(f"the data module's feature specs differ from the model's for {differ}: the data module "
                             "state does not belong to this model")
    known = {c["name"] for c in configs}
    for part in ("encoders", "normalization", "fill_missing"):
        unknown = sorted(set(data_state.get(part, {})) - known)
        if unknown:
            raise ValueError(f"the data module state's {part} name columns {unknown} that are not features of the "
                             "model: it does not belong to this model")
    return {
        "format": PREPROCESSING_FORMAT,
        "features": configs,
        "encoders": dict(data_state.get("encoders", {})),
        "normalization": dict(data_state.get("normalization", {})),
        "fill_missing": dict(data_state.get("fill_missing", {})),
    }


__all__ = ["Preprocessor", "preprocessing_state", "PREPROCESSING_FORMAT"]
