"""Callbacks for training with ``MultiTaskLightningModule``.

``RunSummary`` prints, at the end of ``fit``, the best checkpoint's path and a
table of the final validation metrics per task (``mtl-lightning fit`` adds it).

``GradientConflict`` (defined in ``mtl_lightning.gradient_conflict``) logs the
cosine of every pair of tasks' gradients on the shared parameters every N steps.

``ParquetPredictionWriter`` (``trainer.predict`` output to Parquet files) lives
in ``datamodules.predictions``, beside the Parquet reader and the storage layer
it writes through: ``mtl_lightning`` never imports ``datamodules``. It is still
importable from here (``from mtl_lightning.callbacks import
ParquetPredictionWriter``) through the module ``__getattr__`` below, a
backwards-compatible re-export that imports it on first use.
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L

from .gradient_conflict import GradientConflict


def metrics_table(metrics: Mapping[str, Any], stage: str = "val") -> str:
    """The ``<stage>/<task>/<metric>`` values of ``metrics`` as a text table: one row per task, one column per metric.

    A metric a task does not have (MSE for a binary task, GAUC without a group column) shows ``-``; the
    combined ``<stage>/loss`` is the last line. Empty string when there is no such metric.
    """
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == stage:
            rows.setdefault(parts[1], {})[parts[2]] = float(value)
    if not rows:
        return ""
    order = ["auc", "accuracy", "gauc", "logloss", "ne", "pcoc", "ece", "mse", "mae", "xauc"]
    columns = [c for c in order if any(c in r for r in rows.values())]
    columns += sorted({c for r in rows.values() for c in r} - set(columns))
    width = max(len("task"), *(len(t) for t in rows))
    lines = [f"{'task':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
    for task, values in rows.items():
        lines.append(f"{task:<{width}}  " + "  ".join(
            f"{values[c]:>9.4f}" if c in values else f"{'-':>9}" for c in columns))
    if f"{stage}/loss" in metrics:
        lines.append(f"{stage}/loss: {float(metrics[f'{stage}/loss']):.4f}")
    return "\n".join(lines)


def run_log_dir(trainer: L.Trainer) -> str | None:
    """The logger's folder, read on this process (``trainer.log_dir`` broadcasts, so rank 0 alone cannot call it)."""
    logger = trainer.logger
    if logger is None:
        return None
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)


def model_line(pl_module: L.LightningModule) -> str:
    """``MMoE: 124,673 parameters (124,673 trainable); tasks click, conversion, dwell``."""
    model = getattr(pl_module, "model", pl_module)
    parameters = list(pl_module.parameters())
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    tasks = [t.name for t in getattr(pl_module, "tasks", ())]
    return (f"{type(model).__name__}: {total:,} parameters ({trainable:,} trainable)"
            + (f"; tasks {', '.join(tasks)}" if tasks else ""))


class RunSummary(L.Callback):
    """At the end of ``fit``, on rank 0: the run's folder, its best and last checkpoints, and a table of the final
    validation metrics per task (``metrics_table``). ``mtl-lightning fit`` adds it; from Python pass it in
    ``Trainer(callbacks=[RunSummary()])``. The text is printed and kept in ``self.text``.

    At the start of ``fit``, when the Trainer shows no model summary of its own
    (``enable_model_summary=False``, the CLI's default), it prints one line instead: the architecture, its
    number of parameters and the tasks (:func:`model_line`).
    """

    def __init__(self) -> None:
        self.text = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.callbacks import ModelSummary

        if trainer.is_global_zero and not any(isinstance(c, ModelSummary) for c in trainer.callbacks):
            print(model_line(pl_module), flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = []
        log_dir = run_log_dir(trainer)
        if log_dir:
            lines.append(f"run folder (TensorBoard logs): {log_dir}")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
            score = getattr(checkpoint, "best_model_score", None)
            monitor = getattr(checkpoint, "monitor", None)
            best = f" ({monitor} = {float(score):.4f})" if monitor and score is not None else ""
            lines.append(f"best checkpoint: {checkpoint.best_model_path}{best}")
            last = getattr(checkpoint, "last_model_path", "")
            if last and last != checkpoint.best_model_path:
                lines.append(f"last checkpoint: {last}")
        elif checkpoint is None:
            lines.append("no checkpoint written (checkpointing is off)")
        table = metrics_table(trainer.callback_metrics, "val")
        lines += ["final validation metrics:", table] if table else ["no validation metrics (no val split)"]
        self.text = "\n".join(lines)
        print(self.text, flush=True)


def __getattr__(name: str) -> Any:
    """Backwards-compatible re-export only: ``ParquetPredictionWriter`` moved to ``datamodules.predictions``.

    Imported on first use, so that importing this module imports nothing of ``datamodules``.
    """
    if name == "ParquetPredictionWriter":
        from datamodules.predictions import ParquetPredictionWriter

        return ParquetPredictionWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GradientConflict", "RunSummary", "metrics_table", "run_log_dir"]
