"""The partition record: which partitions (days) a model has trained on, so that no day is trained twice.

Day-by-day training continues a model from yesterday's checkpoint on today's
partition (``ParquetDataModule(continue_from=..., grow_vocabulary=True)`` and
``trainer.fit(..., ckpt_path=...)``). Every checkpoint the data module writes
carries, in its state, the record::

    {"trained": [...], "training": [...]}

* ``trained``: partitions of fits that completed -- the checkpoint's earlier
  days, and this run's own train split once its fit completes;
* ``training``: the partitions of the fit under way when the checkpoint was
  written, which had not reached its end (a checkpoint mid-run: resuming it
  trains the rest of that fit).

A fit completes when ``trainer.fit`` returns normally (the data module's
``teardown("fit")``: Lightning does not call it after an exception or an
interrupt). A checkpoint written during the fit's last step -- the last
epoch's end (``ModelCheckpoint``, ``last.ckpt``), ``max_steps`` reached, or an
early stop -- already counts its partitions as ``trained``
(``fit_is_ending``): nothing of that fit is left to resume.

A partition is a train file's deepest ``key=value`` folder
(``s3://logs/impressions/day=2026-11-02``), or the file itself when it lies in
no such folder; local paths are made absolute with symbolic links resolved
(``file://`` URIs are local paths), so a relative path, a ``file://`` URI, a
symbolic link, a glob or the files themselves name the same partitions.

A checkpoint's record is adopted whenever the data module loads its state
(``adopt``); a train split that holds a ``trained`` partition, or that overlaps
``training`` without being exactly it (exactly it: resuming the interrupted
run), is refused (``enforce``) when a fit is about to train on it: loading the
state during ``trainer.fit``, at ``setup("fit")``, or continuing from a
checkpoint (``load_checkpoint_state``, ``continue_from=``). Validating,
testing or predicting from the checkpoint with the same data module trains
nothing and is not refused. ``allow_retraining=True`` turns the refusal into a
warning.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from .paths import DataFile


def partition_keys(files: Sequence[DataFile]) -> list[str]:
    """The sorted partitions of ``files``: each file's deepest ``key=value`` folder, else the file (see the module docstring)."""
    keys = set()
    for file in files:
        path = str(file.path) if file.storage is not None else Path(file.path).resolve().as_posix()
        parts = path.split("/")
        hive = [i for i, part in enumerate(parts[:-1]) if "=" in part]
        keys.add("/".join(parts[: hive[-1] + 1]) if hive else path)
    return sorted(keys)


def fit_is_ending(trainer: Any) -> bool:
    """Whether the running fit stops at the point it is at: a checkpoint written now is its last.

    True during ``trainer.fit`` when Lightning's own stop conditions hold for
    the training done so far: ``max_steps`` reached, or the epochs whose
    batches have all run reaching ``max_epochs`` (at an epoch's end: in its
    ``on_train_epoch_end`` or its end-of-epoch validation, where
    ``ModelCheckpoint`` saves), or ``trainer.should_stop`` (early stopping)
    once ``min_epochs``/``min_steps`` are met. Read from the Trainer's public
    progress counters; ``False`` outside a running fit.
    """
    if trainer is None:
        return False
    state = trainer.state
    if state.fn != TrainerFn.FITTING or state.status != TrainerStatus.RUNNING:
        return False
    loop = trainer.fit_loop
    epochs = loop.epoch_progress.current
    batches = loop.epoch_loop.batch_progress
    limit = trainer.num_training_batches
    epoch_over = batches.is_last_batch or (isinstance(limit, int) and 0 < limit <= batches.current.ready)
    if epochs.processed == epochs.started or not epoch_over:
        epochs_run = epochs.processed  # at an epoch's end hook (processed is counted first), or mid-epoch
    else:
        epochs_run = epochs.started  # end-of-epoch validation: the epoch's batches have all run
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps != -1 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs != -1 and not math.isinf(max_epochs) and epochs_run >= max_epochs:
        return True
    if trainer.should_stop:
        min_epochs, min_steps = loop.min_epochs, loop.epoch_loop.min_steps
        return (not min_epochs or epochs_run >= min_epochs) and (not min_steps or trainer.global_step >= min_steps)
    return False


class PartitionRecord:
    """The partitions a data module's model lineage has trained on; see the module docstring.

    ``trained`` holds the restored checkpoint's trained partitions (those of
    completed fits before this run); ``completed`` whether this data module's
    fit on its train split has completed since its last ``start_fit``.
    """

    def __init__(self, allow_retraining: bool = False) -> None:
        self.allow_retraining = allow_retraining
        self.trained: list[str] = []
        self.completed = False
        self.restored: dict[str, list[str]] | None = None  # a restored record, kept as it is without a train split
        self.again: list[str] = []  # partitions of the train split the adopted record has trained (see enforce)
        self._ran_to_end = False
        self._warned = False

    def start_fit(self) -> None:
        """A fit on the train split starts (``setup("fit")``): its partitions are being trained, not trained."""
        self.completed = False

    def complete_fit(self) -> None:
        """The fit on the train split completed (``teardown("fit")``): its partitions count as trained."""
        self.completed = True

    def state(self, now: list[str] | None, ending: bool = False) -> dict[str, list[str]] | None:
        """The record to save: ``now`` is the train split's partitions (``None``: no train split), ``ending`` whether
        the checkpoint is the last of a running fit (``fit_is_ending``)."""
        if now is None:
            return None if self.restored is None else {key: list(value) for key, value in self.restored.items()}
        if self.completed or ending:
            return {"trained": sorted(set(self.trained) | set(now)), "training": []}
        return {"trained": list(self.trained), "training": list(now)}

    def adopt(self, record: Mapping[str, Sequence[str]] | None, now: list[str] | None) -> bool:
        """Adopt a checkpoint's record for a train split whose partitions are ``now`` (``None``: no train split).

        Returns ``True`` when the train split resumes the interrupted fit that
        wrote the checkpoint. The partitions it would train again are kept for
        ``enforce``, which refuses them.
        """
        self.again = []
        if record and now is None:
            self.restored = {key: list(value) for key, value in record.items()}
        if not record or now is None:
            return False
        trained, training = set(record.get("trained", ())), set(record.get("training", ()))
        resuming = bool(training) and set(now) == training
        self.again = sorted(set(now) & (trained if resuming else trained | training))
        self._ran_to_end = set(self.again) <= trained
        self._warned = False
        self.trained = sorted(trained) if resuming else sorted(trained | training)
        self.completed = False
        return resuming

    def enforce(self) -> None:
        """Refuse (``ValueError``) to train the partitions the adopted record has trained already.

        With ``allow_retraining`` a warning instead (once per adopted record).
        """
        if not self.again:
            return
        message = (f"the checkpoint has already trained on the partition(s) {self.again} of this train split"
                   + (" (fits on them ran to their end: nothing of them is left to resume)" if self._ran_to_end else "")
                   + "; training on them again counts their rows twice")
        if not self.allow_retraining:
            raise ValueError(f"{message}. Give a train split of new partitions (the next day), resume an "
                             "interrupted run with exactly its train split and a checkpoint it wrote before its "
                             "end, or pass allow_retraining=True to the data module to train on them anyway")
        if not self._warned:
            self._warned = True
            warnings.warn(message + " (allow_retraining=True)")
