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
updated at every backward); a weighting strategy whose per-task gradients
include a table (what it declares it reads: :func:`refused_weighting`) is
refused, and so is ``sparse_embeddings=True`` (the fused optimizers replace it).
Checkpoints are folders, written atomically and read as data only
(``mtl_lightning.distributed.checkpoint``).
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
from torch import Tensor, nn

from ..batch import Batch
from ..checkpoint_files import load_checkpoint
from ..layers.embedding import FeatureEmbedding, deferred_tables
from ..weighting import STRATEGIES, WeightingStrategy
from ._torchrec import require_torchrec
from .checkpoint import EMBEDDING_OPTIMIZERS, FORMAT, is_sharded_checkpoint, read_meta, save_sharded
from .embedding import TableSpec, TorchRecEmbedding, is_sharded_tensor, replace_feature_embeddings, table_specs
from .planning import SHARDING_TYPES, check_sharding, table_constraints
from .table_state import ShardedTables

_KWARGS = {"rowwise_adagrad": ("eps",), "adagrad": ("eps",), "sgd": (), "adam": ("eps", "betas")}


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad
    return {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]


def refused_weighting(weighting: WeightingStrategy, model: nn.Module) -> str | None:
    """Why ``weighting`` cannot run under ``TorchRecStrategy``, or ``None``.

    Refused: a strategy that declares ``needs_embedding_gradients``, or one whose
    per-task gradients (``weighting.per_task_gradient_parameters(model)``, derived
    from what the strategy declares it reads) include an embedding table: the
    tables are updated inside the backward pass and have no per-task gradients.
    The alternatives the message lists are derived the same way from every
    registered strategy.
    """
    tables = {id(p) for m in model.modules() if isinstance(m, FeatureEmbedding) for p in m.embedding_parameters()}
    if not weighting.needs_embedding_gradients and \
            not any(id(p) in tables for p in weighting.per_task_gradient_parameters(model)):
        return None
    runnable = sorted(name for name, cls in STRATEGIES.items() if cls.runs_with_fused_tables())
    on_representation = sorted(f"{name}({', '.join(f'{k}={v!r}' for k, v in cls.representation_arguments.items())})"
                               for name, cls in STRATEGIES.items() if cls.representation_arguments)
    return (
        f"weighting {type(weighting).__name__!r} takes per-task gradients of the architecture's shared "
        "parameters, embedding tables included; under TorchRecStrategy the tables are updated inside the backward "
        f"pass by a fused optimizer and have no per-task gradients. Use a strategy that reads no per-task table "
        f"gradient ({', '.join(runnable)}), one on a shared representation ({', '.join(on_representation)}), "
        "or DDPStrategy for this one"
    )


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
        self.sharding = check_sharding(sharding)
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
        self._tables: ShardedTables | None = None  # the sharded tables as checkpoint tensors, once set up

    # ------------------------------------------------------------- arguments
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
        data_parallel_tables = {}  # "<layer>.<table>" -> replicated weight
        for path, layer in self._layers.items():
            for collection in layer.collections().values():
                for key, parameter in collection.named_parameters():
                    if f"{path}.{key.split('.')[-2]}" in data_parallel_paths:
                        data_parallel_tables[f"{path}.{key.split('.')[-2]}"] = parameter
        self._tables = ShardedTables(self._layers, self.plan, self.embedding_optimizer, data_parallel_tables)
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

    def _constraints(self, tables: list[TableSpec]) -> dict[str, Any]:  # ValueError: a sharding the device lacks
        return table_constraints(tables, self.sharding, self.embedding_optimizer, self.root_device.type)

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
        assert self._tables is not None
        replicated = list(self._tables.data_parallel.values())
        self._tables.replicated_optimizer = \
            _optimizer_class(self.embedding_optimizer)(replicated, **self._torch_kwargs()) if replicated else None

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
                       model: L.LightningModule | nn.Module | None = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        table_optimizer = self._tables.replicated_optimizer if self._tables is not None else None
        if table_optimizer is not None:
            table_optimizer.step()
            table_optimizer.zero_grad(set_to_none=True)
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

    # ------------------------------ checkpoints (format: .checkpoint; the tables as its tensors: .table_state)
    def _sharded_tables(self) -> ShardedTables:
        if self._tables is None:
            raise ValueError("TorchRecStrategy has not sharded a module yet: its checkpoints exist once a Trainer "
                             "with it has set the module up (fit, validate, test or predict)")
        return self._tables

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state without the tables (those go to the DCP files)."""
        tables = self._sharded_tables().module_keys()
        return {k: v for k, v in self.lightning_module.state_dict().items() if k not in tables}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any | None = None) -> None:
        """Write the checkpoint folder ``filepath`` atomically (see ``mtl_lightning.distributed.checkpoint``);
        every rank calls it."""
        if storage_options is not None:
            raise TypeError("TorchRecStrategy.save_checkpoint takes no storage_options")
        tables = self._sharded_tables()
        with_optimizer = "optimizer_states" in checkpoint
        meta = dict(checkpoint)
        meta["torchrec"] = {"format": FORMAT, "world_size": self.world_size, "tables": tables.records(),
                            "embedding_optimizer": self.embedding_optimizer if with_optimizer else None}
        save_sharded(filepath, meta, tables.tensors(with_optimizer), dist.group.WORLD, self.is_global_zero,
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
            checkpoint = read_meta(checkpoint_path)  # validated, as is the index before anything is read
            self._sharded_tables().load(Path(checkpoint_path), checkpoint["torchrec"], fitting)
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

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """The dense part (the tables were loaded with the checkpoint); anything else missing or unexpected raises."""
        result = self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = sorted(set(result.missing_keys) - self._sharded_tables().module_keys())
        if strict and (missing or result.unexpected_keys):
            raise ValueError(f"the checkpoint does not fit the module: missing keys {missing}, unexpected keys "
                             f"{sorted(result.unexpected_keys)}")

    def table_memory(self) -> dict[str, int]:
        """Bytes this rank holds for the tables: ``{"weights": ..., "optimizer": ...}`` (its shards only)."""
        return self._sharded_tables().memory()


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
