"""Embedding tables meeting checkpoints: an earlier layout, a changed vocabulary, a grown vocabulary.

``FeatureEmbedding`` calls :func:`check_table_rows` and
:func:`fuse_earlier_tables` when it loads a ``state_dict``;
``MultiTaskLightningModule`` calls :func:`vocabulary_mismatch` before loading
and :func:`grown_rows` for incremental training. Each reads a layer through its
``table_layout()`` (``{owner feature: (state_dict key, first row, rows)}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import Tensor

from ..features import DenseFeature, Feature, feature_from_config

if TYPE_CHECKING:
    from .embedding import FeatureEmbedding

VOCABULARY_HINT = (
    "the vocabulary changed since the checkpoint was written, e.g. vocab_size was inferred again from data with "
    "more or fewer ids; to resume, build the model with the checkpoint's feature specs (its "
    "hyper_parameters['model']['init_args']['features'], e.g. passed as ParquetDataModule(features=...)), "
    "or start a new run (fit without ckpt_path) to train the new vocabulary; for day-by-day training, let "
    "ParquetDataModule(grow_vocabulary=True) grow it (docs/object-stores.md: Incremental training)"
)


def _table_rows(features: Sequence[Feature]) -> dict[str, int]:
    """``{feature: vocab_size}`` of the features that own an embedding table (sparse or sequence, not shared)."""
    return {f.name: f.vocab_size for f in features if not isinstance(f, DenseFeature) and not f.shared_with}


def vocabulary_mismatch(checkpoint_features: Sequence[Feature | dict], model_features: Sequence[Feature | dict]
                        ) -> str | None:
    """A message naming every table-owning feature whose ``vocab_size`` differs between the two spec lists, or ``None``.

    Features present in only one of the lists are not compared (they change
    the state dict's keys or other layers' shapes, which loading reports).
    """
    before = _table_rows([feature_from_config(f) for f in checkpoint_features])
    after = _table_rows([feature_from_config(f) for f in model_features])
    changed = [
        f"feature {name!r}: the checkpoint's table has {before[name]} rows, the model's {rows}"
        for name, rows in after.items() if name in before and before[name] != rows
    ]
    if not changed:
        return None
    return f"the checkpoint does not fit the model's embedding tables: {'; '.join(changed)} ({VOCABULARY_HINT})"


def _owners_by_weight(layer: FeatureEmbedding) -> dict[str, list[tuple[str, int]]]:
    """``{state_dict key of a fused weight: [(owner feature, rows), ...]}`` in block (spec) order."""
    weights: dict[str, list[tuple[str, int]]] = {}
    for owner, (key, _, rows) in layer.table_layout().items():
        if key.startswith("fused."):
            weights.setdefault(key, []).append((owner, rows))
    return weights


def check_table_rows(layer: FeatureEmbedding, state_dict: Mapping[str, Tensor], prefix: str) -> None:
    """Raise ``ValueError`` when a table of ``state_dict`` has another number of rows than ``layer``'s.

    The message names the feature(s) and both sizes (the vocabulary changed
    since the checkpoint was written), instead of torch's bare ``size
    mismatch``. A fused weight holds several features' tables, so its message
    lists them all; ``MultiTaskLightningModule`` compares the checkpoint's
    feature specs first and names the very feature. Tables of the earlier
    layout (``tables.<feature>.weight`` for every table) are checked too.
    """
    changed = []
    for key, owners in _owners_by_weight(layer).items():
        value = state_dict.get(f"{prefix}{key}")
        total = sum(rows for _, rows in owners)
        if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] != total:
            if len(owners) == 1:  # the weight is that one feature's table
                changed.append(f"feature {owners[0][0]!r}: the checkpoint's table has {value.shape[0]} rows, the "
                               f"model's {total}")
                continue
            blocks = ", ".join(f"{name!r} ({rows})" for name, rows in owners)
            changed.append(
                f"the checkpoint's {prefix}{key} has {value.shape[0]} rows, the model's {total}: it holds the tables "
                f"of the features {blocks} (model vocab_size in parentheses), one or more of which have another "
                "vocab_size in the checkpoint"
            )
    for name, (_, _, rows) in layer.table_layout().items():  # the earlier layout's tables, and the sequences'
        value = state_dict.get(f"{prefix}tables.{name}.weight")
        if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] != rows:
            changed.append(f"feature {name!r}: the checkpoint's table has {value.shape[0]} rows, the model's {rows}")
    if changed:
        raise ValueError(f"the checkpoint does not fit the model's embedding tables: {'; '.join(changed)} "
                         f"({VOCABULARY_HINT})")


def fuse_earlier_tables(layer: FeatureEmbedding, state_dict: dict[str, Tensor], prefix: str) -> None:
    """Rewrite, in place, the earlier layout's ``tables.<feature>.weight`` of ``layer``'s fused tables as one weight.

    Each fused weight whose every block is in ``state_dict`` under the earlier
    key (and which is not there under its own key) becomes ``fused.dim<d>.weight``,
    the tables concatenated in block order; otherwise the keys are left for
    the usual missing / unexpected key report.
    """
    for key, owners in _owners_by_weight(layer).items():
        fused_key = f"{prefix}{key}"
        old = [f"{prefix}tables.{name}.weight" for name, _ in owners]
        if fused_key in state_dict or not all(k in state_dict for k in old):
            continue
        dtype = layer.get_parameter(key).dtype
        state_dict[fused_key] = torch.cat([state_dict.pop(k).to(dtype) for k in old])


def grown_rows(layer: FeatureEmbedding, sources: Mapping[str, tuple[int, Tensor]]) -> dict[str, tuple[Tensor, int]]:
    """How the table weights of ``layer`` take the rows of a checkpoint written before some vocabularies grew.

    ``sources`` maps a table-owning feature whose vocabulary grew to
    ``(rows before, index)``: ``index[j]`` is the row of that feature's old
    table that its row ``j`` takes, or ``-1`` for a new row (``index`` has the
    feature's current ``vocab_size`` entries). Returns, for every weight of the
    layer holding such a table (its ``state_dict`` key relative to the layer),
    ``(rows, checkpoint rows)``: ``rows[r]`` is the row of the checkpoint's
    weight that row ``r`` of the layer's weight takes, or ``-1``; blocks of the
    features that did not grow keep their rows. Incremental training
    (``MultiTaskLightningModule`` on loading a checkpoint) copies the old rows
    there and leaves the ``-1`` rows as the layer initialised them.
    """
    blocks: dict[str, list[tuple[int, str, int]]] = {}
    for owner, (key, first, rows) in layer.table_layout().items():
        blocks.setdefault(key, []).append((first, owner, rows))
    grown: dict[str, tuple[Tensor, int]] = {}
    for key, parts in blocks.items():
        if not any(owner in sources for _, owner, _ in parts):
            continue
        pieces, old_first = [], 0
        for _, owner, rows in sorted(parts):
            if owner in sources:
                before, index = sources[owner]
                index = torch.as_tensor(index, dtype=torch.long)
                if len(index) != rows or int(index.max()) >= before:
                    raise ValueError(f"feature {owner!r}: its table has {rows} rows, but the vocabulary growth gives "
                                     f"{len(index)} rows taken from a table of {before}")
                pieces.append(torch.where(index >= 0, index + old_first, -1))
                old_first += before
            else:
                pieces.append(torch.arange(old_first, old_first + rows))
                old_first += rows
        grown[key] = (torch.cat(pieces), old_first)
    return grown


__all__ = ["VOCABULARY_HINT", "vocabulary_mismatch", "check_table_rows", "fuse_earlier_tables", "grown_rows"]
