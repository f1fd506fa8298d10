"""The group and scenario columns of a data module: read like keys, moved to ``batch["group"]`` / ``batch["scenario"]``.

``group=`` (e.g. ``user_id``, for group AUC) and ``scenario=`` (the domain id,
for per-scenario metrics) name integer columns of the data that may also be
features. The data module reads them with its ``keys`` (:func:`carried_keys`),
checks them in every file (:func:`check_id_columns`) and moves them out of
``batch["keys"]`` into their own slots before a batch reaches the model
(:func:`move_id_columns`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from .files import check_unique


def id_columns(group: str | None, scenario: str | None) -> dict[str, str]:
    """``{batch slot: column}`` of the group and scenario columns that are given."""
    return {slot: column for slot, column in (("group", group), ("scenario", scenario)) if column}


def carried_keys(keys: Sequence[str], columns: Mapping[str, str]) -> list[str]:
    """``keys`` plus the group and scenario ``columns`` (read like keys)."""
    return list(keys) + [c for c in dict.fromkeys(columns.values()) if c not in keys]


def check_id_columns(path: Any, schema: pa.Schema, columns: Mapping[str, str]) -> None:
    """Every group / scenario column is in ``schema`` once, as integers; the error names ``path`` and the column."""
    for slot, column in columns.items():
        if column not in schema.names:
            raise ValueError(f"{path}: missing {slot} column {column!r} (columns: {schema.names})")
        check_unique(schema, [column], path)
        if not pa.types.is_integer(schema.field(column).type):
            what = "user ids" if slot == "group" else "scenario ids; encode the scenarios as integers first"
            raise ValueError(f"{path}: {slot} column {column!r} has type {schema.field(column).type}; "
                             f"it must hold integer ids ({what})")


def move_id_columns(batch: Any, columns: Mapping[str, str], keys: Sequence[str]) -> Any:
    """``batch`` with each group / scenario column moved from ``batch["keys"]`` to its slot (kept in the keys when
    it is one of the user's ``keys`` too; ``"keys"`` dropped when nothing is left)."""
    if columns and isinstance(batch, dict) and "keys" in batch:
        carried = batch["keys"]
        for slot, column in columns.items():
            batch[slot] = carried[column]
        for column in set(columns.values()) - set(keys):  # carried for the slots only
            carried.pop(column)
        if not carried:
            del batch["keys"]
    return batch


__all__ = ["id_columns", "carried_keys", "check_id_columns", "move_id_columns"]
