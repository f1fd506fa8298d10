"""Export a trained architecture for serving: ONNX and TorchScript.

Both exports compute the same thing as ``MultiTaskLightningModule.predict_step``:
one output per task (and per extra output of the architecture, such as
ESMM's ``cvr``), the probability (``sigmoid`` of the logit) for binary
tasks and the value for regression tasks, in evaluation mode. A module with
a calibration attached (``mtl_lightning.calibration.calibrate``) exports its
calibrated probabilities (isotonic maps as a lookup of their knots).

* :func:`export_onnx` writes an ONNX graph whose inputs are the feature
  columns, named after the features in the architecture's feature order
  (``(batch,)`` int64 for sparse, ``(batch,)`` or ``(batch, dim)`` float32
  for dense, ``(batch, max_len)`` int64 for sequences), and whose outputs are
  named after the tasks, each ``(batch,)`` float32. The batch dimension is
  dynamic.
* :func:`export_torchscript` writes a traced TorchScript module called as
  ``module(features: dict[str, Tensor]) -> dict[str, Tensor]`` (task -> ``(B,)``).
  It is a frozen copy: its parameters do not require gradients, so its
  outputs are plain tensors (``out["click"].numpy()`` works).

Sequence encoders (``pooling="din"``, ``"attention"``, ``"transformer"``,
groups of aligned sequences) and interactions (``interaction="dcn_v2"`` ...)
are modules of the input layer and export with it; padding is masked inside
the graph. A sequence input is ``(batch, max_len)``, right-padded with 0, as
the data module pads and truncates it (its first ``max_len`` ids).

Out-of-vocabulary ids. Training refuses an id outside ``[0, vocab_size)`` (the
data module and the embedding layer check it), but a serving system sees ids
that training never did: new users and items, or ids from another encoding.
The embedding layer keeps the tables of several features as blocks of one
fused weight, where such an id would silently read another feature's rows.
So both exports map every id of a sparse or sequence feature that is ``< 0`` or
``>= vocab_size`` (of the feature, and of the table it reads with
``shared_with``, whichever is smaller) to id 0 before the architecture runs: an
out-of-range id gives exactly the output of id 0. In a sequence id 0 is padding,
so the sequence pools over its other ids. For a sparse feature encoded by
``ParquetDataModule(categorical=...)`` id 0 is already the unseen/rare/null
value, so an unknown id is served as such; with ids encoded elsewhere, reserve
id 0 for "unknown" to get the same. PyTorch code (``predict_step``) keeps
refusing such ids.

Preprocessing. Next to ``model.onnx`` / ``model.pt`` both exports write
``model.preprocessing.json``: the model's feature specs (its inputs, in order)
and, given the data module (``datamodule=``: a ``ParquetDataModule`` or its
``state_dict()``), what it fitted on the train split -- vocabularies, hashing
parameters, normalisation statistics and missing-value fills.
``datamodules.serving.Preprocessor`` applies that file to raw rows (strings,
nulls, NaN) with the data module's own converter, so served outputs equal
``trainer.predict``'s. ``export_torchscript`` also writes
``model.preprocessing.pt``, the same transform as a TorchScript module
(:class:`ScriptedPreprocessing`): vocabularies, integer hashing, fills and
normalisation, raw list columns (ragged lists, padded and truncated to
``max_len`` as in training, encoded by their vocabulary or by the one they
share with ``vocabulary_of``); a column hashed from strings (pandas' SipHash, which TorchScript
does not have) is refused there with a message pointing to the Python
``Preprocessor``.

Fingerprint. A preprocessing file belongs to one model: after a capped
vocabulary evicted a value, yesterday's file would serve today's model with
the same vocabulary size but another value behind an id. Both exports compute
:func:`preprocessing_fingerprint` of what they write -- a SHA-256 over the
canonical JSON (sorted keys, no whitespace) of the feature specs (in input
order), the encoders' states without their bookkeeping ``counts``, the
normalisation statistics and the fills -- and store it in the preprocessing
file (key ``"fingerprint"``), in the ONNX model's ``metadata_props`` (key
``mtl_lightning.preprocessing_fingerprint``, read by
``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``) and
in both TorchScript files (``model.pt`` and ``model.preprocessing.pt``) as the
extra file ``preprocessing_fingerprint`` (``torch.jit.load(path,
_extra_files={"preprocessing_fingerprint": ""})``; C++'s ``torch::jit::load``
reads extra files too). ``datamodules.serving.open_served(model_path)`` opens
a model with the file beside it and refuses a pair whose fingerprints differ.

Smaller and verified. ``table_dtype="float16" | "int8"`` (row-wise INT8, dequantized
at lookup) and ``dense_dtype="float16"``: :mod:`mtl_lightning.quantized`.
:func:`export_program` writes a ``torch.export`` program, AOTInductor-compiled where a
compiler is present: :mod:`mtl_lightning.exported_program`. Every export writes a
verification report beside its model and can fail on thresholds:
:mod:`mtl_lightning.verification`.

Example::

    from mtl_lightning.export import export_onnx, export_torchscript
    module = MultiTaskLightningModule.load_from_checkpoint("last.ckpt")
    export_onnx(module, "model.onnx", datamodule=dm)       # onnxruntime: sess.run(None, {"user_id": ids, ...})
    export_torchscript(module, "model.pt", datamodule=dm)  # torch.jit.load("model.pt")({"user_id": ids, ...})

or from a checkpoint on the command line (the checkpoint holds the data module's state)::

    python -m mtl_lightning.export path/to/last.ckpt --onnx model.onnx --torchscript model.pt
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .features import Feature
from .exported_program import FINGERPRINT_FILE, compiled_path, write_program
from .quantized import DENSE_DTYPES, TABLE_DTYPES, check_dtypes, serving_copy
from .scripted_preprocessing import ScriptedPreprocessing
from .serving_model import ServingModel, _architecture, example_features, id_limits, preprocessing_path
from .verification import ExportVerificationError, Verification, report_path, verify_export


# where the exported files keep the preprocessing fingerprint (see the module docstring)
FINGERPRINT_METADATA_KEY = "mtl_lightning.preprocessing_fingerprint"  # ONNX metadata_props
# FINGERPRINT_FILE (imported above): the extra file of the TorchScript and exported-program files
_FINGERPRINTED = ("features", "encoders", "normalization", "fill_missing")


def preprocessing_fingerprint(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a preprocessing state's canonical JSON: what serving applies, nothing else.

    Covered: ``features`` (in order), ``encoders`` (each state without its
    ``counts``, which only rank values when a capped vocabulary grows),
    ``normalization`` and ``fill_missing``; keys sorted, no whitespace. The
    file's ``format`` and ``fingerprint`` keys and a data module's other keys
    are not covered. Equal fingerprints mean the same mapping from raw rows to
    the model's inputs.
    """
    content = {part: state.get(part) or ({} if part != "features" else []) for part in _FINGERPRINTED}
    content["encoders"] = {name: {k: v for k, v in encoder.items() if k != "counts"} if isinstance(encoder, Mapping)
                           else encoder for name, encoder in dict(content["encoders"]).items()}
    try:
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"the preprocessing state holds NaN or infinite numbers ({error}); it cannot be served") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


class _PositionalServingModel(ServingModel):
    """ONNX takes positional inputs and gives a tuple of outputs: one per feature / task, in order."""

    def forward(self, *columns: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        outputs = super().forward(dict(zip(self.feature_names, columns)))
        return tuple(outputs[name] for name in self.binary)


def _preprocessing_file(features: list[Feature], datamodule: Any) -> dict[str, Any]:
    """The preprocessing file's content, from the data module (duck-typed) or a data module ``state_dict()``.

    A data module gives it through its ``preprocessing_state(features)``
    method (``datamodules.base.MultiTaskDataModule`` has one). A state dict
    (``None``: no data module; a data module without that method gives its
    ``state_dict()``) is read by the default data module class,
    ``ParquetDataModule``, named by class path (``mtl_lightning`` never imports
    ``datamodules``): its ``preprocessing_file(features, state)``.
    """
    method = getattr(datamodule, "preprocessing_state", None)
    if datamodule is not None and not isinstance(datamodule, Mapping) and callable(method):
        return dict(method(features))
    if datamodule is not None and not isinstance(datamodule, Mapping) and callable(getattr(datamodule, "state_dict", None)):
        datamodule = datamodule.state_dict()  # a data module without the method: its state, read as below
    if datamodule is None or isinstance(datamodule, Mapping):
        import lightning as L

        from .config import DEFAULT_DATAMODULE, default_class

        reader = default_class(DEFAULT_DATAMODULE, L.LightningDataModule, "datamodule")
        return dict(reader.preprocessing_file(features, dict(datamodule or {})))
    raise TypeError(f"datamodule must be a data module with a preprocessing_state(features) method (such as "
                    f"ParquetDataModule) or its state_dict(), got {type(datamodule).__name__}")


def write_preprocessing(model: nn.Module, path: str | Path, datamodule: Any = None) -> Path:
    """Write ``model.preprocessing.json`` next to the model file ``path``, with its ``"fingerprint"``; see the module docstring."""
    state = _preprocessing_file(list(_architecture(model).features), datamodule)
    state["fingerprint"] = preprocessing_fingerprint(state)
    target = preprocessing_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(state, allow_nan=False))
    return target


def _add_onnx_fingerprint(path: Path, fingerprint: str) -> None:
    """Store ``fingerprint`` in the ONNX model's ``metadata_props`` (key ``FINGERPRINT_METADATA_KEY``)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # weights in external files stay where they are
    for entry in list(proto.metadata_props):
        if entry.key == FINGERPRINT_METADATA_KEY:
            proto.metadata_props.remove(entry)
    entry = proto.metadata_props.add()
    entry.key, entry.value = FINGERPRINT_METADATA_KEY, fingerprint
    onnx.save(proto, str(path))


def export_onnx(
    model: nn.Module, path: str | Path, example: Mapping[str, Tensor] | None = None, opset_version: int = 17,
    datamodule: Any = None, table_dtype: str = "float32", dense_dtype: str = "float32",
    verification: Verification | Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (architecture or Lightning module) as ONNX to ``path``, its preprocessing and its
    verification report beside it.

    ``datamodule``: the ``ParquetDataModule`` it was trained with (or its ``state_dict()``); see the module docstring.
    ``table_dtype`` / ``dense_dtype``: see :mod:`mtl_lightning.quantized`; ``verification``: see
    :mod:`mtl_lightning.verification` (an export above a threshold raises ``ExportVerificationError``).
    """
    check_dtypes(table_dtype, dense_dtype)
    fingerprint = json.loads(write_preprocessing(model, path, datamodule).read_text())["fingerprint"]
    serving = serving_copy(_PositionalServingModel(model), table_dtype, dense_dtype)
    example = dict(example) if example is not None else example_features(serving.model.features)
    missing = [n for n in serving.feature_names if n not in example]
    if missing:
        raise ValueError(f"the example batch lacks features {missing}")
    args = tuple(example[n] for n in serving.feature_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            serving,
            args,
            str(path),
            input_names=serving.feature_names,
            output_names=list(serving.binary),
            dynamic_axes={name: {0: "batch"} for name in [*serving.feature_names, *serving.binary]},
            opset_version=opset_version,
            dynamo=False,
            do_constant_folding=dense_dtype == "float32",  # folding would store float16 weights' casts as float32
        )
    _add_onnx_fingerprint(path, fingerprint)
    verify_export(model, path, "onnx", datamodule, verification, table_dtype, dense_dtype)
    return path


def export_torchscript(
    model: nn.Module, path: str | Path, example: Mapping[str, Tensor] | None = None, datamodule: Any = None,
    table_dtype: str = "float32", dense_dtype: str = "float32",
    verification: Verification | Mapping[str, Any] | None = None,
) -> Path:
    """Trace ``model`` (architecture or Lightning module) and save it as TorchScript to ``path``, its preprocessing
    and its verification report beside it.

    ``datamodule``: the ``ParquetDataModule`` it was trained with (or its ``state_dict()``); see the module docstring.
    ``table_dtype``, ``dense_dtype``, ``verification``: as for :func:`export_onnx`.
    """
    check_dtypes(table_dtype, dense_dtype)
    state = json.loads(write_preprocessing(model, path, datamodule).read_text())
    extra_files = {FINGERPRINT_FILE: state["fingerprint"]}
    scripted_path = preprocessing_path(path, ".pt")
    torch.jit.script(ScriptedPreprocessing(state)).save(str(scripted_path), _extra_files=extra_files)
    # a frozen copy: the saved module's outputs then do not require gradients (the given model is left as it is)
    serving = serving_copy(ServingModel(model), table_dtype, dense_dtype)
    example = dict(example) if example is not None else example_features(serving.model.features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(serving, (example,), strict=False, check_trace=False)
    traced.save(str(path), _extra_files=extra_files)
    verify_export(model, path, "torchscript", datamodule, verification, table_dtype, dense_dtype)
    return path


def export_program(
    model: nn.Module, path: str | Path, example: Mapping[str, Tensor] | None = None, datamodule: Any = None,
    table_dtype: str = "float32", dense_dtype: str = "float32",
    verification: Verification | Mapping[str, Any] | None = None, compile: bool = True,
) -> Path:
    """``torch.export`` ``model`` to ``path`` (``model.pt2``) and, with ``compile`` and a C++ compiler, AOTInductor
    it to ``model.aoti.pt2`` (:mod:`mtl_lightning.exported_program`); preprocessing and report beside them (the
    report measures the package where there is one). Arguments as for :func:`export_onnx`.
    """
    check_dtypes(table_dtype, dense_dtype)
    fingerprint = json.loads(write_preprocessing(model, path, datamodule).read_text())["fingerprint"]
    example = dict(example) if example is not None else example_features(_architecture(model).features)
    compiled = write_program(model, path, example, fingerprint, table_dtype, dense_dtype, compile)
    verify_export(model, path, "program", datamodule, verification, table_dtype, dense_dtype, served_path=compiled)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl_lightning.export CKPT [--onnx PATH] [--torchscript PATH] [--program PATH] [options]``."""
    import argparse

    from .module import MultiTaskLightningModule

    parser = argparse.ArgumentParser(description="Export a MultiTaskLightningModule checkpoint for serving; each "
                                                 "export writes its preprocessing and a verification report beside it.")
    parser.add_argument("checkpoint", help="a checkpoint written by training (e.g. by mtl-lightning fit)")
    parser.add_argument("--onnx", help="where to write the ONNX file")
    parser.add_argument("--torchscript", help="where to write the TorchScript file")
    parser.add_argument("--program", help="where to write the torch.export program (.pt2; AOTInductor: .aoti.pt2)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--table-dtype", default="float32", choices=TABLE_DTYPES, help="embedding tables (default float32)")
    parser.add_argument("--dense-dtype", default="float32", choices=DENSE_DTYPES, help="other weights (default float32)")
    parser.add_argument("--split", help="Parquet file/folder/glob the report compares on (default: no labelled rows)")
    parser.add_argument("--max-auc-drop", type=float, help="fail the export when a task's AUC drops by more")
    parser.add_argument("--max-probability-difference", type=float, help="fail when a probability moves by more")
    parser.add_argument("--latency-runs", type=int, default=100, help="timed calls per batch size in the report")
    parser.add_argument("--no-compile", action="store_true", help="write the .pt2 program without AOTInductor")
    args = parser.parse_args(argv)
    if not (args.onnx or args.torchscript or args.program):
        parser.error("give --onnx, --torchscript and/or --program")
    module = MultiTaskLightningModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    data_state = checkpoint.get("ParquetDataModule") if isinstance(checkpoint, dict) else None
    options = dict(datamodule=data_state, table_dtype=args.table_dtype, dense_dtype=args.dense_dtype,
                   verification=Verification(split=args.split, max_auc_drop=args.max_auc_drop,
                                             max_probability_difference=args.max_probability_difference,
                                             latency_runs=args.latency_runs))
    if args.onnx:
        print(f"ONNX: {export_onnx(module, args.onnx, opset_version=args.opset, **options)}")
        print(f"preprocessing: {preprocessing_path(args.onnx)}; report: {report_path(args.onnx, '.md')}")
    if args.torchscript:
        print(f"TorchScript: {export_torchscript(module, args.torchscript, **options)}")
        print(f"preprocessing: {preprocessing_path(args.torchscript)}"
              + (f", {preprocessing_path(args.torchscript, '.pt')}"
                 if preprocessing_path(args.torchscript, ".pt").exists() else "")
              + f"; report: {report_path(args.torchscript, '.md')}")
    if args.program:
        print(f"program: {export_program(module, args.program, compile=not args.no_compile, **options)}"
              + (f", compiled: {compiled_path(args.program)}" if compiled_path(args.program).exists() else ""))
        print(f"preprocessing: {preprocessing_path(args.program)}; report: {report_path(args.program, '.md')}")


__all__ = ["export_onnx", "export_torchscript", "export_program", "ServingModel", "ScriptedPreprocessing", "example_features", "id_limits",
           "preprocessing_path", "write_preprocessing", "preprocessing_fingerprint", "FINGERPRINT_METADATA_KEY",
           "FINGERPRINT_FILE", "Verification", "ExportVerificationError", "TABLE_DTYPES", "DENSE_DTYPES"]


if __name__ == "__main__":
    main()
