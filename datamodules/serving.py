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
as the exported model does. A sequence is a list column (a list per row, any
length): padded with 0 and truncated to its first ``max_len`` values as in
training; a raw categorical list column (``categorical=``, or sharing another
column's vocabulary with ``vocabulary_of``) is encoded value by value with its
vocabulary, an unseen or null value becoming 0 (padding) in place. A missing column, a wrong type or a missing dense
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
                                                        # or "model.pt2" / "model.aoti.pt2": called as model(features)
    outputs = session.run(None, preprocess.numpy(rows))

``Preprocessor`` validates the whole state before use (see
:func:`check_preprocessing_state`): every key and type, the statistics (a
finite mean, a finite std > 0), each encoder against its feature (a vocabulary
of ``vocab_size - 1`` values, as a list; ``num_buckets == vocab_size``); a
problem is a ``ValueError`` naming the file, the key (its JSON path, e.g.
``normalization.age.std[0]``) and what is wrong.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from mtl_lightning.export import FINGERPRINT_FILE, FINGERPRINT_METADATA_KEY, preprocessing_fingerprint, preprocessing_path
from mtl_lightning.exported_program import CompiledProgram
from mtl_lightning.features import Feature, SequenceFeature, SparseFeature, feature_from_config, feature_to_config

from .encoders import DenseNormalizer, encoders_from_state, filler_from_state, is_list_type, map_list_values
from .serving_checks import PREPROCESSING_FORMAT, check_preprocessing_state
from .store import TableConverter



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


def _known_ids(ids: Any, vocab_size: int) -> Any:
    """Integer ids with those outside ``[0, vocab_size)`` replaced by 0 (nulls kept: the converter reports them)."""
    known = pc.and_(pc.greater_equal(ids, 0), pc.less(ids, vocab_size))
    return pc.if_else(pc.fill_null(known, True), ids, pa.scalar(0, ids.type))


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
        self.encoders = encoders_from_state(state.get("encoders", {}))
        self.normalizers = {}
        for name, s in state.get("normalization", {}).items():
            self.normalizers[name] = DenseNormalizer(name, int(s["dim"]))
            self.normalizers[name].load_state_dict(s)
        self.fillers = {name: filler_from_state(name, s) for name, s in state.get("fill_missing", {}).items()}
        self._convert = TableConverter(self.features, (), encoders=self.encoders, normalizers=self.normalizers,
                                       fillers=self.fillers)
        self._pass_through = {f.name: f.vocab_size for f in self.features
                              if isinstance(f, (SparseFeature, SequenceFeature)) and f.name not in self.encoders}

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
            if name not in table.column_names:
                continue
            column = table.column(name)
            if pa.types.is_integer(column.type):
                table = table.set_column(table.column_names.index(name), name, _known_ids(column, vocab_size))
            elif is_list_type(column.type) and pa.types.is_integer(column.type.value_type):
                table = table.set_column(table.column_names.index(name), name,
                                         map_list_values(column, lambda ids: _known_ids(ids, vocab_size)))
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

    ``model``: a path to an ONNX file (read from its ``metadata_props``), a
    TorchScript file (its extra file ``preprocessing_fingerprint``; the
    ``model.preprocessing.pt`` of ``export_torchscript`` carries it too), an
    exported program ``*.pt2`` (the same extra file) or an AOTInductor package
    ``*.aoti.pt2`` (its metadata), or an ``onnxruntime.InferenceSession``.
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
    if path.suffix == ".pt2":  # an exported program or AOTInductor package (zip files too)
        return _load_program(path)[1]
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
    with ``providers``, default CPU), a TorchScript file (``torch.jit.load``,
    on CPU), an exported program ``*.pt2`` (its ``torch.export`` module) or an
    AOTInductor package ``*.aoti.pt2`` (a
    ``mtl_lightning.exported_program.CompiledProgram``); the last two are told
    apart from TorchScript (also a zip archive) by their suffix, as
    ``export_program`` names them. ``preprocessing``: the preprocessing file, by
    default the ``<name>.preprocessing.json`` its export wrote beside it (for
    ``model.aoti.pt2``, the ``model.preprocessing.json`` of its program). A pair whose
    fingerprints differ, or a model without one, is refused with a
    ``ValueError`` naming both files (see the module docstring).
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"{model_path}: no such model file")
    if preprocessing is None:
        program = model_path.with_name(model_path.name.removesuffix(".aoti.pt2") + ".pt2")
        preprocessing = preprocessing_path(program if model_path.name.endswith(".aoti.pt2") else model_path)
    preprocessing = Path(preprocessing)
    if not preprocessing.is_file():
        raise ValueError(f"{preprocessing}: no such preprocessing file (the export of {model_path} writes it beside "
                         "the model; give preprocessing= if it is elsewhere)")
    preprocessor = Preprocessor.load(preprocessing)
    if model_path.suffix == ".pt2":
        model, fingerprint = _load_program(model_path)
        preprocessor._check_fingerprint(fingerprint, str(model_path))
        return model, preprocessor
    if zipfile.is_zipfile(model_path):
        model, fingerprint = _load_torchscript(model_path)
        preprocessor._check_fingerprint(fingerprint, str(model_path))
        return model, preprocessor
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=list(providers or ["CPUExecutionProvider"]))
    preprocessor._check_fingerprint(model_fingerprint(session), str(model_path))
    return session, preprocessor


def _load_program(path: Path) -> tuple[Any, str | None]:
    """``(callable, its preprocessing fingerprint or None)`` of an exported program (``*.pt2``) or an AOTInductor
    package (``*.aoti.pt2``), both written by ``mtl_lightning.export.export_program``."""
    try:
        if path.name.endswith(".aoti.pt2"):
            package = CompiledProgram(path)
            return package, package.get_metadata().get(FINGERPRINT_FILE) or None
        extra: dict[str, Any] = {FINGERPRINT_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(str(path), extra_files=extra).module()
    except Exception as error:  # torch raises RuntimeError, KeyError, ... for a file that is not a program
        raise ValueError(f"{path}: not an exported program or AOTInductor package written by export_program "
                         f"({type(error).__name__}: {error})") from None
    value = extra[FINGERPRINT_FILE]
    return module, (value.decode("ascii", "replace") if isinstance(value, bytes) else value) or None


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


__all__ = ["Preprocessor", "preprocessing_state", "PREPROCESSING_FORMAT", "check_preprocessing_state",
           "model_fingerprint", "open_served", "preprocessing_fingerprint"]
