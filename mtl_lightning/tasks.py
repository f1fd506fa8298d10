"""Task specification: one prediction head, its loss kind and its label column."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TASK_KINDS = ("binary", "regression")


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    ``kind`` picks the loss (``binary``: BCE on logits; ``regression``: MSE),
    ``label`` is the label column (defaults to ``name``) and ``weight`` the
    static loss weight used by the default weighting strategy.
    """

    name: str
    kind: str = "binary"
    label: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task: name must be a non-empty string, got {self.name!r}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
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
