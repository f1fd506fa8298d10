"""Task specification: one prediction head, its loss kind and its label column."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from torch import Tensor

from .losses.task_losses import LOSSES, check_loss, default_loss

TASK_KINDS = tuple(LOSSES)


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    ``kind`` picks the default loss (``binary``: BCE on logits; ``regression``: MSE; ``multiclass``: softmax
    cross-entropy),
    ``label`` is the label column (defaults to ``name``) and ``weight`` the
    static loss weight used by the default weighting strategy (and by others
    as their starting point, and in ``val/loss``): a finite number >= 0. A
    negative weight would maximise the task's loss and a NaN or infinite one
    turn every parameter into NaN, so both raise ``ValueError`` naming the task;
    0 leaves the task out of the weighted loss (``MultiTaskLightningModule``
    refuses tasks whose weights are all 0).

    ``sample_weight`` names a column of per-row weights (finite, >= 0; the data
    module refuses anything else naming the file and column): the task's loss
    is then the weighted mean of its rows' losses over its valid rows, and its
    log-loss, NE, PCOC, ECE, MSE and MAE are weighted the same way.

    ``num_classes`` (multi-class tasks, required there and refused for the other kinds): the number of classes
    ``K >= 2``. A multi-class task's label column holds class ids ``0..K-1`` (the ignore label or null/NaN for
    a row without one); its architecture output is ``K`` logits per row (``(B, K)``, :attr:`output_dim`), its
    predictions and exports the ``K`` softmax probabilities. Binary-only settings (``negative_sampling_rate``,
    the binary losses, calibration) are refused for it.

    ``negative_sampling_rate`` (binary tasks, in ``(0, 1]``): the training data
    kept only this fraction of the task's negatives. The model then learns the
    logit of the sampled data; predictions, validation/test metrics and the
    exports use the corrected probability ``p / (p + (1 - p) / r)``, i.e. the
    logit plus ``log r`` (:func:`corrected_logits`), so they hold for unsampled
    data (give unsampled validation and test splits).

    ``loss`` names the task's loss: ``"bce"`` (binary default), ``"focal"`` or
    ``"jrc"`` for binary tasks, ``"mse"`` (regression default) or ``"huber"``
    for regression tasks, ``"cross_entropy"`` (the only one) for multi-class
    tasks; ``loss_options`` is a plain dict of its options (``focal``:
    ``gamma``, ``alpha``, ``label_smoothing``; ``bce``: ``label_smoothing``;
    ``jrc``: ``alpha``, ``session``; ``huber``: ``delta``; ``cross_entropy``:
    ``label_smoothing``). Formulas and defaults: ``mtl_lightning.losses.task_losses``.
    An unknown loss or option, or an option value out of range, raises
    ``ValueError`` naming the task. Both are plain data, so ``to_config``,
    YAML configs and checkpoints carry them; a task written before they
    existed loads with its kind's default loss. ``to_config`` leaves ``num_classes`` out when it is ``None``
    (binary and regression tasks), so their configs are the ones earlier versions wrote.
    """

    name: str
    kind: str = "binary"
    label: str | None = None
    weight: float = 1.0
    sample_weight: str | None = None
    negative_sampling_rate: float = 1.0
    loss: str | None = None
    loss_options: dict[str, Any] | None = field(default=None, hash=False)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task: name must be a non-empty string, got {self.name!r}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real):
            raise TypeError(f"Task {self.name!r}: weight must be a number, got {type(self.weight).__name__} "
                            f"{self.weight!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(
                f"Task {self.name!r}: weight must be a finite number >= 0, got {self.weight!r}; a negative weight "
                "maximises the task's loss and a NaN or infinite one turns every parameter into NaN"
            )
        if self.sample_weight is not None and (not isinstance(self.sample_weight, str) or not self.sample_weight):
            raise ValueError(f"Task {self.name!r}: sample_weight must be a column name, got {self.sample_weight!r}")
        self._check_num_classes()
        rate = self.negative_sampling_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate <= 1:
            raise ValueError(f"Task {self.name!r}: negative_sampling_rate must be a number in (0, 1] (the share of "
                             f"negatives kept), got {rate!r}")
        if rate != 1 and self.kind != "binary":
            raise ValueError(f"Task {self.name!r}: negative_sampling_rate applies to binary tasks, not {self.kind}")
        if self.label is None:
            object.__setattr__(self, "label", self.name)
        if self.loss is None:
            object.__setattr__(self, "loss", default_loss(self.kind))
        if not isinstance(self.loss, str):
            raise TypeError(f"Task {self.name!r}: loss must be a loss name, got {type(self.loss).__name__}")
        options = {} if self.loss_options is None else self.loss_options
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise TypeError(f"Task {self.name!r}: loss_options must be a dict of option name -> value, got "
                            f"{self.loss_options!r}")
        check_loss(self.name, self.kind, self.loss, options)
        object.__setattr__(self, "loss_options", dict(options))

    def _check_num_classes(self) -> None:
        classes = self.num_classes
        if self.kind != "multiclass":
            if classes is not None:
                raise ValueError(f"Task {self.name!r}: num_classes applies to multiclass tasks, not {self.kind} "
                                 f"(got num_classes={classes!r}); give kind='multiclass' or drop num_classes")
        elif classes is None:
            raise ValueError(f"Task {self.name!r}: a multiclass task needs num_classes=K (the number of classes, "
                             ">= 2; its labels are the class ids 0..K-1)")
        elif isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 2:
            raise ValueError(f"Task {self.name!r}: num_classes must be an integer >= 2, got {classes!r}")
        else:
            object.__setattr__(self, "num_classes", int(classes))

    @property
    def output_dim(self) -> int:
        """The width of the task's architecture output per row: ``num_classes`` logits for a multi-class task,
        else 1 (a logit or value, which architectures return squeezed to ``(B,)``)."""
        return self.num_classes if self.num_classes is not None else 1

    def to_config(self) -> dict[str, Any]:
        config = asdict(self)
        if config["num_classes"] is None:
            del config["num_classes"]
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any] | Task) -> Task:
        return config if isinstance(config, Task) else cls(**config)


def corrected_logits(tasks: Sequence[Task], outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``outputs`` with ``log r`` added to the logit of every task of ``tasks`` whose ``negative_sampling_rate``
    ``r`` is below 1: ``sigmoid(z + log r) = p / (p + (1 - p) / r)``, the probability on unsampled data."""
    out = dict(outputs)
    for task in tasks:
        if task.negative_sampling_rate != 1 and task.name in out:
            out[task.name] = out[task.name] + math.log(task.negative_sampling_rate)
    return out


def check_sampling_rates(tasks: Sequence[Task], model_tasks: Sequence[Task]) -> None:
    """``ValueError`` when a task's ``negative_sampling_rate`` differs from the architecture's task of that name:
    predictions and exports correct with the architecture's tasks, so the rate belongs there."""
    rates = {t.name: t.negative_sampling_rate for t in model_tasks}
    for task in tasks:
        if task.name in rates and rates[task.name] != task.negative_sampling_rate:
            raise ValueError(f"task {task.name!r} has negative_sampling_rate={task.negative_sampling_rate} but the "
                             f"architecture's task has {rates[task.name]}; give the same Task to both (the "
                             "architecture's predictions and exports apply the rate)")


def check_tasks(tasks: Any) -> tuple[Task, ...]:
    """Validate a task list: non-empty, Task objects (or their dicts), unique names."""
    if tasks is None or len(tasks) == 0:
        raise ValueError("at least one Task is required")
    tasks = tuple(Task.from_config(t) for t in tasks)
    names = [t.name for t in tasks]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"task names must be unique, duplicated: {duplicated}")
    return tasks
