"""``TorchRecStrategy``: sharded embedding tables with fused optimizers, as one Lightning ``strategy=``.

``Trainer(strategy=TorchRecStrategy(sharding="table_wise"), accelerator="cpu", devices=2)``,
or from the CLI ``trainer.strategy.class_path: mtl_lightning.distributed.TorchRecStrategy``.
``Trainer(strategy="torchrec")`` (and ``--trainer.strategy=torchrec``) is the
strategy at its defaults, registered in Lightning's ``StrategyRegistry`` when
``mtl_lightning`` is imported.

What it does at set-up, in every process (after the process group exists):

1. every ``FeatureEmbedding`` of the module is replaced by a
   :class:`~mtl_lightning.distributed.embedding.TorchRecEmbedding` (same outputs;
   its tables in a TorchRec ``EmbeddingBagCollection``, and an
   ``EmbeddingCollection`` for tables a max-pooled sequence reads), built on the
   meta device;
2. TorchRec's planner places the tables (``sharding``), the embedding
   optimizer is attached to them (``apply_optimizer_in_backward``), and
   ``DistributedModelParallel`` shards them and wraps the rest of the module in
   ``DistributedDataParallel``;
3. each rank copies its shards' values from the original tables (a seeded
   model starts exactly where it would without the strategy), or, for a
   module built inside ``trainer.init_module()`` (deferred tables, see
   :meth:`TorchRecStrategy.tensor_init_context`), draws just its shards' rows
   of the tables' ``initial_rows`` with rank 0's ``table_seed``; rank 0's
   replicated values are broadcast;
4. the module's own optimizer (``configure_optimizers``) keeps every parameter
   but the tables (the dense part, data-parallel); sharded tables are updated
   inside the backward pass by fbgemm's fused kernels; ``data_parallel`` tables
   (replicated, gradients averaged) by the same update rule as a torch optimizer
   stepped with the module's.

TorchRec averages the tables' gradients over the ranks, like DDP does for the
dense part, so a run on ``N`` processes follows the same trajectory as one
process fed the ``N`` batches at once (for losses that are means over rows).

Limits: only the fused optimizers (``embedding_optimizer``), at a constant
``embedding_lr`` (learning-rate schedulers act on the dense optimizer);
gradient clipping and accumulation do not reach the sharded tables (they are
updated at every backward); weighting strategies that take per-task gradients
of the shared parameters when those include a table (``takes_shared_gradients``:
PCGrad, MGDA, ExcessMTL, PE-LTR, ...) are refused;
``sparse_embeddings=True`` is refused (the fused optimizers replace it).
``row_wise``/``table_row_wise`` sharding and fused Adam exist in TorchRec only
on CUDA.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..batch import Batch
from ..checkpoint import load_checkpoint
from ..layers.embedding import FeatureEmbedding, deferred_tables
from ..weighting import WeightingStrategy
from ._torchrec import require_torchrec
from .checkpoint import FORMAT, is_sharded_checkpoint, load_sharded, read_meta, save_sharded, stored_keys
from .embedding import TableSpec, TorchRecEmbedding, is_sharded_tensor, replace_feature_embeddings, table_specs

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise", "data_parallel")
CUDA_ONLY_SHARDING = ("row_wise", "table_row_wise")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
# the optimizer state each keeps per table, under the names fbgemm gives it
_STATE_NAMES = {"rowwise_adagrad": ("momentum1",), "adagrad": ("momentum1",), "sgd": (), "adam": ("momentum1", "momentum2")}
# ... and where a torch optimizer (data_parallel tables) keeps the same state
_TORCH_STATE = {"rowwise_adagrad": ("sum",), "adagrad": ("sum",), "sgd": (), "adam": ("exp_avg", "exp_avg_sq")}
_KWARGS = {"rowwise_adagrad": ("eps",), "adagrad": ("eps",), "sgd": (), "adam": ("eps", "betas")}


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad
    return {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]


def refused_weighting(weighting: WeightingStrategy, model: nn.Module) -> str | None:
    """Why ``weighting`` cannot run under ``TorchRecStrategy`` (it needs per-task gradients of tables), or ``None``."""
    tables = {id(p) for m in model.modules() if isinstance(m, FeatureEmbedding) for p in m.embedding_parameters()}
    shared = model.shared_parameters() if weighting.takes_shared_gradients else []
    if weighting.needs_embedding_gradients or any(id(p) in tables for p in shared):
        return (
            f"weighting {type(weighting).__name__!r} takes per-task gradients of the architecture's shared "
            "parameters, embedding tables included; under TorchRecStrategy the tables are updated inside the backward "
            "pass by a fused optimizer and have no per-task gradients. Use a loss-weighting strategy (static, "
            "gradnorm, uncertainty, dwa, rlw, scheduled, famo, gls, stch), MGDA-UB or GradDrop on a representation, "
            "or DDPStrategy for this one"
        )
    return None


class TorchRecStrategy(DDPStrategy):
    """Lightning strategy: embedding tables sharded by TorchRec, the dense part data-parallel (see the module doc).

    Args:
        sharding: ``"auto"`` (TorchRec's planner chooses per table), one of
            ``"table_wise"`` (each table whole on one rank), ``"column_wise"``
            (a table's columns split over ranks), ``"table_column_wise"``,
            ``"row_wise"``/``"table_row_wise"`` (rows split; CUDA only),
            ``"data_parallel"`` (every rank holds every table), or a dict
            ``{feature: type}`` (a feature sharing a table names its owner's;
            tables not named are planned).
        embedding_optimizer: ``"rowwise_adagrad"`` (one accumulator per row),
            ``"adagrad"``, ``"sgd"``, or ``"adam"`` (fused Adam needs CUDA;
            on CPU only for ``data_parallel`` tables).
        embedding_lr: the tables' learning rate (constant).
        embedding_optimizer_kwargs: ``eps`` (default 1e-8) and, for Adam,
            ``betas``.
        process_group_backend: ``"gloo"`` on CPU (the default there), ``"nccl"`` on GPUs.
        find_unused_parameters: passed to the dense part's ``DistributedDataParallel``.

    The other arguments are ``DDPStrategy``'s (the Trainer fills them in).
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding: str | dict[str, str] = "auto",
        embedding_optimizer: str = "rowwise_adagrad",
        embedding_lr: float = 0.01,
        embedding_optimizer_kwargs: dict[str, Any] | None = None,
        process_group_backend: str | None = None,
        find_unused_parameters: bool = False,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
    ) -> None:
        require_torchrec()
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self.sharding = self._check_sharding(sharding)
        if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS} (TorchRec's fused "
                             f"optimizers), got {embedding_optimizer!r}")
        if isinstance(embedding_lr, bool) or not isinstance(embedding_lr, numbers.Real) \
                or not math.isfinite(embedding_lr) or embedding_lr < 0:
            raise ValueError(f"embedding_lr must be a finite number >= 0, got {embedding_lr!r}")
        kwargs = dict(embedding_optimizer_kwargs or {})
        unknown = sorted(set(kwargs) - set(_KWARGS[embedding_optimizer]))
        if unknown:
            raise ValueError(f"embedding_optimizer_kwargs {unknown} are not supported for {embedding_optimizer!r}; "
                             f"it takes {list(_KWARGS[embedding_optimizer]) or 'none'} (the learning rate is embedding_lr)")
        if "eps" in _KWARGS[embedding_optimizer]:
            kwargs.setdefault("eps", 1e-8)  # fbgemm's default, also given to the torch optimizer of data_parallel tables
        self.embedding_optimizer = embedding_optimizer
        self.embedding_lr = float(embedding_lr)
        self.embedding_optimizer_kwargs = kwargs
        self.find_unused_parameters = bool(find_unused_parameters)
        self.plan: Any = None  # TorchRec's ShardingPlan, once set up
        self._layers: dict[str, TorchRecEmbedding] = {}  # module path -> layer
        self._sharded_module: nn.Module | None = None
        self._fit_ready = False  # set up for training (the dense part data-parallel), not for evaluation only
        self._dmp: nn.Module | None = None
        self._table_optimizer: torch.optim.Optimizer | None = None
        self._data_parallel_tables: dict[str, nn.Parameter] = {}  # "<layer>.<table>" -> replicated weight

    # ------------------------------------------------------------- arguments
    @staticmethod
    def _check_sharding(sharding: str | Mapping[str, str]) -> str | dict[str, str]:
        choices = ("auto", *SHARDING_TYPES)
        if isinstance(sharding, str):
            if sharding not in choices:
                raise ValueError(f"sharding must be one of {choices} or a dict {{feature: type}}, got {sharding!r}")
            return sharding
        if not isinstance(sharding, Mapping):
            raise TypeError(f"sharding must be a string or a dict {{feature: type}}, got {type(sharding).__name__}")
        bad = {k: v for k, v in sharding.items() if v not in SHARDING_TYPES}
        if bad:
            raise ValueError(f"sharding types must be among {SHARDING_TYPES}; got {bad}")
        return dict(sharding)

    def _fused_kwargs(self) -> dict[str, Any]:
        kwargs = {"lr": self.embedding_lr, **self.embedding_optimizer_kwargs}
        if "betas" in kwargs:
            kwargs["beta1"], kwargs["beta2"] = kwargs.pop("betas")
        return kwargs

    def _torch_kwargs(self) -> dict[str, Any]:
        return {"lr": self.embedding_lr, **self.embedding_optimizer_kwargs}

    # ------------------------------------------------------------------ setup
    def connect(self, model: L.LightningModule) -> None:
        """Refuse, before any process group exists, what cannot run sharded."""
        hparams = getattr(model, "hparams", {})
        if hparams.get("sparse_embeddings"):
            raise ValueError("sparse_embeddings=True cannot be combined with TorchRecStrategy: its fused embedding "
                             "optimizers already update only the rows a batch touches; use sparse_embeddings=False")
        weighting = getattr(model, "weighting", None)
        architecture = getattr(model, "model", None)
        already = any(isinstance(m, TorchRecEmbedding) for m in model.modules())
        if not already and not any(isinstance(m, FeatureEmbedding) for m in model.modules()):
            raise ValueError(f"TorchRecStrategy shards the tables of FeatureEmbedding layers; "
                             f"{type(model).__name__} has none")
        if isinstance(weighting, WeightingStrategy) and isinstance(architecture, nn.Module) and not already:
            reason = refused_weighting(weighting, architecture)
            if reason is not None:
                raise ValueError(reason)
        if not already:  # the sharding and optimizer must fit the tables and the device: checked before any change
            self._constraints([t for m in model.modules() if isinstance(m, FeatureEmbedding)
                               for t in table_specs(m).values()])
        super().connect(model)

    def setup(self, trainer: L.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        module = self.lightning_module
        assert module is not None
        if self._sharded_module is not None and self._sharded_module is not module:
            raise ValueError("this TorchRecStrategy already sharded another module; give each module its own "
                             "Trainer(strategy=TorchRecStrategy(...))")
        if self._sharded_module is None:
            if any(isinstance(m, TorchRecEmbedding) for m in module.modules()):
                raise ValueError(
                    "this module's tables were sharded by another TorchRecStrategy (an earlier Trainer); use that "
                    "Trainer again, or load its checkpoint (MultiTaskLightningModule.load_from_checkpoint) for a new one")
            self.precision_plugin.convert_module(module)
            self._dmp = self._shard(module, data_parallel=fitting)
            self._sharded_module = module
            self._fit_ready = fitting
        elif fitting and not self._fit_ready:
            raise ValueError("this TorchRecStrategy set the module up for evaluation only; fit it with a new "
                             "Trainer(strategy=TorchRecStrategy(...)) before evaluating it")
        self.model = self._dmp
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: L.LightningModule, data_parallel: bool) -> nn.Module:
        """Replace the FeatureEmbedding layers, plan, shard, copy the tables in; returns the DMP-wrapped module."""
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        device = self.root_device
        self._layers = replace_feature_embeddings(module, device="meta")
        # the rest to the device; the new collections stay on meta until sharded (the replaced FeatureEmbedding
        # layers, in layer.source until copied, are out of the tree: deferred or not, they stay where they are)
        module._apply(lambda t: t if t.is_meta else t.to(device))
        self._agree_on_table_seeds()
        if isinstance(getattr(module, "weighting", None), WeightingStrategy):
            module.weighting.backward_through_model = True  # the tables learn in the backward pass (GradNorm)
        group = dist.group.WORLD
        sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
        self.plan = self._planner().collective_plan(module, sharders, group)
        data_parallel_paths = set()
        for path, layer in self._layers.items():
            for name, collection in layer.collections().items():
                placement = self.plan.plan.get(f"{path}.{name}", {})
                for key, parameter in collection.named_parameters():
                    table = key.split(".")[-2]
                    if placement[table].sharding_type == "data_parallel":
                        data_parallel_paths.add(f"{path}.{table}")
                    else:
                        apply_optimizer_in_backward(_optimizer_class(self.embedding_optimizer), [parameter],
                                                    self._fused_kwargs())
        wrapper = DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=self.find_unused_parameters)
        dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(group), device=device,
                                       plan=self.plan, sharders=sharders,
                                       # one process: no DistributedDataParallel around the dense part (nothing to
                                       # average; its per-step bucket copies took about 6 % of an MMoE step in a CPU profile)
                                       init_data_parallel=data_parallel and self.world_size > 1,
                                       data_parallel_wrapper=wrapper)
        for layer in self._layers.values():
            layer.copy_tables_from(layer.__dict__.pop("source"))
        self._data_parallel_tables = {}
        for path, layer in self._layers.items():
            for collection in layer.collections().values():
                for key, parameter in collection.named_parameters():
                    if f"{path}.{key.split('.')[-2]}" in data_parallel_paths:
                        self._data_parallel_tables[f"{path}.{key.split('.')[-2]}"] = parameter
        self._broadcast_replicated(module)
        return dmp

    def _agree_on_table_seeds(self) -> None:
        """Deferred layers take rank 0's ``table_seed`` (ranks seeded differently still start from one table)."""
        for layer in self._layers.values():
            source = layer.__dict__["source"]
            if self.world_size > 1 and source.table_seed is not None:
                seed = torch.tensor([source.table_seed], dtype=torch.long, device=self.root_device)  # nccl: on GPU
                dist.broadcast(seed, src=0)
                source.table_seed = int(seed)

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """``with trainer.init_module():`` builds the module with deferred embedding tables (``empty_init=False``: not).

        Inside, every ``FeatureEmbedding`` holds its tables as meta tensors
        (``mtl_lightning.layers.deferred_tables``): at set-up each process
        allocates only its shards and fills them with the tables'
        ``initial_rows``, so no process ever holds a whole table. The dense
        part is built and initialised as usual (on the strategy's device).
        """
        with super().tensor_init_context(empty_init=False), \
                (deferred_tables() if empty_init is None or empty_init else nullcontext()):
            yield

    def _planner(self) -> Any:
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

        tables = [t for layer in self._layers.values() for t in layer.tables.values()]
        return EmbeddingShardingPlanner(
            topology=Topology(world_size=self.world_size, compute_device=self.root_device.type,
                              local_world_size=self.num_processes),
            constraints=self._constraints(tables),
        )

    def _constraints(self, tables: list[TableSpec]) -> dict[str, Any]:
        """The planner's constraints per table; ``ValueError`` for a sharding or optimizer the device lacks."""
        from torchrec.distributed.planner import ParameterConstraints

        cuda = self.root_device.type == "cuda"
        offered = [t for t in SHARDING_TYPES if cuda or t not in CUDA_ONLY_SHARDING]
        fused_on_device = cuda or self.embedding_optimizer != "adam"
        constraints = {}
        for table in tables:
            wanted = self._requested(table.name, table.readers)
            if wanted is not None and wanted not in offered:
                raise ValueError(f"sharding {wanted!r} (table {table.name!r}) needs CUDA: TorchRec offers row-wise "
                                 f"sharding only there; on {self.root_device.type} use one of {offered}")
            if wanted == "data_parallel" and table.unpooled:
                raise ValueError(
                    f"table {table.name!r} is read by a max-pooled sequence, which TorchRec serves from an "
                    "EmbeddingCollection; its data_parallel sharding gives wrong shapes on CPU (TorchRec 1.8): "
                    f"shard it table_wise or column_wise, e.g. sharding={{{table.name!r}: 'table_wise', ...}}")
            if wanted not in (None, "data_parallel") and not fused_on_device:
                raise ValueError(
                    f"embedding_optimizer='adam' has no fused kernel on {self.root_device.type} (fbgemm has fused "
                    f"Adam on CUDA only), so table {table.name!r} cannot be sharded {wanted!r}; use "
                    "rowwise_adagrad, adagrad or sgd, or sharding='data_parallel'")
            if wanted is not None:
                types = [wanted]
            else:
                types = [t for t in offered if (fused_on_device or t == "data_parallel")
                         and not (table.unpooled and t == "data_parallel")]
            kernels = (["dense"] if types == ["data_parallel"] else ["fused"] if "data_parallel" not in types
                       else None)
            constraints[table.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
        return constraints

    def _requested(self, table: str, readers: tuple[str, ...]) -> str | None:
        if isinstance(self.sharding, str):
            return None if self.sharding == "auto" else self.sharding
        named = {self.sharding[r] for r in readers if r in self.sharding}
        if len(named) > 1:
            raise ValueError(f"sharding names {sorted(named)} for features {list(readers)}, which share table "
                             f"{table!r}: give one type per table")
        return named.pop() if named else None

    def _broadcast_replicated(self, module: nn.Module) -> None:
        """Every rank takes rank 0's replicated tensors (dense part, data_parallel tables)."""
        if self.world_size <= 1:
            return
        with torch.no_grad():
            for value in module.state_dict().values():
                if isinstance(value, Tensor) and not is_sharded_tensor(value):
                    dist.broadcast(value, src=0)

    def table_parameters(self) -> list[nn.Parameter]:
        """The parameters of every sharded collection (the module's own optimizer leaves them out)."""
        return [p for layer in self._layers.values() for collection in layer.collections().values()
                for p in collection.parameters()]

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        """The module's optimizers without the tables; data_parallel tables get the embedding optimizer's rule."""
        super().setup_optimizers(trainer)
        tables = {id(p) for p in self.table_parameters()}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in tables]
        replicated = list(self._data_parallel_tables.values())
        self._table_optimizer = (_optimizer_class(self.embedding_optimizer)(replicated, **self._torch_kwargs())
                                 if replicated else None)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
                       model: L.LightningModule | nn.Module | None = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._table_optimizer is not None:
            self._table_optimizer.step()
            self._table_optimizer.zero_grad(set_to_none=True)
        return output

    # ------------------------------------------------------------ evaluation
    def process_dataloader(self, dataloader: object) -> object:
        """Evaluation and prediction loaders give every rank as many batches (sharded lookups are collective).

        A rank whose share of a split ends early runs empty batches (0 rows)
        until the others are done; training loaders are left alone (the data
        module already pads them to equal length).
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.world_size <= 1 or trainer is None or trainer.state.stage == RunningStage.TRAINING:
            return dataloader
        return _EqualBatches(dataloader, self)

    # ----------------------------------------------------------- checkpoints
    def _table_records(self) -> list[dict[str, Any]]:
        records = []
        for path, layer in self._layers.items():
            placement = {table: sharding for name in layer.collections()
                         for table, sharding in self.plan.plan.get(f"{path}.{name}", {}).items()}
            for table in layer.tables.values():
                records.append({"key": f"tables.{path}.{table.name}", "layer": path, "table": table.name,
                                "rows": table.rows, "dim": table.dim, "plain_key": table.plain_key,
                                "first_row": table.first_row, "dtype": "float32",
                                "sharding": placement[table.name].sharding_type})
        return records

    def _table_keys(self) -> set[str]:
        """The module ``state_dict`` keys of the tables (kept out of ``meta.pt``)."""
        keys = set()
        for path, layer in self._layers.items():
            for name, collection in layer.collections().items():
                keys.update(f"{path}.{name}.{key}" for key in collection.state_dict())
        return keys

    def _table_state(self, with_optimizer: bool) -> dict[str, Tensor]:
        """``tables.<layer>.<table>`` (and ``table_optimizer.<layer>.<table>.<state>``): this rank's shards."""
        tensors: dict[str, Tensor] = {}
        for path, layer in self._layers.items():
            for table, value in layer.table_tensors().items():
                tensors[f"tables.{path}.{table}"] = value
            if with_optimizer:
                tensors.update(self._optimizer_tensors(path, layer))
        return tensors

    def _optimizer_tensors(self, path: str, layer: TorchRecEmbedding) -> dict[str, Tensor]:
        names = _STATE_NAMES[self.embedding_optimizer]
        found: dict[str, Tensor] = {}
        for collection in layer.collections().values():
            for param_key, state in collection.fused_optimizer.state_dict()["state"].items():
                table = param_key.split(".")[-2]
                for state_name in names:
                    value = state.get(f"{table}.{state_name}")
                    if value is not None:
                        found[f"table_optimizer.{path}.{table}.{state_name}"] = value
        if self._table_optimizer is not None:
            for key, parameter in self._data_parallel_tables.items():
                if not key.startswith(path + "."):
                    continue
                state = self._table_optimizer.state.get(parameter, {})
                table = layer.tables[key[len(path) + 1:]]
                if not names:
                    continue
                if "step" not in state:  # Adam's state exists after its first step only: made here to be loaded into
                    state["step"] = torch.zeros(())
                    for torch_name in _TORCH_STATE[self.embedding_optimizer]:
                        state[torch_name] = torch.zeros_like(parameter)
                    self._table_optimizer.state[parameter] = state
                for state_name, torch_name in zip(names, _TORCH_STATE[self.embedding_optimizer]):
                    value = state[torch_name]
                    if self.embedding_optimizer == "rowwise_adagrad":
                        value = value.view(table.rows)  # (rows, 1) in torchrec's RowWiseAdagrad, (rows,) fused
                    found[f"table_optimizer.{path}.{table.name}.{state_name}"] = value
                # the step count (Adam's bias correction); fused kernels keep none a checkpoint can hold on CPU
                found[f"table_optimizer.{path}.{table.name}.step"] = state["step"]
        return found

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state without the tables (those go to the DCP files)."""
        tables = self._table_keys()
        return {k: v for k, v in self.lightning_module.state_dict().items() if k not in tables}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        """Write the checkpoint folder ``filepath`` (see ``mtl_lightning.distributed.checkpoint``); every rank calls it."""
        if storage_options is not None:
            raise TypeError("TorchRecStrategy.save_checkpoint takes no storage_options")
        with_optimizer = "optimizer_states" in checkpoint
        meta = dict(checkpoint)
        meta["torchrec"] = {"format": FORMAT, "world_size": self.world_size, "tables": self._table_records(),
                            "embedding_optimizer": self.embedding_optimizer if with_optimizer else None}
        save_sharded(filepath, meta, self._table_state(with_optimizer), dist.group.WORLD, self.is_global_zero,
                     lambda data, path: self.checkpoint_io.save_checkpoint(data, path))

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)  # fsspec's recursive rm: a folder too

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the tables are filled in place, so the sharded module and the optimizers must exist

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """A folder written by this strategy (any sharding, any world size), or a plain checkpoint file
        (weights only: ``validate``/``test``/``predict``, not resuming ``fit``)."""
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if is_sharded_checkpoint(checkpoint_path):
            checkpoint = read_meta(checkpoint_path)
            self._load_tables(Path(checkpoint_path), checkpoint["torchrec"], fitting)
            return checkpoint
        checkpoint = load_checkpoint(checkpoint_path)  # weights_only=True, clear errors
        if fitting:
            raise ValueError(
                f"checkpoint {checkpoint_path} was not written by TorchRecStrategy (not a checkpoint folder), so it "
                "holds no embedding optimizer state to resume from. To train its weights further under the strategy, "
                "load them first, MultiTaskLightningModule.load_from_checkpoint(path), and fit without ckpt_path")
        state = dict(checkpoint["state_dict"])
        for path, layer in self._layers.items():
            for key in layer.load_plain_tables(state, f"{path}."):
                del state[key]
        checkpoint["state_dict"] = state
        return checkpoint

    def _load_tables(self, path: Path, info: Mapping[str, Any], fitting: bool) -> None:
        saved = info.get("embedding_optimizer")
        with_optimizer = fitting and saved == self.embedding_optimizer
        if fitting and saved is not None and saved != self.embedding_optimizer:
            rank_zero_warn(f"checkpoint {path}: its embedding tables were trained with {saved!r}, this strategy uses "
                           f"{self.embedding_optimizer!r}; the tables' optimizer state starts afresh")
        tensors = self._table_state(with_optimizer)
        stored = stored_keys(path)
        tensors = {k: v for k, v in tensors.items() if k in stored or not k.endswith(".step")}  # from fused: none
        reshaped = sorted(k for k, v in tensors.items() if k.startswith("table_optimizer.") and k in stored
                          and tuple(v.shape) != stored[k])
        if reshaped:  # row-wise accumulators are per column shard in TorchRec: another column split has others
            rank_zero_warn(f"checkpoint {path}: the embedding optimizer's state of {reshaped} was written for another "
                           "column split of those tables (row-wise accumulators are kept per column shard); it starts "
                           "afresh, the tables themselves are loaded")
            tensors = {k: v for k, v in tensors.items() if not k.startswith("table_optimizer.")}
            with_optimizer = False
        missing = sorted(set(tensors) - set(stored))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {missing}: it was written for other embedding tables (features "
                             "added or renamed since)")
        shapes = {r["key"]: (r["rows"], r["dim"]) for r in info["tables"]}
        for key, value in tensors.items():
            if key in shapes and tuple(value.shape) != shapes[key]:
                raise ValueError(f"checkpoint {path}: table {key[len('tables.'):]!r} is {shapes[key][0]} x "
                                 f"{shapes[key][1]} there and {value.shape[0]} x {value.shape[1]} in the model (the "
                                 "vocabulary or embedding_dim changed since it was written)")
        load_sharded(path, tensors, dist.group.WORLD)
        if with_optimizer:
            self._restore_fused_state(tensors)

    def _restore_fused_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Hand the loaded optimizer state to the fused optimizers and the data_parallel tables' optimizer."""
        names = _STATE_NAMES[self.embedding_optimizer]
        for path, layer in self._layers.items():
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

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """The dense part (the tables were loaded with the checkpoint); anything else missing or unexpected raises."""
        result = self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = sorted(set(result.missing_keys) - self._table_keys())
        if strict and (missing or result.unexpected_keys):
            raise ValueError(f"the checkpoint does not fit the module: missing keys {missing}, unexpected keys "
                             f"{sorted(result.unexpected_keys)}")

    def table_memory(self) -> dict[str, int]:
        """Bytes this rank holds for the tables: ``{"weights": ..., "optimizer": ...}`` (its shards only)."""
        weights = optimizer = 0
        for path, layer in self._layers.items():
            for value in layer.table_tensors().values():
                weights += sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards()) \
                    if is_sharded_tensor(value) else value.numel() * value.element_size()
            for value in self._optimizer_tensors(path, layer).values():
                optimizer += sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards()) \
                    if is_sharded_tensor(value) else value.numel() * value.element_size()
        return {"weights": weights, "optimizer": optimizer}


StrategyRegistry.register(
    "torchrec", TorchRecStrategy,
    description="TorchRec-sharded embedding tables (planner's choice per table), fused row-wise Adagrad at 0.01",
)


class _EqualBatches:
    """Iterates a loader; a rank that runs out yields empty batches until every rank has (one all-reduce a batch)."""

    def __init__(self, loader: Any, strategy: TorchRecStrategy) -> None:
        self.loader = loader
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Batch]:
        template = None
        iterator = iter(self.loader)
        while True:
            batch = next(iterator, None)
            if batch is not None and template is None:
                template = _empty_like(batch)
            flag = torch.tensor([0 if batch is None else 1], device=self.strategy.root_device)  # nccl: on GPU
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag) == 0:
                return
            yield batch if batch is not None else (template if template is not None else self._spec_batch())

    def _spec_batch(self) -> Batch:
        """An empty batch built from the module's feature specs and tasks (a rank with no batch at all)."""
        from ..features import DenseFeature, SequenceFeature

        module = self.strategy.lightning_module
        features = {}
        for f in module.model.features:
            if isinstance(f, SequenceFeature):
                features[f.name] = torch.zeros(0, f.max_len, dtype=torch.long)
            elif isinstance(f, DenseFeature):
                features[f.name] = torch.zeros((0,) if f.dim == 1 else (0, f.dim))
            else:
                features[f.name] = torch.zeros(0, dtype=torch.long)
        labels = {t.name: torch.zeros(0) for t in module.tasks}
        return {"features": features, "labels": labels, "row_id": torch.zeros(0, dtype=torch.long)}


def _empty_like(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch[:0] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _empty_like(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch


__all__ = ["TorchRecStrategy", "refused_weighting", "SHARDING_TYPES", "EMBEDDING_OPTIMIZERS"]
