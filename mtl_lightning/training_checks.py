"""Warnings about tasks that cannot learn: no valid label in the train split, a training loss that is not finite.

``MultiTaskLightningModule`` feeds one :class:`TrainingChecks` from its
``training_step`` and calls :meth:`TrainingChecks.end_epoch` at the end of every
training epoch:

* **No valid label.** Over the first training epoch of each ``fit`` (the rows
  trained on in it: the whole train split, in memory or streaming, unless the
  fit stops earlier), the rows with a valid label (neither ``ignore_label`` nor
  NaN) are counted per task; a task with none trains with a loss of exactly 0
  and learns nothing, so it is warned about, naming the task, the rows seen and
  the label column. Only the first epoch is counted (no cost afterwards).
* **Not finite.** On the steps whose values are logged (``train/<task>/loss``,
  ``train/loss``), a task loss or the total that is ``inf`` or NaN (regression
  labels so large that their squared error overflows float32, above about
  1.8e19; a diverged model) is counted, and warned about at the epoch's end with
  the number of such logged steps.

Each warning is given once per task (and kind) for the module's lifetime. The
counts stay on the device during the epoch (no host sync per step) and are
summed over every rank at its end, so under DDP every rank decides the same.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .losses import valid_mask
from .tasks import Task


class TrainingChecks:
    """Per-task label counts and non-finite loss counts over a training epoch (see the module docstring).

    Args:
        tasks: the trained tasks.
        ignore_label: the label value that means "no label" (NaN always does).
    """

    def __init__(self, tasks: Sequence[Task], ignore_label: float | None = -1) -> None:
        self.tasks = tuple(tasks)
        self.ignore_label = ignore_label
        self.counting_labels = False
        self._valid: Tensor | None = None  # (T,) rows with a valid label this epoch, per task
        self._non_finite: Tensor | None = None  # (T + 1,) logged steps whose task loss / total was not finite
        self._rows = 0  # rows counted this epoch (this rank)
        self._logged_steps = 0
        self._warned: set[tuple[str, str]] = set()

    def start_fit(self) -> None:
        """Count labels over the next training epoch (the first of this fit)."""
        self.counting_labels = True
        self._clear()

    def _clear(self) -> None:
        self._valid, self._non_finite, self._rows, self._logged_steps = None, None, 0, 0

    def count_labels(self, labels: Mapping[str, Tensor]) -> None:
        """Add one batch's valid labels per task (while counting the first epoch of a fit)."""
        if not self.counting_labels:
            return
        stacked = torch.stack([labels[t.name] for t in self.tasks])  # (T, B)
        valid = valid_mask(stacked, self.ignore_label).sum(1)
        self._valid = valid if self._valid is None else self._valid + valid
        self._rows += stacked.shape[1]

    def add_label_counts(self, valid: Tensor, rows: int) -> None:
        """Add one batch's numbers of valid labels per task (``(T,)``, task order) of ``rows`` rows, counted by the
        caller (``losses.fused.FusedTaskLosses`` counts them with the losses), while counting the first epoch."""
        if not self.counting_labels:
            return
        valid = valid.long()
        self._valid = valid if self._valid is None else self._valid + valid
        self._rows += rows

    def check_losses(self, losses: Sequence[Tensor], total: Tensor) -> None:
        """Add one logged step's task losses (in task order) and total loss."""
        bad = ~torch.isfinite(torch.stack([*(loss.detach().float() for loss in losses), total.detach().float()]))
        self._non_finite = bad.long() if self._non_finite is None else self._non_finite + bad
        self._logged_steps += 1

    def end_epoch(self, epoch: int, reduce_sum: Callable[[Tensor], Tensor], device: torch.device) -> None:
        """Sum this epoch's counts over the ranks, warn, and start counting afresh (labels: first epoch only)."""
        counting = self.counting_labels
        tasks = len(self.tasks)
        valid = self._valid if self._valid is not None else torch.zeros(tasks, dtype=torch.long, device=device)
        bad = self._non_finite if self._non_finite is not None else torch.zeros(tasks + 1, dtype=torch.long,
                                                                                device=device)
        numbers = torch.cat([valid.to(device).long(), bad.to(device).long(),
                             torch.tensor([self._rows, self._logged_steps], device=device)])
        numbers = reduce_sum(numbers).tolist()
        valid_counts, bad_counts, (rows, steps) = numbers[:tasks], numbers[tasks:-2], numbers[-2:]
        self.counting_labels = False
        self._clear()
        if counting and rows > 0:
            for task, count in zip(self.tasks, valid_counts):
                if count == 0:
                    self._warn(task.name, "no label", (
                        f"train split: task {task.name!r} has no row with a valid label in the {rows} rows trained "
                        f"on in epoch {epoch} (every value of its label column {task.label!r} is "
                        f"ignore_label={self.ignore_label!r} or NaN): its loss is exactly 0 and it learns nothing. "
                        "Check the label column, ignore_label and the train split (warned once per task)."))
        names = [f"train/{t.name}/loss" for t in self.tasks] + ["train/loss"]
        for name, count in zip(names, bad_counts):
            if count > 0:
                self._warn(name, "not finite", (
                    f"train split: {name} was inf or NaN in {count} of the {steps} logged steps of epoch {epoch}: "
                    "regression labels or predictions so large that their squared error overflows float32 (above "
                    "about 1.8e19; scale the labels, e.g. log or standardise them), or the model diverged (check the "
                    "learning rate) (warned once per key)."))

    def _warn(self, subject: str, kind: str, message: str) -> None:
        if (subject, kind) not in self._warned:
            self._warned.add((subject, kind))
            rank_zero_warn(message)




def check_precision(trainer: Any) -> None:
    """Refuse, before any step, a half ``-true`` precision (see the module docstring)."""
    if trainer.precision in ("bf16-true", "16-true"):
        mixed = trainer.precision.replace("-true", "-mixed")
        raise ValueError(
            f"Trainer(precision={trainer.precision!r}) casts every parameter and input to half precision, which "
            "MultiTaskLightningModule does not train with: dense inputs, losses and metrics are computed in "
            f"float32 (the first layer would see float32 inputs against half weights). Use "
            f"precision={mixed!r} (autocast over float32 weights, on CPU and GPU) or '32-true'"
        )


__all__ = ["TrainingChecks", "check_precision"]
