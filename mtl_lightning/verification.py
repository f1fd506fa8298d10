"""The verification report every export writes beside its model: does the exported file still predict what the
float32 PyTorch model predicts, how big is it, how fast does it serve?

:func:`verify_export` runs the exported file in the runtime it is served with (``onnxruntime`` for ``.onnx``,
``torch.jit.load`` for TorchScript ``.pt``, the AOTInductor package or ``torch.export.load`` for ``.pt2``) and the
float32 PyTorch model (``ServingModel``: ``predict``'s outputs) on the same rows, and writes
``<model file>.verification.json`` and ``<model file>.verification.md`` (``model.onnx`` ->
``model.onnx.verification.json``) holding:

* per output: the largest absolute difference between the two (probabilities for binary outputs and for each
  class of a multi-class output, values for regression ones); per task with labels: AUC, log-loss and PCOC (sum
  of probabilities / sum of labels) of both models and the AUC drop (PyTorch's AUC minus the export's) for binary
  tasks, macro one-vs-rest AUC, log-loss, accuracy and the AUC drop for multi-class tasks, the MSE of both for
  regression ones. Rows whose label is NaN or the module's ``ignore_label`` (``-1`` for an architecture), for a
  binary task any label but 0 and 1, for a multi-class task any label but a class id, are left out of a task's
  metrics;
* the file's size in bytes, the table and dense dtypes;
* latency per call, p50 and p99 in milliseconds, for batch sizes 1, 64 and 512 (``latency_batch_sizes``) with
  one thread (``onnxruntime`` with one intra- and inter-op thread, torch with ``torch.set_num_threads(1)``), over
  ``latency_runs`` calls after 5 warm-up calls, on generated in-vocabulary rows (``export.example_features``).

The rows (``Verification.split``): ``None`` (default) reads the data module's test split (``datamodule=``, a
data module object that has one); ``"train"`` / ``"val"`` / ``"test"`` names a split of that data module; a path
(file, folder or glob) of Parquet files is read with the preprocessing file the export wrote beside the model
(``datamodules.serving.Preprocessor``, raw columns as serving sees them) with the labels from each task's
``label`` column; an iterable of batches ``{"features": {...}, "labels": {...}}`` is used as given. Without any
(no data module, or one without a test split) 512 generated rows are compared, without labels (no AUC).

Thresholds fail the export: with ``max_auc_drop`` (a task's AUC drop above it), ``max_probability_difference``
(a binary or multi-class output's largest difference above it) or ``max_value_difference`` (a regression
output's), an export that exceeds one renames its model file to ``<stem>.rejected<suffix>`` (so nothing serves it
by its name), keeps the report, and raises :class:`ExportVerificationError` naming each failure and the report.
"""

from __future__ import annotations

import glob
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .serving_model import ServingModel, example_features, preprocessing_path

SPLITS = ("train", "val", "test", "predict")
WARMUP_CALLS = 5
UNLABELLED_ROWS = 512


@dataclass(frozen=True)
class Verification:
    """What the verification report of an export compares on, and the thresholds that fail the export.

    See the module docstring. ``latency_batch_sizes=()`` skips the latency measurement; ``rows_per_call`` is
    how many rows of a Parquet split go through the models per call.
    """

    split: Any = None
    max_auc_drop: float | None = None
    max_probability_difference: float | None = None
    max_value_difference: float | None = None
    latency_batch_sizes: tuple[int, ...] = (1, 64, 512)
    latency_runs: int = 100
    rows_per_call: int = 4096
    thresholds: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in ("max_auc_drop", "max_probability_difference", "max_value_difference")}
        for key, value in given.items():
            if value is not None and (not isinstance(value, (int, float)) or not value >= 0):
                raise ValueError(f"Verification: {key} must be a number >= 0, got {value!r}")
        if any(not isinstance(b, int) or b < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"Verification: latency_batch_sizes must be positive integers, got {self.latency_batch_sizes!r}")
        if self.latency_runs < 1:
            raise ValueError(f"Verification: latency_runs must be >= 1, got {self.latency_runs!r}")
        object.__setattr__(self, "thresholds", {k: float(v) for k, v in given.items() if v is not None})

    @classmethod
    def of(cls, value: "Verification | Mapping[str, Any] | None") -> "Verification":
        """``value`` as a ``Verification`` (``None``: the defaults; a mapping: its keyword arguments)."""
        if value is None:
            return cls()
        if isinstance(value, Verification):
            return value
        if isinstance(value, Mapping):
            return cls(**dict(value))
        raise TypeError(f"verification must be a Verification, a dict of its arguments or None, got {type(value).__name__}")


class ExportVerificationError(ValueError):
    """An export's verification exceeded a threshold; the message names each failure and the report."""


def report_path(path: str | Path, suffix: str = ".json") -> Path:
    """Where the report of the model file ``path`` goes: ``model.onnx`` -> ``model.onnx.verification.json``."""
    path = Path(path)
    return path.with_name(f"{path.name}.verification{suffix}")


def rejected_path(path: str | Path) -> Path:
    """Where a model file that failed its verification is moved: ``model.onnx`` -> ``model.rejected.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rejected{path.suffix}")


# ------------------------------------------------------------------ runtimes
@contextmanager
def one_torch_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside, the previous setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Runtime:
    """An exported file opened in the runtime it is served with: ``prepare`` converts a feature batch to the
    runtime's inputs (outside the timed call), ``run`` calls the model, ``outputs`` makes numpy arrays."""

    description: str
    prepare: Callable[[Mapping[str, Tensor]], Any]
    run: Callable[[Any], Any]
    outputs: Callable[[Any], dict[str, np.ndarray]]

    def __call__(self, features: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        return self.outputs(self.run(self.prepare(features)))


def open_runtime(path: str | Path, kind: str, feature_names: list[str] | None = None) -> Runtime:
    """The runtime of an export ``kind`` (``"onnx"``, ``"torchscript"``, ``"program"``) at ``path``, one thread.

    A program takes exactly the model's features, no other key: ``feature_names`` (default: the batch as given).
    """
    path = Path(path)
    if kind == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the verification report runs an ONNX export in onnxruntime, which is not installed: "
                              "install the onnxruntime package") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        names = [o.name for o in session.get_outputs()]
        return Runtime(f"onnxruntime {ort.__version__} (CPUExecutionProvider), 1 thread",
                       lambda batch: {n: np.ascontiguousarray(batch[n].numpy()) for n in inputs},
                       lambda feed: session.run(None, feed),
                       lambda out: dict(zip(names, out)))
    if kind in ("torchscript", "program"):
        if kind == "torchscript":
            served, description = torch.jit.load(str(path)), "TorchScript (torch.jit.load)"
        else:
            from .exported_program import load_program

            served = load_program(path)
            description = ("AOTInductor package (aoti_load_package)" if path.name.endswith(".aoti.pt2")
                           else "exported program (torch.export.load(...).module())")

        def run(batch: Mapping[str, Tensor]) -> Any:
            with torch.no_grad(), one_torch_thread():
                return served(dict(batch))

        def prepare(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:  # a compiled package needs contiguous inputs
            names = list(batch) if feature_names is None or kind == "torchscript" else feature_names
            return {n: batch[n].contiguous() if kind == "program" else batch[n] for n in names}

        return Runtime(f"torch {torch.__version__}, {description}, 1 thread", prepare, run,
                       lambda out: {k: v.detach().numpy() for k, v in out.items()})
    raise ValueError(f"unknown export kind {kind!r}: one of 'onnx', 'torchscript', 'program'")


def latency(runtime: Runtime, features: tuple, batch_sizes: Iterable[int], runs: int) -> dict[str, dict[str, float]]:
    """``{batch size: {"p50": ms, "p99": ms}}`` of ``runtime``'s calls on generated rows (see the module docstring)."""
    result = {}
    for batch_size in batch_sizes:
        prepared = runtime.prepare(example_features(features, batch_size=batch_size, seed=batch_size))
        for _ in range(WARMUP_CALLS):
            runtime.run(prepared)
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            runtime.run(prepared)
            times[i] = time.perf_counter() - start
        result[str(batch_size)] = {"p50": float(np.percentile(times, 50) * 1e3), "p99": float(np.percentile(times, 99) * 1e3)}
    return result


# ------------------------------------------------------------------ rows
def _parquet_batches(split: str | Path, preprocessing: Path, labels: Mapping[str, str],
                     rows_per_call: int) -> Iterator[dict[str, Any]]:
    """Batches of the Parquet file / folder / glob ``split``, through the export's preprocessing file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .config import default_class

    text = str(split)
    files = sorted(glob.glob(text)) if any(c in text for c in "*?[") else [text]
    if not files or not all(Path(f).exists() for f in files):
        raise ValueError(f"verification split {text!r}: no such Parquet file, folder or glob match")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    missing = {task: column for task, column in labels.items() if column not in table.column_names}
    if missing:
        raise ValueError(f"verification split {text!r} has no label column for tasks {missing} "
                         f"(task: column); its columns are {table.column_names}")
    preprocess = default_class("datamodules.serving.Preprocessor", object, "preprocessor").load(preprocessing)
    for start in range(0, table.num_rows, rows_per_call):
        part = table.slice(start, rows_per_call)
        yield {"features": preprocess(part),
               "labels": {task: torch.from_numpy(part.column(column).to_numpy(zero_copy_only=False).astype(np.float32))
                          for task, column in labels.items()}}


def labelled_batches(split: Any, datamodule: Any, preprocessing: Path, labels: Mapping[str, str],
                     rows_per_call: int) -> tuple[Iterable[Mapping[str, Any]] | None, str]:
    """The batches to compare on and a description of them; ``None`` when there are none (see the module docstring)."""
    is_module = datamodule is not None and not isinstance(datamodule, Mapping)
    if split is None:
        paths = getattr(datamodule, "paths", None)
        if is_module and callable(getattr(datamodule, "test_dataloader", None)) and (
                not isinstance(paths, Mapping) or paths.get("test") is not None):
            split = "test"
        else:
            return None, f"no labelled split (give split= or a data module with a test split): {UNLABELLED_ROWS} generated rows"
    if isinstance(split, str) and split in SPLITS:
        if not is_module:
            raise ValueError(f"verification split {split!r} names a data module split, but no data module object was "
                             "given (datamodule=); give one, or a path of Parquet files")
        return getattr(datamodule, f"{split}_dataloader")(), f"the data module's {split} split"
    if isinstance(split, (str, Path)):
        return _parquet_batches(split, preprocessing, labels, rows_per_call), f"Parquet {split}"
    if isinstance(split, Mapping):
        split = [split]
    if isinstance(split, Iterable):
        batches = list(split)
        if not all(isinstance(b, Mapping) and "features" in b for b in batches):
            raise TypeError("verification split: every given batch must be a dict with 'features' (and 'labels')")
        return batches, f"{len(batches)} given batch(es)"
    raise TypeError(f"verification split must be None, a split name {list(SPLITS)}, a Parquet path or batches, "
                    f"got {type(split).__name__}")


# ------------------------------------------------------------------ metrics
def _binary_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    from torchmetrics.functional.classification import binary_auroc

    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    both = 0 < labels.sum() < len(labels)
    auc = float(binary_auroc(torch.from_numpy(probabilities), torch.from_numpy(labels.astype(np.int64)))) if both else None
    log_loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p))) if len(labels) else None
    pcoc = float(probabilities.sum() / labels.sum()) if labels.sum() > 0 else None
    return {"auc": auc, "log_loss": log_loss, "pcoc": pcoc}


def _multiclass_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Macro one-vs-rest AUC (None with fewer than two classes), log-loss and accuracy of ``(N, K)`` probabilities."""
    from .metrics.multiclass import macro_auroc

    classes = labels.astype(np.int64)
    if not len(classes):
        return {"auc": None, "log_loss": None, "accuracy": None}
    auc = None
    if len(np.unique(classes)) > 1:
        auc = float(macro_auroc(torch.from_numpy(probabilities), torch.from_numpy(classes)))
    chosen = np.clip(probabilities[np.arange(len(classes)), classes].astype(np.float64), 1e-7, 1.0)
    return {"auc": auc, "log_loss": float(-np.mean(np.log(chosen))),
            "accuracy": float(np.mean(probabilities.argmax(axis=1) == classes))}


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def compare(reference: Mapping[str, np.ndarray], exported: Mapping[str, np.ndarray], kinds: Mapping[str, str],
            labels: Mapping[str, np.ndarray], ignore_label: float | None) -> dict[str, dict[str, Any]]:
    """Per output: kind, largest absolute difference, and with labels the metrics of both models (module docstring)."""
    result: dict[str, dict[str, Any]] = {}
    for name, kind in kinds.items():
        entry: dict[str, Any] = {"kind": kind, "max_abs_difference": float(np.max(np.abs(exported[name] - reference[name])))}
        if name in labels:
            y = labels[name]
            if kind == "binary":
                keep = (y == 0) | (y == 1)
            elif kind == "multiclass":
                keep = (y >= 0) & (y < reference[name].shape[1]) & (y == np.floor(y))
            else:
                keep = np.isfinite(y)
            if ignore_label is not None:
                keep &= y != ignore_label
            entry["labelled_rows"] = int(keep.sum())
            if kind in ("binary", "multiclass"):
                metrics = _binary_metrics if kind == "binary" else _multiclass_metrics
                entry["reference"] = metrics(reference[name][keep], y[keep])
                entry["exported"] = metrics(exported[name][keep], y[keep])
                if entry["reference"]["auc"] is not None and entry["exported"]["auc"] is not None:
                    entry["auc_drop"] = entry["reference"]["auc"] - entry["exported"]["auc"]
            else:
                entry["reference"] = {"mse": float(np.mean((reference[name][keep] - y[keep]) ** 2)) if keep.any() else None}
                entry["exported"] = {"mse": float(np.mean((exported[name][keep] - y[keep]) ** 2)) if keep.any() else None}
        result[name] = entry
    return result


def failures(outputs: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, float]) -> list[str]:
    """The thresholds ``outputs`` exceed, one line each."""
    found = []
    for name, entry in outputs.items():
        if "max_auc_drop" in thresholds and entry.get("auc_drop") is not None and entry["auc_drop"] > thresholds["max_auc_drop"]:
            found.append(f"{name}: AUC drop {entry['auc_drop']:.6f} > max_auc_drop {thresholds['max_auc_drop']}")
        key = "max_value_difference" if entry["kind"] == "regression" else "max_probability_difference"
        if key in thresholds and not entry["max_abs_difference"] <= thresholds[key]:
            found.append(f"{name}: largest absolute difference {entry['max_abs_difference']:.6f} > {key} {thresholds[key]}")
    return found


# ------------------------------------------------------------------ the report
def verify_export(model: nn.Module, path: str | Path, kind: str, datamodule: Any = None,
                  verification: Verification | Mapping[str, Any] | None = None, table_dtype: str = "float32",
                  dense_dtype: str = "float32", served_path: str | Path | None = None) -> dict[str, Any]:
    """Compare the export at ``path`` (served from ``served_path``, default ``path``) with the float32 ``model``,
    write the JSON and Markdown reports beside ``path`` and return the report; see the module docstring."""
    verification = Verification.of(verification)
    path, served_path = Path(path), Path(served_path or path)
    reference = ServingModel(model)
    architecture = reference.model
    training = architecture.training
    try:
        hparams = getattr(model, "hparams", None)  # a MultiTaskLightningModule's ignore_label; -1 otherwise
        ignore_label = hparams.get("ignore_label", -1.0) if isinstance(hparams, Mapping) else -1.0
        report = _verify(reference.eval(), path, served_path, kind, datamodule, verification, table_dtype, dense_dtype,
                         ignore_label)
    finally:
        architecture.train(training)  # the model given keeps its mode
    if report["failures"]:
        moved = []
        for file in dict.fromkeys([path, served_path]):
            if file.exists():
                file.replace(rejected_path(file))
                moved.append(f"{file.name} -> {rejected_path(file).name}")
        raise ExportVerificationError(
            f"the export {path} failed its verification on {report['split']}: " + "; ".join(report["failures"])
            + f". The model file was renamed ({', '.join(moved)}) so that nothing serves it; the report is "
            f"{report_path(path, '.md')}")
    return report


def _verify(reference: nn.Module, path: Path, served_path: Path, kind: str, datamodule: Any, verification: Verification,
            table_dtype: str, dense_dtype: str, ignore_label: float | None) -> dict[str, Any]:
    """The report of :func:`verify_export`, written beside ``path``."""
    architecture = reference.model
    kinds = architecture.output_kinds()
    task_labels = {t.name: t.label for t in architecture.tasks}
    batches, source = labelled_batches(verification.split, datamodule, preprocessing_path(path), task_labels,
                                       verification.rows_per_call)
    if batches is None:
        if "max_auc_drop" in verification.thresholds:
            raise ValueError(f"max_auc_drop needs labelled rows, but {source}")
        batches = [{"features": example_features(architecture.features, batch_size=UNLABELLED_ROWS, seed=0)}]
    names = [f.name for f in architecture.features]
    runtime = open_runtime(served_path, kind, names)
    got: dict[str, list[np.ndarray]] = {n: [] for n in kinds}
    want: dict[str, list[np.ndarray]] = {n: [] for n in kinds}
    labels: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            features = {n: batch["features"][n] for n in names if n in batch["features"]}
            expected, served = reference(features), runtime(features)
            for name in kinds:
                want[name].append(expected[name].numpy())
                got[name].append(np.asarray(served[name], dtype=np.float32).reshape(want[name][-1].shape))
            for task, value in (batch.get("labels") or {}).items():
                if task in kinds:
                    labels.setdefault(task, []).append(torch.as_tensor(value).float().numpy().reshape(-1))
    joined = {n: np.concatenate(v) for n, v in labels.items()}
    outputs = compare({n: np.concatenate(v) for n, v in want.items()}, {n: np.concatenate(v) for n, v in got.items()},
                      kinds, joined, ignore_label)
    binary = [e["max_abs_difference"] for e in outputs.values() if e["kind"] != "regression"]  # probabilities
    regression = [e["max_abs_difference"] for e in outputs.values() if e["kind"] == "regression"]
    report: dict[str, Any] = {
        "format": kind, "file": path.name, "served_file": served_path.name, "file_bytes": served_path.stat().st_size,
        "table_dtype": table_dtype, "dense_dtype": dense_dtype, "runtime": runtime.description,
        "split": source, "rows": int(sum(len(v) for v in want[next(iter(kinds))])),
        "outputs": outputs,
        "max_probability_difference": max(binary) if binary else None,
        "max_value_difference": max(regression) if regression else None,
        "latency_ms": latency(runtime, architecture.features, verification.latency_batch_sizes, verification.latency_runs),
        "latency_runs": verification.latency_runs, "threads": 1,
        "thresholds": verification.thresholds,
    }
    report["failures"] = failures(outputs, verification.thresholds)
    report["passed"] = not report["failures"]
    report_path(path).write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
    report_path(path, ".md").write_text(markdown(report))
    return report


def _number(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown page: a header line, the per-output table, the latency table, the verdict."""
    size = report["file_bytes"] / 2**20
    lines = [f"# Verification of {report['file']}", "",
             f"{report['format']} ({report['runtime']}); tables {report['table_dtype']}, dense {report['dense_dtype']}; "
             f"{report['served_file']}: {size:.2f} MiB ({report['file_bytes']:,} bytes); compared with the float32 "
             f"PyTorch model on {report['split']} ({report['rows']:,} rows).", "",
             "| output | kind | AUC fp32 / export (drop) | log-loss fp32 / export | PCOC fp32 / export | MSE fp32 / export "
             "| max abs difference |", "|---|---|---|---|---|---|---|"]
    for name, e in report["outputs"].items():
        ref, exp = e.get("reference", {}), e.get("exported", {})
        auc = (f"{_number(ref.get('auc'))} / {_number(exp.get('auc'))} ({_number(e.get('auc_drop'), 5)})"
               if ref.get("auc") is not None else "–")
        pair = {k: f"{_number(ref.get(k))} / {_number(exp.get(k))}" if ref.get(k) is not None else "–"
                for k in ("log_loss", "pcoc", "mse")}
        lines.append(f"| {name} | {e['kind']} | {auc} | {pair['log_loss']} | {pair['pcoc']} | {pair['mse']} "
                     f"| {e['max_abs_difference']:.2e} |")
    if report["latency_ms"]:
        lines += ["", f"Latency per call, {report['threads']} thread, {report['latency_runs']} calls:", "",
                  "| batch size | p50 ms | p99 ms |", "|---|---|---|"]
        lines += [f"| {b} | {t['p50']:.3f} | {t['p99']:.3f} |" for b, t in report["latency_ms"].items()]
    thresholds = ", ".join(f"{k} {v}" for k, v in report["thresholds"].items()) or "none"
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    lines += ["", f"Thresholds: {thresholds}. Result: {verdict}.", ""]
    return "\n".join(lines)


__all__ = ["Verification", "ExportVerificationError", "verify_export", "report_path", "rejected_path", "open_runtime",
           "latency", "compare", "failures", "markdown", "labelled_batches"]
