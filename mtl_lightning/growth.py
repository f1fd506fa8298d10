"""Incremental training: a checkpoint's embedding tables and optimizer state grown to the data module's vocabularies.

When the Trainer's data module grew its vocabularies since the state saved in a
checkpoint (``ParquetDataModule(grow_vocabulary=True)``, which declares the
growth through ``embedding_row_sources()``: for each grown feature the table
size before and, for every new id, its old id or -1), the checkpoint's tables
are grown the same way before they load (:func:`grow_checkpoint_tables`): every
existing id keeps its trained row, a new id's row stays as the model
initialised it; the optimizer state of those weights (Adam's moments...) is
resized alike, zero for new rows, once the optimizers exist
(:meth:`TableGrowth.grow_optimizer_states`). Any other change of size is
refused by :func:`check_vocabularies` with a ``ValueError`` naming each feature
and both sizes.

A module built by ``load_from_checkpoint`` also remembers the data module state
saved in its checkpoint (:func:`datamodule_states`) and hands it to the
Trainer's data module at ``setup`` (:func:`hand_datamodule_state`), so ids and
scales mean what the model learnt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .features import Feature, feature_from_config
from .layers.embedding import FeatureEmbedding, grown_rows, vocabulary_mismatch

# Top-level checkpoint entries that Lightning writes itself; the others that hold a mapping are the data
# module's state (under its class name) and the like.
LIGHTNING_CHECKPOINT_KEYS = frozenset({
    "state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers", "hyper_parameters",
    "datamodule_hyper_parameters", "hparams_type", "hparams_name", "datamodule_hparams_name",
})


def datamodule_states(checkpoint: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The data module states saved in ``checkpoint``: ``{data module class name: state}``."""
    return {key: value for key, value in checkpoint.items()
            if isinstance(value, Mapping) and key not in LIGHTNING_CHECKPOINT_KEYS}


@dataclasses.dataclass
class TableGrowth:
    """The grown tables of one checkpoint whose optimizer state is still to be resized.

    ``rows[name] = (sources, rows before)`` for each grown weight (its full
    parameter name), ``sources[j]`` the old row of new row ``j`` or -1.
    """

    checkpoint: dict[str, Any]
    rows: dict[str, tuple[Tensor, int]]

    def grow_optimizer_states(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Resize the checkpoint's optimizer state of the grown weights (old rows moved with them, new rows zero).

        ``optimizers`` are the Trainer's, in order: the checkpoint's
        ``optimizer_states`` number their parameters across param groups.
        """
        names = {id(p): name for name, p in module.named_parameters()}
        for optimizer, saved in zip(optimizers, self.checkpoint.get("optimizer_states") or []):
            position = 0  # torch numbers the parameters across param_groups, in order
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    name = names.get(id(parameter))
                    entry = saved.get("state", {}).get(position)
                    if name in self.rows and isinstance(entry, dict):
                        index, rows = self.rows[name]
                        keep = index >= 0
                        for key, value in entry.items():
                            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                                value = value.to_dense() if value.is_sparse else value
                                resized = value.new_zeros((len(index), *value.shape[1:]))
                                resized[keep] = value[index[keep].to(value.device)]
                                entry[key] = resized
                    position += 1


def grow_checkpoint_tables(
    module: nn.Module, checkpoint: dict[str, Any], datamodule: Any
) -> tuple[dict[str, tuple[int, int]], TableGrowth | None]:
    """Grow ``checkpoint``'s tables (in place) as ``datamodule`` grew its vocabularies.

    Returns ``({feature: (rows before, rows after)}, growth)``; ``growth`` (or
    ``None`` when nothing grew) resizes the optimizer state once the optimizers
    exist. Only a growth the data module declares (``embedding_row_sources()``)
    is applied, and only to weights whose rows in the checkpoint are exactly
    the sizes before; anything else is left to the size checks.
    """
    declare = getattr(datamodule, "embedding_row_sources", None)
    growth = declare() if callable(declare) else {}
    state = checkpoint.get("state_dict")
    if not growth or not isinstance(state, dict):
        return {}, None
    sources = {name: (int(before), torch.as_tensor(index, dtype=torch.long)) for name, (before, index) in growth.items()}
    done: dict[str, tuple[int, int]] = {}
    rows: dict[str, tuple[Tensor, int]] = {}
    for prefix, layer in module.named_modules():
        if not isinstance(layer, FeatureEmbedding):
            continue
        mine = {name: value for name, value in sources.items() if name in layer.table_layout()}
        if not mine:
            continue
        plan = grown_rows(layer, mine)
        if any(not isinstance(state.get(f"{prefix}.{key}"), Tensor) or state[f"{prefix}.{key}"].shape[0] != size
               for key, (_, size) in plan.items()):
            continue  # not the checkpoint these vocabularies grew from: the size checks report it
        for key, (index, _) in plan.items():
            name = f"{prefix}.{key}"
            saved = state[name]
            weight = module.get_parameter(name).detach().to(device=saved.device, dtype=saved.dtype).clone()
            keep = index >= 0
            weight[keep] = saved[index[keep]]  # new rows: as this model initialised them
            state[name] = weight
            rows[name] = (index, saved.shape[0])
        done.update({name: (before, len(index)) for name, (before, index) in mine.items()})
    return done, (TableGrowth(checkpoint, rows) if rows else None)


def check_vocabularies(model: nn.Module, checkpoint: Mapping[str, Any], grown: Mapping[str, tuple[int, int]]) -> None:
    """``ValueError`` naming each feature whose table size in ``checkpoint`` differs from ``model``'s.

    Compares the checkpoint's feature specs (``hyper_parameters["model"]["init_args"]["features"]``,
    with the sizes ``grown`` applied) with ``model.features``. Without readable
    specs nothing is checked here: ``FeatureEmbedding`` checks the tables as they load.
    """
    config = (checkpoint.get("hyper_parameters") or {}).get("model")
    init_args = config.get("init_args") if isinstance(config, Mapping) else None
    features = init_args.get("features") if isinstance(init_args, Mapping) else None
    if not isinstance(features, (list, tuple)) or not isinstance(getattr(model, "features", None), tuple):
        return
    try:
        saved: list[Feature] = [feature_from_config(f) for f in features]
    except (TypeError, ValueError):
        return  # specs this version cannot read: the state dict's own checks apply
    saved = [dataclasses.replace(f, vocab_size=grown[f.name][1])
             if f.name in grown and getattr(f, "vocab_size", None) == grown[f.name][0] else f for f in saved]
    message = vocabulary_mismatch(saved, model.features)
    if message is not None:
        raise ValueError(message)


def hand_datamodule_state(datamodule: Any, states: Mapping[str, Mapping[str, Any]]) -> None:
    """Give ``datamodule`` the state its class saved in the checkpoint a model was loaded from, loudly.

    A module loaded with ``load_from_checkpoint`` remembers the data module
    state of its checkpoint (fitted categorical encoders, normalisation
    statistics, feature specs). If the data module now attached fitted its own
    (e.g. from a new ``train=`` split, because no ``ckpt_path`` was given) and
    they differ, its ids and scales no longer mean what the model learnt. The
    data module decides through its hook ``adopt_checkpoint_state(state) -> bool``
    (``ParquetDataModule.adopt_checkpoint_state``: loads the state unless it maps
    values the same way; ``True`` when it changed something); a data module
    without the hook gets Lightning's ``load_state_dict(state)`` when its
    ``state_dict()`` differs, as ``trainer.fit(ckpt_path=...)`` would. A change
    is warned about. Resuming with ``ckpt_path=`` restores the same state through
    Lightning, so nothing changes there.
    """
    state = states.get(type(datamodule).__qualname__) if datamodule is not None else None
    if not state:
        return
    adopt = getattr(datamodule, "adopt_checkpoint_state", None)
    if callable(adopt):
        changed = bool(adopt(state))
    elif hasattr(datamodule, "load_state_dict") and datamodule.state_dict() != state:
        datamodule.load_state_dict(state)
        changed = True
    else:
        changed = False
    if changed:
        rank_zero_warn(
            f"{type(datamodule).__name__}: its encoders/normalisation statistics differ from those this model was "
            "trained with (saved in its checkpoint); using the checkpoint's, so ids and scales mean what the model "
            "learnt. To train with new encoders, build a new model instead of loading this checkpoint."
        )


__all__ = [
    "LIGHTNING_CHECKPOINT_KEYS", "TableGrowth", "check_vocabularies", "datamodule_states", "grow_checkpoint_tables",
    "hand_datamodule_state",
]
