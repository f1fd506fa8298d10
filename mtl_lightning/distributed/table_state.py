"""``TorchRecStrategy``'s tables as checkpoint tensors, and back: the translation between the sharded layers and
the keys of a checkpoint folder (its format and files: ``mtl_lightning.distributed.checkpoint``).

Keys name the table, never the shard: ``tables.<layer>.<feature>`` (``(rows, dim)``) and
``table_optimizer.<layer>.<feature>.<state>`` (``momentum1``, and ``momentum2`` for Adam, under fbgemm's
names; ``step`` for the torch optimizer of ``data_parallel`` tables), so a folder loads into any sharding
and world size. ``meta.pt`` describes every table (:meth:`ShardedTables.records`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .checkpoint import check_tables, load_sharded, stored_entries
from .embedding import TorchRecEmbedding, is_sharded_tensor

# the optimizer state each fused optimizer keeps per table, under the names fbgemm gives it
STATE_NAMES = {"rowwise_adagrad": ("momentum1",), "adagrad": ("momentum1",), "sgd": (), "adam": ("momentum1", "momentum2")}
# ... and where a torch optimizer (data_parallel tables) keeps the same state
TORCH_STATE = {"rowwise_adagrad": ("sum",), "adagrad": ("sum",), "sgd": (), "adam": ("exp_avg", "exp_avg_sq")}


def _local_bytes(value: Tensor) -> int:
    if is_sharded_tensor(value):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    return value.numel() * value.element_size()


class ShardedTables:
    """The tables one ``TorchRecStrategy`` sharded, with their optimizers, as checkpoint tensors (and back).

    Args:
        layers: module path -> the ``TorchRecEmbedding`` that replaced a ``FeatureEmbedding`` there.
        plan: TorchRec's ``ShardingPlan`` (where each table went, and how).
        embedding_optimizer: the fused optimizer's name (``STATE_NAMES``).
        data_parallel: ``"<layer>.<table>"`` -> the replicated weight of each ``data_parallel`` table.

    ``replicated_optimizer`` is the torch optimizer of the ``data_parallel`` tables, set by the strategy
    once the optimizers exist (``None`` without such tables).
    """

    def __init__(self, layers: dict[str, TorchRecEmbedding], plan: Any, embedding_optimizer: str,
                 data_parallel: dict[str, nn.Parameter]) -> None:
        self.layers = layers
        self.plan = plan
        self.embedding_optimizer = embedding_optimizer
        self.data_parallel = data_parallel
        self.replicated_optimizer: torch.optim.Optimizer | None = None

    # ---------------------------------------------------------------- save
    def records(self) -> list[dict[str, Any]]:
        """``meta.pt``'s description of every table: key, layer, shape, where it sits in ``FeatureEmbedding``."""
        records = []
        for path, layer in self.layers.items():
            placement = {table: sharding for name in layer.collections()
                         for table, sharding in self.plan.plan.get(f"{path}.{name}", {}).items()}
            for table in layer.tables.values():
                records.append({"key": f"tables.{path}.{table.name}", "layer": path, "table": table.name,
                                "rows": table.rows, "dim": table.dim, "plain_key": table.plain_key,
                                "first_row": table.first_row, "dtype": "float32",
                                "sharding": placement[table.name].sharding_type})
        return records

    def module_keys(self) -> set[str]:
        """The module ``state_dict`` keys of the tables (kept out of ``meta.pt``)."""
        keys = set()
        for path, layer in self.layers.items():
            for name, collection in layer.collections().items():
                keys.update(f"{path}.{name}.{key}" for key in collection.state_dict())
        return keys

    def tensors(self, with_optimizer: bool) -> dict[str, Tensor]:
        """``tables.<layer>.<table>`` (and ``table_optimizer.<layer>.<table>.<state>``): this rank's shards."""
        tensors: dict[str, Tensor] = {}
        for path, layer in self.layers.items():
            for table, value in layer.table_tensors().items():
                tensors[f"tables.{path}.{table}"] = value
            if with_optimizer:
                tensors.update(self.optimizer_tensors(path, layer))
        return tensors

    def optimizer_tensors(self, path: str, layer: TorchRecEmbedding) -> dict[str, Tensor]:
        """The embedding optimizer's state of one layer's tables (fused, and the data_parallel tables' torch one)."""
        names = STATE_NAMES[self.embedding_optimizer]
        found: dict[str, Tensor] = {}
        for collection in layer.collections().values():
            for param_key, state in collection.fused_optimizer.state_dict()["state"].items():
                table = param_key.split(".")[-2]
                for state_name in names:
                    value = state.get(f"{table}.{state_name}")
                    if value is not None:
                        found[f"table_optimizer.{path}.{table}.{state_name}"] = value
        optimizer = self.replicated_optimizer
        if optimizer is None or not names:
            return found
        for key, parameter in self.data_parallel.items():
            if not key.startswith(path + "."):
                continue
            state = optimizer.state.get(parameter, {})
            table = layer.tables[key[len(path) + 1:]]
            if "step" not in state:  # Adam's state exists after its first step only: made here to be loaded into
                state["step"] = torch.zeros(())
                for torch_name in TORCH_STATE[self.embedding_optimizer]:
                    state[torch_name] = torch.zeros_like(parameter)
                optimizer.state[parameter] = state
            for state_name, torch_name in zip(names, TORCH_STATE[self.embedding_optimizer]):
                value = state[torch_name]
                if self.embedding_optimizer == "rowwise_adagrad":
                    value = value.view(table.rows)  # (rows, 1) in torchrec's RowWiseAdagrad, (rows,) fused
                found[f"table_optimizer.{path}.{table.name}.{state_name}"] = value
            # the step count (Adam's bias correction); fused kernels keep none a checkpoint can hold on CPU
            found[f"table_optimizer.{path}.{table.name}.step"] = state["step"]
        return found

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds for the tables: ``{"weights": ..., "optimizer": ...}`` (its shards only)."""
        weights = optimizer = 0
        for path, layer in self.layers.items():
            weights += sum(_local_bytes(value) for value in layer.table_tensors().values())
            optimizer += sum(_local_bytes(value) for value in self.optimizer_tensors(path, layer).values())
        return {"weights": weights, "optimizer": optimizer}

    # ---------------------------------------------------------------- load
    def load(self, folder: Path, info: Mapping[str, Any], fitting: bool) -> None:
        """Fill this rank's shards (and, resuming ``fit`` with the same optimizer, its state) from ``folder``.

        ``info`` is ``meta.pt``'s ``"torchrec"`` entry (validated by ``read_meta``). The folder's index is
        validated, must agree with ``info``, and must hold every table of the model in its shape; a table
        that is missing or of another shape raises ``ValueError`` naming it before anything is read.
        """
        saved = info.get("embedding_optimizer")
        with_optimizer = fitting and saved == self.embedding_optimizer
        if fitting and saved is not None and saved != self.embedding_optimizer:
            rank_zero_warn(f"checkpoint {folder}: its embedding tables were trained with {saved!r}, this strategy "
                           f"uses {self.embedding_optimizer!r}; the tables' optimizer state starts afresh")
        entries = stored_entries(folder)
        check_tables(folder, info["tables"], entries)
        stored = {key: shape for key, (shape, _) in entries.items()}
        tensors = self.tensors(with_optimizer)
        tensors = {k: v for k, v in tensors.items() if k in stored or not k.endswith(".step")}  # from fused: none
        reshaped = sorted(k for k, v in tensors.items() if k.startswith("table_optimizer.") and k in stored
                          and tuple(v.shape) != stored[k])
        if reshaped:  # row-wise accumulators are per column shard in TorchRec: another column split has others
            rank_zero_warn(f"checkpoint {folder}: the embedding optimizer's state of {reshaped} was written for "
                           "another column split of those tables (row-wise accumulators are kept per column shard); "
                           "it starts afresh, the tables themselves are loaded")
            tensors = {k: v for k, v in tensors.items() if not k.startswith("table_optimizer.")}
            with_optimizer = False
        missing = sorted(set(tensors) - set(stored))
        if missing:
            raise ValueError(f"checkpoint {folder} lacks {missing}: it was written for other embedding tables "
                             "(features added or renamed since)")
        for key, value in tensors.items():
            if tuple(value.shape) != stored[key]:
                what = f"table {key[len('tables.'):]!r}" if key.startswith("tables.") else f"entry {key!r}"
                raise ValueError(f"checkpoint {folder}: {what} is {stored[key]} there and {tuple(value.shape)} in the "
                                 "model (the vocabulary or embedding_dim changed since it was written)")
        load_sharded(folder, tensors, dist.group.WORLD)
        if with_optimizer:
            self._restore_fused_state(tensors)

    def _restore_fused_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Hand the loaded optimizer state to the fused optimizers (the data_parallel tables' was loaded in place)."""
        names = STATE_NAMES[self.embedding_optimizer]
        for path, layer in self.layers.items():
            for collection in layer.collections().values():
                optimizer = collection.fused_optimizer
                state = optimizer.state_dict()
                for param_key, entries in state["state"].items():
                    table = param_key.split(".")[-2]
                    for state_name in names:
                        key = f"table_optimizer.{path}.{table}.{state_name}"
                        if f"{table}.{state_name}" in entries and key in tensors:
                            entries[f"{table}.{state_name}"] = tensors[key]
                optimizer.load_state_dict(state)


__all__ = ["ShardedTables", "STATE_NAMES", "TORCH_STATE"]
