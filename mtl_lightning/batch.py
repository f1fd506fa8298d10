"""``Batch``: the one definition of what a batch holds, shared by the data modules, the module and the strategies.

A batch is a plain ``dict`` (so Lightning moves it between devices, converts its
precision and collates it like any other); this ``TypedDict`` names its keys and
their types for readers and type checkers. Keys:

* ``features`` (always): ``{feature name: Tensor}``, sparse ids int64 ``(B,)``,
  dense values float32 ``(B,)`` or ``(B, dim)``, padded sequences int64 ``(B, max_len)``;
* ``labels`` (always; empty in a predict split without labels): ``{task name: Tensor}``,
  float32 ``(B,)``, ``ignore_label`` or NaN where a row has no label for the task;
* ``row_id`` (optional): int64 ``(B,)``, the row's id (``ParquetDataModule(row_id=...)`` or its
  position in the split), returned beside the predictions;
* ``weights`` (optional): ``{task name: Tensor}``, float ``(B,)`` sample weights >= 0; a task
  listed here has as loss the weighted mean of its rows' losses over its valid rows
  (``mtl_lightning.losses.masked_loss``); tasks not listed weigh every row 1;
* ``group`` (optional): int64 ``(B,)`` group (user) ids, for group AUC;
* ``scenario`` (optional): int64 ``(B,)`` scenario (domain) ids, for per-scenario AUC;
* ``keys`` (optional): ``{column: Tensor}``, columns carried to the prediction writer.

This ``TypedDict`` is the one definition of the keys: code reads and writes
them as literal keys (``batch["features"]``), which a type checker checks
against it; code that handles batches generically reads
``Batch.__required_keys__`` and ``Batch.__optional_keys__``.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

class _BatchRequired(TypedDict):
    features: dict[str, Tensor]
    labels: dict[str, Tensor]


class Batch(_BatchRequired, total=False):
    """One batch: ``features`` and ``labels`` always, the other keys when the data carries them (see the module
    docstring for shapes and dtypes)."""

    row_id: Tensor
    weights: dict[str, Tensor]
    group: Tensor
    scenario: Tensor
    keys: dict[str, Tensor]


__all__ = ["Batch"]
