"""Task specification: one prediction head, its loss kind and its label column."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

TASK_KINDS = ("binary", "regression")


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    ``kind`` picks the loss (``binary``: BCE on logits; ``regression``: MSE),
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
    """

    name: str
    kind: str = "binary"
    label: str | None = None
    weight: float = 1.0
    sample_weight: str | None = None

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
        if self.label is None:
            object.__setattr__(self, "label", self.name)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any] | Task) -> Task:
        return config if isinstance(config, Task) else cls(**config)


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
