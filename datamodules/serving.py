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

A preprocessing file belongs to one model. The export writes into both the
*fingerprint* of the preprocessing (``mtl_lightning.export.preprocessing_fingerprint``:
a SHA-256 over the canonical JSON of the feature specs, the encoders' mappings,
the normalisation statistics and the fills): the file's ``"fingerprint"`` key,
the ONNX model's ``metadata_props`` (key ``mtl_lightning.preprocessing_fingerprint``),
the TorchScript files' extra file ``preprocessing_fingerprint``.
:func:`open_served` opens a model with the preprocessing file its export wrote
beside it and refuses a pair whose fingerprints differ -- yesterday's file with
today's model after a capped vocabulary evicted a value (the same vocabulary
size, another value behind an id), a file of another export -- with an error
naming both files; ``Preprocessor.load(path, model=...)`` and
``Preprocessor.check_model`` do the same check for a model opened elsewhere::

    session, preprocess = open_served("model.onnx")     # or "model.pt": (torch.jit module, Preprocessor)
    outputs = session.run(None, preprocess.numpy(rows))

``Preprocessor`` validates the whole state before use (see
:func:`check_preprocessing_state`): every key and type, the statistics (a
finite mean, a finite std > 0), each encoder against its feature (a vocabulary
of ``vocab_size - 1`` values, as a list; ``num_buckets == vocab_size``); a
problem is a ``ValueError`` naming the file, the key (its JSON path, e.g.
``normalization.age.std[0]``) and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from mtl_lightning.export import FINGERPRINT_FILE, FINGERPRINT_METADATA_KEY, preprocessing_fingerprint, preprocessing_path
from mtl_lightning.features import DenseFeature, Feature, SparseFeature, feature_from_config, feature_to_config

from .encoders import DenseNormalizer, encoder_from_state, filler_from_state
from .store import TableConverter

PREPROCESSING_FORMAT = "mtl-lightning-preprocessing/1"

# the parts of a preprocessing state; a file has "format" and "fingerprint" besides
_PARTS = ("features", "encoders", "normalization", "fill_missing")
_FILE_KEYS = ("format", "fingerprint", *_PARTS)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INT64 = (-(2**63), 2**63 - 1)


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
    "fill_missing": {...}}``; a data module's ``state_dict()`` has the same keys
    (its other keys, such as ``"partitions"``, are ignored). The state is
    validated first (:func:`check_preprocessing_state`; ``source`` names it in
    the errors). ``fingerprint`` is computed from the content; a state that
    carries a ``"fingerprint"`` of other content (a file edited after export) is
    refused.
    """

    def __init__(self, state: Mapping[str, Any], source: str | Path | None = None) -> None:
        self.source = str(source) if source is not None else "the preprocessing state"
        check_preprocessing_state(state, self.source)
        self.fingerprint = preprocessing_fingerprint(state)
        written = state.get("fingerprint")
        if written is not None and written != self.fingerprint:
            raise ValueError(f"{self.source}: fingerprint: the file says {written} but its content gives "
                             f"{self.fingerprint}: it was edited after export; export the model again instead of "
                             "editing its preprocessing file")
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
    def load(cls, path: str | Path, model: Any = None) -> "Preprocessor":
        """Read a ``<name>.preprocessing.json`` written by ``mtl_lightning.export``, validated (see the class).

        ``model``: the exported model it is for (a path to its ONNX or
        TorchScript file, or an ``onnxruntime.InferenceSession``); the file is
        refused unless it carries the model's fingerprint (:meth:`check_model`).
        """
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read the preprocessing file ({error})") from None
        if not isinstance(state, dict) or "format" not in state:
            raise ValueError(f"{path}: not a preprocessing file of format {PREPROCESSING_FORMAT!r} (no 'format' key)")
        preprocessor = cls(state, source=path)
        if model is not None:
            preprocessor.check_model(model)
        return preprocessor

    def check_model(self, model: Any) -> None:
        """Refuse serving this preprocessing with ``model`` unless the model carries its fingerprint.

        ``model``: a path to an exported ONNX or TorchScript file, or an
        ``onnxruntime.InferenceSession`` (a loaded TorchScript module no longer
        has its extra files: give its path). The error names both files.
        """
        self._check_fingerprint(model_fingerprint(model), _model_name(model))

    def _check_fingerprint(self, theirs: str | None, name: str) -> None:
        """Refuse the model ``name`` carrying fingerprint ``theirs`` (``None``: none) unless it is this file's."""
        if theirs is None:
            raise ValueError(
                f"{name}: the model carries no preprocessing fingerprint (it was exported before fingerprints were "
                f"written, or not by mtl_lightning.export), so {self.source} cannot be checked against it; export it "
                "again with its preprocessing (python -m mtl_lightning.export CKPT --onnx/--torchscript PATH)"
            )
        if theirs != self.fingerprint:
            raise ValueError(
                f"{self.source} does not belong to the model {name}: the file's preprocessing fingerprint "
                f"{self.fingerprint[:16]}... differs from the model's {theirs[:16]}... -- their feature specs, "
                "vocabularies, statistics or fills differ (for example yesterday's file served with today's model "
                "after the vocabulary grew or evicted values, so that an id now stands for another value, or a file "
                "of another export). Serve the model with the preprocessing file its own export wrote beside it"
                + (f" ({preprocessing_path(name)})" if not name.startswith("<") and ".preprocessing." not in name
                   else "")
            )

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
    state = {
        "format": PREPROCESSING_FORMAT,
        "features": configs,
        "encoders": dict(data_state.get("encoders", {})),
        "normalization": dict(data_state.get("normalization", {})),
        "fill_missing": dict(data_state.get("fill_missing", {})),
    }
    check_preprocessing_state(state, "the data module state")
    return state


# ------------------------------------------------------------------ the model side
def model_fingerprint(model: Any) -> str | None:
    """The preprocessing fingerprint an exported model carries, or ``None`` (exported without one).

    ``model``: a path to an ONNX file (read from its ``metadata_props``) or a
    TorchScript file (its extra file ``preprocessing_fingerprint``; the
    ``model.preprocessing.pt`` of ``export_torchscript`` carries it too), or an
    ``onnxruntime.InferenceSession``.
    """
    if hasattr(model, "get_modelmeta"):  # an onnxruntime.InferenceSession
        return model.get_modelmeta().custom_metadata_map.get(FINGERPRINT_METADATA_KEY)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be the path of an exported ONNX / TorchScript file or an "
                        f"onnxruntime.InferenceSession, got {type(model).__name__} (a loaded TorchScript module no "
                        "longer has its extra files: give its path)")
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"{path}: no such model file")
    if zipfile.is_zipfile(path):  # TorchScript archives are zip files
        return _load_torchscript(path)[1]
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and others for a file that is not ONNX
        raise ValueError(f"{path}: neither a TorchScript archive nor an ONNX model ({error})") from None
    return next((p.value for p in proto.metadata_props if p.key == FINGERPRINT_METADATA_KEY), None)


def open_served(model_path: str | Path, preprocessing: str | Path | None = None,
                providers: Sequence[str] | None = None) -> tuple[Any, Preprocessor]:
    """``(model, preprocessor)``: an exported model and its preprocessing file, checked to belong together.

    ``model_path``: an ONNX file (opened as an ``onnxruntime.InferenceSession``
    with ``providers``, default CPU) or a TorchScript file (``torch.jit.load``,
    on CPU). ``preprocessing``: the preprocessing file, by default the
    ``<name>.preprocessing.json`` its export wrote beside it. A pair whose
    fingerprints differ, or a model without one, is refused with a
    ``ValueError`` naming both files (see the module docstring).
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"{model_path}: no such model file")
    preprocessing = Path(preprocessing) if preprocessing is not None else preprocessing_path(model_path)
    if not preprocessing.is_file():
        raise ValueError(f"{preprocessing}: no such preprocessing file (the export of {model_path} writes it beside "
                         "the model; give preprocessing= if it is elsewhere)")
    preprocessor = Preprocessor.load(preprocessing)
    if zipfile.is_zipfile(model_path):
        model, fingerprint = _load_torchscript(model_path)
        preprocessor._check_fingerprint(fingerprint, str(model_path))
        return model, preprocessor
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=list(providers or ["CPUExecutionProvider"]))
    preprocessor._check_fingerprint(model_fingerprint(session), str(model_path))
    return session, preprocessor


def _load_torchscript(path: Path) -> tuple[Any, str | None]:
    """``(module on CPU, its preprocessing fingerprint or None)`` of a TorchScript file."""
    extra: dict[str, Any] = {FINGERPRINT_FILE: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    value = extra[FINGERPRINT_FILE]
    return module, (value.decode("ascii", "replace") if isinstance(value, bytes) else value) or None


def _model_name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return f"<{type(model).__name__}>"


# ------------------------------------------------------------------ validation
def check_preprocessing_state(state: Any, source: str = "the preprocessing state") -> None:
    """Validate a preprocessing state against its own features; ``ValueError`` naming ``source``, the key and the problem.

    Checked: the top-level keys (a file -- a state with ``"format"`` -- may hold
    only ``format``, ``fingerprint``, ``features``, ``encoders``,
    ``normalization`` and ``fill_missing``; a data module's state may hold
    others, which are ignored); every feature spec (known ``kind``, known
    fields of the right types, unique names); every encoder (a ``vocabulary``:
    ``value_type`` ``string``/``int64``, ``values`` a list of distinct values
    of that type, one per id ``1 .. vocab_size - 1`` of its sparse feature,
    ``min_freq`` >= 1, ``max_size`` None or >= the number of values,
    ``counts`` one non-negative integer per value; a ``hashing`` encoder:
    ``num_buckets == vocab_size``); every normalisation (a dense feature,
    ``dim`` equal to the feature's, ``mean`` finite and ``std`` finite and > 0,
    ``dim`` numbers each); every fill (a dense feature of one value,
    ``fill`` a finite number or ``"mean"``, ``value`` finite and equal to a
    constant ``fill``, ``indicator`` a boolean). Keys are named by their JSON
    path (``encoders.city.values[3]``).
    """
    check = _Check(source)
    if not isinstance(state, Mapping):
        check.fail("(top level)", f"expected a JSON object, got {_kind(state)}")
    if "format" in state:
        if state["format"] != PREPROCESSING_FORMAT:
            check.fail("format", f"expected {PREPROCESSING_FORMAT!r}, got {state['format']!r}")
        unknown = sorted(str(k) for k in state if k not in _FILE_KEYS)
        if unknown:
            check.fail(unknown[0], f"unknown key (a preprocessing file holds {list(_FILE_KEYS)})")
        if "fingerprint" in state and not (isinstance(state["fingerprint"], str) and _SHA256.match(state["fingerprint"])):
            check.fail("fingerprint", f"expected 64 lowercase hex digits (SHA-256), got {state['fingerprint']!r}")
    if "features" not in state:
        check.fail("features", "missing (expected a file written by mtl_lightning.export or a ParquetDataModule's "
                               "state_dict())")
    features = check.features(state["features"])
    for part in ("encoders", "normalization", "fill_missing"):
        if part in state and not isinstance(state[part], Mapping):
            check.fail(part, f"expected an object of column -> state, got {_kind(state[part])}")
    for name, encoder in state.get("encoders", {}).items():
        check.encoder(f"encoders.{name}", name, encoder, features)
    for name, normalization in state.get("normalization", {}).items():
        check.normalization(f"normalization.{name}", name, normalization, features)
    for name, fill in state.get("fill_missing", {}).items():
        check.fill(f"fill_missing.{name}", name, fill, features)


def _kind(value: Any) -> str:
    """A value's JSON type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value!r})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_ANNOTATION_TYPES = {"int": _is_int, "str": lambda v: isinstance(v, str), "None": lambda v: v is None,
                     "bool": lambda v: isinstance(v, bool), "float": _is_number}


class _Check:
    """The checks of :func:`check_preprocessing_state`; ``fail`` raises the ``ValueError``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> None:
        raise ValueError(f"{self.source}: {key}: {problem}")

    def keys(self, key: str, value: Any, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        if not isinstance(value, Mapping):
            self.fail(key, f"expected an object, got {_kind(value)}")
        for name in required:
            if name not in value:
                self.fail(f"{key}.{name}", "missing")
        unknown = sorted(str(k) for k in value if k not in (*required, *optional))
        if unknown:
            self.fail(f"{key}.{unknown[0]}", f"unknown key (expected {sorted({*required, *optional})})")

    def features(self, configs: Any) -> dict[str, Feature]:
        if not isinstance(configs, list):
            self.fail("features", f"expected a list of feature specs, got {_kind(configs)}")
        features: dict[str, Feature] = {}
        for i, config in enumerate(configs):
            key = f"features[{i}]"
            if not isinstance(config, Mapping):
                self.fail(key, f"expected an object, got {_kind(config)}")
            try:
                feature = feature_from_config(dict(config))
            except TypeError as error:  # a field the spec does not have, or a missing one
                self.fail(key, str(error).replace(".__init__()", ""))
            except ValueError as error:
                self.fail(key, str(error))
            for field in dataclasses.fields(feature):
                annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
                accepted = [_ANNOTATION_TYPES.get(t.strip()) for t in annotation.split("|")]
                if all(accepted) and not any(ok(getattr(feature, field.name)) for ok in accepted):
                    self.fail(f"{key}.{field.name}", f"expected {field.type}, got {_kind(getattr(feature, field.name))}")
            if feature.name in features:
                self.fail(f"{key}.name", f"feature {feature.name!r} appears twice")
            features[feature.name] = feature
        return features

    def encoder(self, key: str, name: str, state: Any, features: Mapping[str, Feature]) -> None:
        feature = features.get(name)
        if not isinstance(feature, SparseFeature):
            self.fail(key, f"encodes column {name!r}, which is not a sparse feature of the file (sparse features: "
                           f"{sorted(n for n, f in features.items() if isinstance(f, SparseFeature))})")
        if not isinstance(state, Mapping):
            self.fail(key, f"expected an object, got {_kind(state)}")
        if state.get("kind") == "hashing":
            self.keys(key, state, ("kind", "num_buckets"))
            buckets = state["num_buckets"]
            if not _is_int(buckets) or buckets < 2:
                self.fail(f"{key}.num_buckets", f"expected an integer >= 2, got {_kind(buckets)}")
            if buckets != feature.vocab_size:
                self.fail(f"{key}.num_buckets", f"{buckets} buckets, but feature {name!r} has vocab_size "
                                                f"{feature.vocab_size}: the encoder and the model disagree")
            return
        if state.get("kind") != "vocabulary":
            self.fail(f"{key}.kind", f"expected 'vocabulary' or 'hashing', got {state.get('kind')!r}")
        self.keys(key, state, ("kind", "value_type", "values", "min_freq", "max_size"), ("counts",))
        value_type, values = state["value_type"], state["values"]
        if value_type not in ("string", "int64"):
            self.fail(f"{key}.value_type", f"expected 'string' or 'int64', got {value_type!r}")
        if not isinstance(values, list):
            self.fail(f"{key}.values", f"expected a list of {value_type} values (id i + 1 for the i-th), got "
                                       f"{_kind(values)}")
        for i, value in enumerate(values):
            good = (isinstance(value, str) if value_type == "string"
                    else _is_int(value) and _INT64[0] <= value <= _INT64[1])
            if not good:
                self.fail(f"{key}.values[{i}]", f"expected a {value_type} value, got {_kind(value)}")
        if len(set(values)) != len(values):
            seen: set = set()
            duplicate = next(v for v in values if v in seen or seen.add(v))
            self.fail(f"{key}.values", f"value {duplicate!r} appears more than once (one id per value)")
        if len(values) + 1 != feature.vocab_size:
            self.fail(f"{key}.values", f"{len(values)} values give {len(values) + 1} ids (with id 0 for unseen "
                                       f"values), but feature {name!r} has vocab_size {feature.vocab_size}: the "
                                       "vocabulary and the model disagree")
        min_freq, max_size = state["min_freq"], state["max_size"]
        if not _is_int(min_freq) or min_freq < 1:
            self.fail(f"{key}.min_freq", f"expected an integer >= 1, got {_kind(min_freq)}")
        if max_size is not None and (not _is_int(max_size) or max_size < 1):
            self.fail(f"{key}.max_size", f"expected null or an integer >= 1, got {_kind(max_size)}")
        if max_size is not None and len(values) > max_size:
            self.fail(f"{key}.values", f"{len(values)} values, more than max_size {max_size}")
        counts = state.get("counts")
        if counts is not None:
            if not isinstance(counts, list) or len(counts) != len(values):
                self.fail(f"{key}.counts", f"expected a list of {len(values)} counts (one per value), got "
                                           f"{_kind(counts)}" + (f" of {len(counts)}" if isinstance(counts, list) else ""))
            bad = next((i for i, c in enumerate(counts) if not _is_int(c) or c < 0), None)
            if bad is not None:
                self.fail(f"{key}.counts[{bad}]", f"expected an integer >= 0, got {_kind(counts[bad])}")

    def numbers(self, key: str, values: Any, dim: int) -> list[float]:
        if not isinstance(values, list) or len(values) != dim:
            self.fail(key, f"expected a list of {dim} number(s) (one per dimension), got {_kind(values)}"
                           + (f" of {len(values)}" if isinstance(values, list) else ""))
        for i, value in enumerate(values):
            if not _is_number(value):
                self.fail(f"{key}[{i}]", f"expected a number, got {_kind(value)}")
            if not math.isfinite(value):
                self.fail(f"{key}[{i}]", f"{value} is not finite: every served value of the column would be NaN")
        return values

    def normalization(self, key: str, name: str, state: Any, features: Mapping[str, Feature]) -> None:
        feature = features.get(name)
        if not isinstance(feature, DenseFeature):
            self.fail(key, f"normalises column {name!r}, which is not a dense feature of the file (dense features: "
                           f"{sorted(n for n, f in features.items() if isinstance(f, DenseFeature))})")
        self.keys(key, state, ("dim", "mean", "std"))
        if not _is_int(state["dim"]) or state["dim"] != feature.dim:
            self.fail(f"{key}.dim", f"expected {feature.dim} (feature {name!r} has dim {feature.dim}), got "
                                    f"{_kind(state['dim'])}")
        self.numbers(f"{key}.mean", state["mean"], feature.dim)
        for i, std in enumerate(self.numbers(f"{key}.std", state["std"], feature.dim)):
            if std <= 0:
                effect = "divides by zero (inf or NaN inputs)" if std == 0 else "flips the sign of the input"
                self.fail(f"{key}.std[{i}]", f"must be > 0, got {std}: (x - mean) / std {effect}")

    def fill(self, key: str, name: str, state: Any, features: Mapping[str, Feature]) -> None:
        feature = features.get(name)
        if not isinstance(feature, DenseFeature) or feature.dim != 1:
            self.fail(key, f"fills column {name!r}, which is not a dense feature of one value of the file (dense: "
                           f"{sorted(n for n, f in features.items() if isinstance(f, DenseFeature) and f.dim == 1)})")
        self.keys(key, state, ("fill", "value", "indicator"))
        fill, value = state["fill"], state["value"]
        if fill != "mean" and not (_is_number(fill) and math.isfinite(fill)):
            self.fail(f"{key}.fill", f"expected a finite number or 'mean', got {_kind(fill)}")
        if not _is_number(value) or not math.isfinite(value):
            self.fail(f"{key}.value", f"expected a finite number (the value filled in), got {_kind(value)}")
        if fill != "mean" and value != fill:
            self.fail(f"{key}.value", f"{value} differs from the constant fill {fill}")
        if not isinstance(state["indicator"], bool):
            self.fail(f"{key}.indicator", f"expected true or false, got {_kind(state['indicator'])}")


__all__ = ["Preprocessor", "preprocessing_state", "PREPROCESSING_FORMAT", "check_preprocessing_state",
           "model_fingerprint", "open_served", "preprocessing_fingerprint"]
