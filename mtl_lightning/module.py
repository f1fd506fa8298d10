"""``MultiTaskLightningModule``: the one LightningModule, owning everything about training.

The architecture is a plain ``nn.Module`` handed in as ``model``; this module
adds per-task losses with ignore-label masking, loss weighting, the
architecture's auxiliary loss, metrics, logging, prediction and the optimizer.

Losses. For task ``k`` with kind ``binary`` the loss is BCE on the logits,
for ``regression`` the squared error; it is averaged over the rows whose label
is neither ``ignore_label`` nor NaN. A task with no valid row in a batch adds an
exact zero that keeps the graph. The training loss is
``weighting([L_1 .. L_T]) + model.auxiliary_loss(outputs, labels)``.

Counterfactual CVR (``counterfactual=CounterfactualCVR(mode, click_task,
conversion_task, ...)``, ESCM², Wang et al. SIGIR 2022), for any architecture
with a click task and a conversion task: the conversion task's loss L_k becomes,
over D = every impression of the batch with a valid click label,

* IPS: ``L_CVR = 1/|D| sum_D o_i e_i / ô_i``
* DR:  ``L_CVR = 1/|D| sum_D [ê_i + o_i (e_i - ê_i) / ô_i]``, and
  ``imputation_weight * 1/|D| sum_D o_i (e_i - ê_i)^2 / ô_i`` is added to the
  total (logged as ``train/imputation_loss``) to train the imputation output ê,

with o the click label, ô the predicted CTR (detached, clipped to
``propensity_clip``), e_i the conversion log-loss of the row (its conversion
label is used only where o_i = 1). See ``mtl_lightning.losses.counterfactual``.

Logged (to whatever logger the Trainer has): ``train/<task>/loss``,
``train/<task>/weight``, ``train/loss``, ``train/aux_loss`` (when the
architecture has one); ``val/<task>/auc``, ``val/<task>/logloss`` (binary),
``val/<task>/mse``, ``val/<task>/mae`` (regression) and ``val/loss``
(the static-weighted sum of per-task log-loss/MSE over the whole epoch),
``val/<task>/gauc`` (binary, when the batches carry a ``group`` tensor: see
``metrics.GroupAUC``); the same under ``test/``.

Per scenario (domain): ``val/<task>/auc/domain=<id>`` for every binary task
and every scenario id in the split, and ``val/<task>/gauc/domain=<id>`` when
the batches also carry a ``group``; the same under ``test/``. The scenario
ids are the batch's ``scenario`` tensor (``ParquetDataModule(scenario=...)``,
any architecture) or else, for a multi-scenario architecture
(``model.multi_scenario``), its domain feature ``model.domain_feature``. The
rows of every rank are gathered first (``metrics.ScenarioAUC``), so under DDP
every rank logs the same scenarios and values. A scenario whose valid labels
are of one class gets no AUC (warned once per task and split).

Undefined evaluation metrics are skipped, never logged as numbers that look
real (and never NaN, so a ``ModelCheckpoint`` monitoring another key is not
disturbed): every metric of a task with no row with a valid label in the split
(e.g. the CVR task when every row is unclicked, its labels all
``ignore_label``), and AUC/GAUC of a task whose valid labels are all of one
class (GAUC also when no group has both classes). ``<stage>/loss`` is the
weighted sum over the tasks that have valid rows (not logged when none has).
Each case is warned about once per task and split (the sanity check counts as
a split of its own) for the module's lifetime; validation, training and
``trainer.test`` go on with the other metrics. The decision uses label counts
summed over every rank, so under DDP all ranks log the same keys. A key
skipped in an epoch is also dropped from ``trainer.callback_metrics``, where
Lightning would otherwise keep an earlier epoch's value (possible when the
split changes between epochs): a callback monitoring it finds it missing (a
``ModelCheckpoint`` then says so) rather than a stale number. Monitor
``val/loss`` to be safe from this.

Learning rates: ``lr``, ``sparse_lr`` and ``weight_decay`` must be finite and
>= 0; anything else raises ``ValueError`` when the module is built.

Resuming (``trainer.fit(ckpt_path=...)``, ``load_from_checkpoint``,
``load_state_dict``) into a model whose embedding tables have another number of
rows than the checkpoint's (the inferred vocabulary grew or shrank) raises
``ValueError`` naming each such feature and both sizes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric

from .architectures.base import MultiTaskArchitecture
from .checkpoint import CheckpointLoading
from .config import build
from .features import feature_from_config
from .layers.embedding import FeatureEmbedding, grown_rows, vocabulary_mismatch
from .losses import CounterfactualCVR, masked_loss, valid_mask
from .metrics import (
    Skipped, compute_task_metrics, flatten_metrics, group_auc_metrics, scenario_auc_metrics, task_metrics,
)
from .optim import build_optimizers, no_weight_decay, optimizer_class
from .tasks import Task, check_tasks
from .weighting import WeightingStrategy, create_weighting

Batch = Mapping[str, Any]


def _check_rate(name: str, value: Any, optional: bool = False) -> None:
    """``lr``, ``sparse_lr`` and ``weight_decay`` must be finite numbers >= 0 (``None`` only where ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}; a NaN, infinite or negative {name} turns "
            "every parameter it updates into NaN or makes training diverge"
        )


def _embedding_tables(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, FeatureEmbedding) for p in m.embedding_parameters()]


def _enable_sparse_embeddings(model: nn.Module, weighting: WeightingStrategy) -> None:
    layers = [m for m in model.modules() if isinstance(m, FeatureEmbedding)]
    if not layers or not _embedding_tables(model):
        raise ValueError(f"sparse_embeddings=True: {type(model).__name__} has no FeatureEmbedding table to make sparse")
    if weighting.needs_embedding_gradients:
        raise ValueError(
            f"sparse_embeddings=True cannot be combined with weighting {type(weighting).__name__!r}: it works on "
            "per-task gradients of the shared parameters, embedding tables included, which sparse gradients do "
            "not provide; use sparse_embeddings=False"
        )
    for layer in layers:
        layer.sparse = True


def _check_sparse_strategy(strategy: Any) -> None:
    """Sparse gradients are reduced correctly by DDP on gloo only; anything else multi-process is refused."""
    world_size = getattr(strategy, "world_size", 1)
    if world_size <= 1:
        return
    from lightning.pytorch.strategies import DDPStrategy

    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    if type(strategy) is not DDPStrategy or backend != "gloo":
        raise ValueError(
            f"sparse_embeddings=True under {type(strategy).__name__} (process group backend {backend!r}) is not "
            "supported: only DDPStrategy with the gloo backend all-reduces sparse gradients correctly. Use "
            "strategy=DDPStrategy(process_group_backend='gloo') or sparse_embeddings=False"
        )


# Top-level checkpoint entries that Lightning writes itself; the others that hold a mapping are the data
# module's state (under its class name) and the like.
_LIGHTNING_CHECKPOINT_KEYS = frozenset({
    "state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers", "hyper_parameters",
    "datamodule_hyper_parameters", "hparams_type", "hparams_name", "datamodule_hparams_name",
})


def _reset(metric: nn.Module) -> None:
    """``metric.reset()`` outside inference mode: the fresh states are normal tensors, so a later ``fit`` (whose
    validation runs under ``no_grad``, not inference mode) can update them in place after ``trainer.validate``."""
    with torch.inference_mode(False):
        metric.reset()


class MultiTaskLightningModule(CheckpointLoading, L.LightningModule):
    """Trains any ``MultiTaskArchitecture``.

    Args:
        model: the architecture (or its ``config()`` dict, as stored in checkpoints).
        tasks: the tasks to train; defaults to ``model.tasks`` (less the DR
            imputation output). Every task must be an output of the model
            (``model.output_names``); labels in the batch are keyed by task name.
            Outputs that are not tasks get no loss of their own.
        lr: the learning rate.
        weight_decay: optimizer settings with ``lr``; finite numbers >= 0 (anything else
            raises ``ValueError`` here, before any step: SGD would otherwise
            train with ``lr=nan`` and turn every parameter into NaN). Weight
            decay applies to weight matrices only: biases, parameters with
            fewer than 2 dimensions, normalisation layers, the embedding tables
            (unless ``decay_embeddings``) and the weighting strategy's parameters
            are in a group without it (``mtl_lightning.optim``).
        decay_embeddings: let ``weight_decay`` apply to the embedding tables too
            (not with ``sparse_embeddings``, whose SparseAdam has no weight decay).
        optimizer: a ``torch.optim`` class name (case-insensitive), default ``adam``.
        optimizer_kwargs: extra keyword arguments for the optimizer (not ``lr``
            or ``weight_decay``). Adam and AdamW use PyTorch's fused kernel
            (``fused=True``) where it exists (CPU since PyTorch 2.4, CUDA),
            unless ``fused`` or ``foreach`` is given here.
        lr_scheduler: a ``torch.optim.lr_scheduler`` class name, or ``None``.
        lr_scheduler_kwargs: its keyword arguments; ``lr_scheduler_interval`` is
            ``"epoch"`` or ``"step"``.
        ignore_label: label value left out of losses and metrics (NaN always is).
        weighting: a strategy name (``"static"``, ``"gradnorm"``, ``"pcgrad"`` ... see
            ``mtl_lightning.weighting.STRATEGIES``), config dict or object. Every
            strategy works under Lightning's automatic optimization (gradient
            strategies return a surrogate loss, see ``weighting/base.py``), so the
            Trainer's ``precision``, ``gradient_clip_val``, ``accumulate_grad_batches``,
            DDP and schedulers apply unchanged.
        counterfactual: a ``CounterfactualCVR`` (or its config dict) to train the
            conversion task with the IPS or DR loss (see the module docstring).
        sparse_embeddings: train the embedding tables with sparse gradients and
            ``SparseAdam``'s update (done by ``optim.LazySparseAdam``: the same
            update, state and checkpoints, computed with index operations; only
            the rows a batch touches are read and updated;
            ``betas``/``eps`` come from ``optimizer_kwargs`` when given; the
            other parameters use ``optimizer``). It pays when updating the
            tables is a large part of a step; on the 2-core CPU
            benchmark (docs/performance.md) it is not faster than dense training with fused Adam.
            The tables get no weight decay. Works with
            checkpoints and with DDP on the gloo backend (sparse gradients are
            all-reduced); refused for other distributed backends and strategies
            and for a weighting strategy that sets ``needs_embedding_gradients``.
        compile_model: compile the architecture with ``torch.compile`` (in place,
            so checkpoints keep their keys) when training starts; opt-in.
        sparse_lr: SparseAdam's learning rate with ``sparse_embeddings`` (default
            ``lr``). SparseAdam moves a row only when a batch touches it, where
            dense Adam keeps moving it on momentum, so rare ids learn slower at
            the same rate; a larger ``sparse_lr`` makes up for it. Finite and
            >= 0 like ``lr``.
    """

    def __init__(
        self,
        model: MultiTaskArchitecture | dict[str, Any],
        tasks: Sequence[Task | dict[str, Any]] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_scheduler: str | None = None,
        lr_scheduler_kwargs: dict[str, Any] | None = None,
        lr_scheduler_interval: str = "epoch",
        ignore_label: float | None = -1,
        weighting: str | dict[str, Any] | WeightingStrategy = "static",
        counterfactual: CounterfactualCVR | dict[str, Any] | None = None,
        sparse_embeddings: bool = False,
        compile_model: bool = False,
        sparse_lr: float | None = None,
        decay_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model, dict):
            model = build(model, MultiTaskArchitecture, "model")
        if not isinstance(model, MultiTaskArchitecture):
            raise TypeError(f"model must be a MultiTaskArchitecture, got {type(model).__name__}")
        self.model = model
        self.counterfactual = CounterfactualCVR.from_config(counterfactual) if counterfactual is not None else None
        if tasks is None and self.counterfactual is not None and self.counterfactual.mode == "dr":
            tasks = [t for t in model.tasks if t.name != self.counterfactual.imputation_output]
        self.tasks = check_tasks(tasks if tasks is not None else model.tasks)
        missing = [t.name for t in self.tasks if t.name not in model.output_names]
        if missing:
            raise ValueError(f"tasks {missing} are not outputs of {type(model).__name__} (outputs: {model.output_names})")
        if self.counterfactual is not None:
            self._check_counterfactual()
        optimizer_class(optimizer)
        if decay_embeddings and sparse_embeddings:
            raise ValueError("decay_embeddings=True cannot apply with sparse_embeddings=True: the tables' SparseAdam "
                             "has no weight decay; use one or the other")
        if {"lr", "weight_decay"} & set(optimizer_kwargs or {}):
            raise ValueError("optimizer_kwargs may not hold lr or weight_decay; give them as the module's arguments")
        _check_rate("lr", lr)
        _check_rate("weight_decay", weight_decay)
        _check_rate("sparse_lr", sparse_lr, optional=True)
        if sparse_embeddings and (lr if sparse_lr is None else sparse_lr) == 0:
            name = "lr" if sparse_lr is None else "sparse_lr"
            raise ValueError(
                f"{name} must be > 0 with sparse_embeddings=True (the embedding tables' SparseAdam refuses a rate "
                f"of 0), got {name}=0; give sparse_lr > 0 to train the tables, or freeze them another way"
            )
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        self.weighting = create_weighting(weighting)
        self.weighting.setup(self.tasks, self.model)
        if sparse_embeddings:
            _enable_sparse_embeddings(self.model, self.weighting)

        self.save_hyperparameters(ignore=["model", "weighting", "tasks", "counterfactual"])
        # Plain-data versions, so checkpoints load with weights_only=True and
        # load_from_checkpoint(path) rebuilds everything without extra arguments.
        try:
            self.hparams["model"] = model.config()
        except TypeError:
            pass  # an argument that is not plain data: load_from_checkpoint then needs model=...
        self.hparams["tasks"] = [t.to_config() for t in self.tasks] if tasks is not None else None
        self.hparams["weighting"] = weighting if isinstance(weighting, str) else self.weighting.config()
        self.hparams["counterfactual"] = self.counterfactual.to_config() if self.counterfactual is not None else None

        self.val_metrics = task_metrics(self.tasks)
        self.test_metrics = task_metrics(self.tasks)
        self.val_gauc = group_auc_metrics(self.tasks)
        self.test_gauc = group_auc_metrics(self.tasks)
        self.val_scenario = scenario_auc_metrics(self.tasks)
        self.test_scenario = scenario_auc_metrics(self.tasks)
        self._skip_warned: set[tuple[str, str, str]] = set()  # see _warn_skipped

    # ------------------------------------------------------------------ losses
    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.model(features)

    def _labels(self, labels: Mapping[str, Tensor], task: Task) -> Tensor:
        try:
            return labels[task.name]
        except KeyError:
            raise ValueError(f"the batch has no label for task {task.name!r}; it has {sorted(labels)}") from None

    def compute_losses(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted loss per task: masked, or the counterfactual L_CVR for the conversion task."""
        losses = {
            t.name: masked_loss(outputs[t.name], self._labels(labels, t), t.kind, self.hparams.ignore_label)
            for t in self.tasks
            if self.counterfactual is None or t.name != self.counterfactual.conversion_task
        }
        if self.counterfactual is not None:
            losses[self.counterfactual.conversion_task] = self.counterfactual.cvr_loss(
                outputs, labels, self.hparams.ignore_label)
        return losses

    def imputation_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """The DR imputation output's weighted loss, or ``None`` (no counterfactual, or IPS)."""
        if self.counterfactual is None:
            return None
        return self.counterfactual.imputation_loss(outputs, labels, self.hparams.ignore_label)

    def _check_counterfactual(self) -> None:
        cf = self.counterfactual
        by_name = {t.name: t for t in self.tasks}
        for role, name in (("click_task", cf.click_task), ("conversion_task", cf.conversion_task)):
            if name not in by_name:
                raise ValueError(f"counterfactual {role}={name!r} is not one of the trained tasks {list(by_name)}")
            if by_name[name].kind != "binary":
                raise ValueError(f"counterfactual {role}={name!r} must be a binary task, it is {by_name[name].kind}")
        if cf.mode == "dr":
            if cf.imputation_output not in self.model.output_names:
                raise ValueError(
                    f"counterfactual mode 'dr' reads the imputation output {cf.imputation_output!r}, which "
                    f"{type(self.model).__name__} does not return (outputs: {self.model.output_names}); use ESCM, or "
                    "give the architecture a regression task of that name"
                )
            if cf.imputation_output in by_name:
                raise ValueError(
                    f"{cf.imputation_output!r} is DR's imputation output, trained by the imputation loss; "
                    "leave it out of the module's tasks"
                )

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        outputs = self.model(batch["features"])
        losses = self.compute_losses(outputs, batch["labels"])
        total = self.weighting([losses[t.name] for t in self.tasks])  # a list: see weighting/base.py
        aux = self.model.auxiliary_loss(outputs, batch["labels"])
        if aux is not None:
            total = total + aux
        imputation = self.imputation_loss(outputs, batch["labels"])
        if imputation is not None:
            total = total + imputation
        if self._logs_this_step(batch_idx):
            logged = {f"train/{name}/loss": loss.detach() for name, loss in losses.items()}
            logged.update({f"train/{t.name}/weight": w for t, w in zip(self.tasks, self.weighting.last_weights.detach())})
            if aux is not None:
                logged["train/aux_loss"] = aux.detach()
            if imputation is not None:
                logged["train/imputation_loss"] = imputation.detach()
            logged["train/loss"] = total.detach()
            self.log_dict(logged, on_step=True, on_epoch=False, batch_size=len(next(iter(outputs.values()))))
        return total

    def on_train_epoch_start(self) -> None:
        self.weighting.begin_epoch(self.current_epoch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.weighting.before_optimizer_step()

    def _logs_this_step(self, batch_idx: int) -> bool:
        """Whether the training step hands its values to ``log_dict``: on the steps the logger writes
        (every ``Trainer(log_every_n_steps=...)``) and on the last step of an epoch or of the run (so
        callbacks monitoring ``train/...`` always find it); never under ``Trainer(barebones=True)``,
        where Lightning discards every ``self.log``.

        ``self.log`` costs Lightning about a millisecond per key and step on the CPU, and on-step values
        of the other steps are never written, so on those steps the values are not even gathered (no
        per-step cost, and no host sync: they become numbers only when written).
        """
        trainer = self._trainer
        if trainer is not None and trainer.barebones:
            return False
        stepped = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        stepped = getattr(stepped, "_batches_that_stepped", None)
        if trainer is None or stepped is None or trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps  # 0: the logger writes no step
        if every and (stepped + 1) % every == 0:
            return True
        return bool(
            trainer.is_last_batch or trainer.should_stop or batch_idx + 1 >= trainer.num_training_batches
            or (trainer.max_steps > 0 and stepped + 1 >= trainer.max_steps)
        )

    # -------------------------------------------------------------- evaluation
    def _scenario_ids(self, batch: Batch) -> Tensor | None:
        """The batch's scenario ids: the data module's ``scenario`` column, else a multi-scenario model's domain."""
        scenario = batch.get("scenario")
        if scenario is None and self.model.multi_scenario:
            scenario = batch["features"][self.model.domain_feature]
        return scenario

    def _update_metrics(self, metrics: nn.Module, batch: Batch, gauc: nn.ModuleDict | None = None,
                        scenario_metrics: nn.ModuleDict | None = None) -> None:
        outputs = self.model(batch["features"])
        group = batch.get("group")
        scenario = self._scenario_ids(batch) if scenario_metrics is not None else None
        for t in self.tasks:
            labels = self._labels(batch["labels"], t)
            mask = valid_mask(labels, self.hparams.ignore_label)
            metrics.task_metrics[t.name].update(outputs[t.name][mask].float(), labels[mask].float())
            if group is not None and gauc is not None and t.name in gauc:
                gauc[t.name].update(outputs[t.name][mask], labels[mask], group[mask])
            if scenario is not None and t.name in scenario_metrics:
                scenario_metrics[t.name].update(outputs[t.name][mask], labels[mask], scenario[mask],
                                                None if group is None else group[mask])

    def _joined(self, metric: Metric, *empty_args: Tensor) -> bool:
        """Whether any rank updated ``metric`` this epoch; a rank that did not (an empty shard, a split smaller
        than the world size) updates it with ``empty_args`` (typed empty states, so the gather matches the other
        ranks' dtypes) and then joins the collective of ``compute()`` that the other ranks run."""
        used = torch.tensor(float(metric.update_called), device=self.device)
        if self._trainer is not None:
            used = self.trainer.strategy.reduce(used, reduce_op="sum")
        if not used:
            return False
        if not metric.update_called:
            metric.update(*empty_args)
        return True

    def _log_metrics(self, stage: str, metrics: nn.Module, gauc: nn.ModuleDict | None = None,
                     scenario_metrics: nn.ModuleDict | None = None) -> None:
        """Log the split's defined metrics; undefined ones are skipped with one warning per task and split.

        Every decision below reads values computed from states synced over the
        ranks (``compute_task_metrics``' label counts, GAUC itself), so every
        rank logs the same keys and runs the same collectives.
        """
        computed, skipped = compute_task_metrics(metrics, self.tasks)
        logged = flatten_metrics(stage, computed)
        empty = torch.zeros(0, device=self.device)
        for name, metric in (gauc or {}).items():
            if not self._joined(metric, empty, empty, empty.long()):  # no rank saw a group column
                continue
            if name in skipped:  # no valid row, or one class: no group can have both classes
                skipped[name] = skipped[name]._replace(metrics=(*skipped[name].metrics, "gauc"))
            else:
                value = metric.compute()
                if torch.isnan(value):
                    skipped[name] = Skipped(("gauc",), "has no group (user) with both a positive and a "
                                            "negative label, so GAUC is undefined", False)
                else:
                    logged[f"{stage}/{name}/gauc"] = value
            _reset(metric)
        for name, metric in (scenario_metrics or {}).items():
            if not self._joined(metric, empty, empty, empty.long()):  # no scenario ids (or no rows) on any rank
                continue
            one_class = []
            for scenario, values in metric.compute().items():
                logged.update({f"{stage}/{name}/{m}/domain={scenario}": value for m, value in values.items()})
                if "auc" not in values:
                    one_class.append(scenario)
            _reset(metric)
            if one_class:
                self._warn_one_class_scenarios(stage, name, one_class)
        terms = [
            t.weight * computed[t.name]["logloss" if t.kind == "binary" else "mse"]
            for t in self.tasks if ("logloss" if t.kind == "binary" else "mse") in computed[t.name]
        ]
        if terms:
            logged[f"{stage}/loss"] = torch.as_tensor(sum(terms))
        for name, skip in skipped.items():
            self._warn_skipped(stage, name, skip, loss_skipped=not terms)
        if self._trainer is not None:  # no stale value of an earlier epoch for callbacks to mistake for this one's
            stale = [f"{stage}/{name}/{m}" for name, skip in skipped.items() for m in skip.metrics]
            for key in stale + ([] if terms else [f"{stage}/loss"]):
                self.trainer.callback_metrics.pop(key, None)
            for key in [k for k in self.trainer.callback_metrics if "/domain=" in k and k.startswith(f"{stage}/")]:
                if key not in logged:  # a scenario absent (or undefined) this epoch
                    self.trainer.callback_metrics.pop(key)
        self.log_dict(logged, sync_dist=False)
        _reset(metrics)

    def _warn_skipped(self, stage: str, task: str, skip: Skipped, loss_skipped: bool) -> None:
        """One warning per task, split and reason for the module's lifetime (the sanity check counts apart)."""
        split = f"{stage} (sanity check)" if self._trainer is not None and self.trainer.sanity_checking else stage
        key = (split, task, skip.reason)
        if key in self._skip_warned:
            return
        self._skip_warned.add(key)
        keys = ", ".join(f"{stage}/{task}/{m}" for m in skip.metrics)
        verb = "is" if len(skip.metrics) == 1 else "are"
        if skip.empty:
            detail = f"every label is ignore_label={self.hparams.ignore_label!r} or NaN"
            loss = (f"nor is {stage}/loss (no task has a valid row)" if loss_skipped
                    else f"and {stage}/loss sums the other tasks only")
            message = f"{split} split: task {task!r} {skip.reason} ({detail}); {keys} {verb} not logged, {loss}"
        else:
            message = f"{split} split: task {task!r} {skip.reason}; {keys} {verb} not logged"
        rank_zero_warn(message + ". Training and the other metrics go on (warned once per task and split).")

    def _warn_one_class_scenarios(self, stage: str, task: str, scenarios: list[int]) -> None:
        split = f"{stage} (sanity check)" if self._trainer is not None and self.trainer.sanity_checking else stage
        key = (split, task, "one-class scenarios")
        if key in self._skip_warned:
            return
        self._skip_warned.add(key)
        keys = ", ".join(f"{stage}/{task}/auc/domain={s}" for s in scenarios[:5]) + (", ..." if len(scenarios) > 5
                                                                                     else "")
        rank_zero_warn(f"{split} split: task {task!r} has labels of one class only in scenarios {scenarios[:20]}, "
                       f"so their AUC is undefined and {keys} not logged; the other scenarios' are "
                       "(warned once per task and split).")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_metrics(self.val_metrics, batch, self.val_gauc, self.val_scenario)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics, self.val_gauc, self.val_scenario)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_metrics(self.test_metrics, batch, self.test_gauc, self.test_scenario)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics, self.test_gauc, self.test_scenario)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Probabilities (binary) or values (regression) of every output of the architecture, plus ``row_id``.

        The outputs are the architecture's ``output_names`` (its tasks, then its extra outputs such as ESMM's
        ``cvr``, or a DR imputation task the module does not train as a task), computed by
        ``MultiTaskArchitecture.predictions``: the same outputs the ONNX and TorchScript exports return.
        """
        predictions = self.model.predictions(self.model(batch["features"]))
        if "row_id" in batch:
            predictions["row_id"] = batch["row_id"]
        return predictions

    # ------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose embedding tables were built for another vocabulary, naming the features.

        Lightning calls this before ``load_state_dict`` (``trainer.fit(ckpt_path=...)``,
        ``validate``/``test``/``predict`` with ``ckpt_path``, ``load_from_checkpoint``).
        The checkpoint's feature specs (``hyper_parameters["model"]["init_args"]["features"]``)
        are compared with ``self.model.features``, so the message names the very
        feature. Without them (a model that is not plain data, or
        ``load_from_checkpoint(path, model=...)``, whose ``model`` Lightning writes
        over the checkpoint's) ``FeatureEmbedding`` checks the tables as they load
        and names the features sharing a mismatched fused weight.

        The one change of size that loads: incremental training. When the
        Trainer's data module grew vocabularies since the state saved in this
        checkpoint (``ParquetDataModule(grow_vocabulary=True)``, which declares
        it through ``embedding_row_sources()``), the checkpoint's tables are
        grown the same way before they load: every existing id keeps its
        trained row, a new id's row stays as this model initialised it, and the
        optimizer state of those weights (Adam's moments...) is resized alike,
        zero for new rows, when the Trainer restores it.
        """
        # the data module's state saved beside the model (its fitted encoders and statistics), kept so that
        # ``setup`` can hand it to a data module that fitted its own (see ``_adopt_checkpoint_datamodule_state``)
        self._checkpoint_datamodule_states = {
            key: value for key, value in checkpoint.items()
            if isinstance(value, Mapping) and key not in _LIGHTNING_CHECKPOINT_KEYS
        }
        grown = self._grow_tables(checkpoint)  # incremental training: vocabularies the data module grew
        config = (checkpoint.get("hyper_parameters") or {}).get("model")
        init_args = config.get("init_args") if isinstance(config, Mapping) else None
        features = init_args.get("features") if isinstance(init_args, Mapping) else None
        if not isinstance(features, (list, tuple)) or not isinstance(getattr(self.model, "features", None), tuple):
            return
        try:
            saved = [feature_from_config(f) for f in features]
        except (TypeError, ValueError):
            return  # specs this version cannot read: the state dict's own checks apply
        saved = [dataclasses.replace(f, vocab_size=grown[f.name][1])
                 if f.name in grown and getattr(f, "vocab_size", None) == grown[f.name][0] else f for f in saved]
        message = vocabulary_mismatch(saved, self.model.features)
        if message is not None:
            raise ValueError(message)

    def _grow_tables(self, checkpoint: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """Grow the checkpoint's embedding tables as the data module grew its vocabularies; ``{feature: (before, after)}``.

        Only a growth the Trainer's data module declares is applied (its
        ``embedding_row_sources()``: for each grown feature, the table size
        before and each new id's old id or -1), and only to weights whose rows
        in the checkpoint are exactly the sizes before. The optimizer state of
        those weights is resized by ``_grow_optimizer_states`` once the
        optimizers exist (before Lightning restores them).
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        declare = getattr(datamodule, "embedding_row_sources", None)
        growth = declare() if callable(declare) else {}
        state = checkpoint.get("state_dict")
        if not growth or not isinstance(state, dict):
            return {}
        sources = {name: (int(before), torch.as_tensor(index, dtype=torch.long))
                   for name, (before, index) in growth.items()}
        done: dict[str, tuple[int, int]] = {}
        self._table_growth: dict[str, tuple[Tensor, int]] = {}
        for prefix, layer in self.named_modules():
            if not isinstance(layer, FeatureEmbedding):
                continue
            mine = {name: value for name, value in sources.items() if name in layer.table_layout()}
            if not mine:
                continue
            plan = grown_rows(layer, mine)
            if any(not isinstance(state.get(f"{prefix}.{key}"), Tensor) or state[f"{prefix}.{key}"].shape[0] != rows
                   for key, (_, rows) in plan.items()):
                continue  # not the checkpoint these vocabularies grew from: the size checks report it
            for key, (index, _) in plan.items():
                name = f"{prefix}.{key}"
                saved = state[name]
                weight = self.get_parameter(name).detach().to(device=saved.device, dtype=saved.dtype).clone()
                keep = index >= 0
                weight[keep] = saved[index[keep]]  # new rows: as this model initialised them
                state[name] = weight
                self._table_growth[name] = (index, saved.shape[0])
            done.update({name: (before, len(index)) for name, (before, index) in mine.items()})
        if self._table_growth:
            self._growing_checkpoint = checkpoint
            self._grow_optimizer_states()
        return done

    def _grow_optimizer_states(self) -> None:
        """Resize the checkpoint's optimizer state of grown tables (old rows moved with them, new rows zero)."""
        growth = getattr(self, "_table_growth", None)
        checkpoint = getattr(self, "_growing_checkpoint", None)
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if not growth or checkpoint is None or not optimizers:
            return  # the optimizers are made later: on_fit_start calls this again
        names = {id(p): name for name, p in self.named_parameters()}
        for optimizer, saved in zip(optimizers, checkpoint.get("optimizer_states") or []):
            position = 0  # torch numbers the parameters across param_groups, in order
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    name = names.get(id(parameter))
                    entry = saved.get("state", {}).get(position)
                    if name in growth and isinstance(entry, dict):
                        index, rows = growth[name]
                        keep = index >= 0
                        for key, value in entry.items():
                            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                                value = value.to_dense() if value.is_sparse else value
                                resized = value.new_zeros((len(index), *value.shape[1:]))
                                resized[keep] = value[index[keep].to(value.device)]
                                entry[key] = resized
                    position += 1
        self._table_growth, self._growing_checkpoint = {}, None

    def on_fit_start(self) -> None:
        self._grow_optimizer_states()  # a checkpoint whose tables grew, loaded before the optimizers existed

    # --------------------------------------------------------------- optimizer
    def optimized_parameters(self) -> list[nn.Parameter]:
        """Every parameter except those the weighting strategy updates itself (GradNorm's weights)."""
        private = {id(p) for p in self.weighting.private_parameters()}
        return [p for p in self.parameters() if id(p) not in private]

    def setup(self, stage: str) -> None:
        self._adopt_checkpoint_datamodule_state()
        if self.hparams.get("sparse_embeddings") and self.trainer is not None:
            _check_sparse_strategy(self.trainer.strategy)
        if self.hparams.get("compile_model") and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def _adopt_checkpoint_datamodule_state(self) -> None:
        """Give the Trainer's data module the encoders/statistics this model was trained with, loudly.

        A module loaded with ``load_from_checkpoint`` remembers the data module
        state of its checkpoint (fitted categorical encoders, normalisation
        statistics, feature specs). If the data module now attached fitted its own
        (e.g. from a new ``train=`` split, because no ``ckpt_path`` was given)
        and they differ, its ids and scales no longer mean what the model learnt:
        the checkpoint's state is loaded into the data module (which re-reads its
        splits) with a warning. Resuming with ``ckpt_path=`` restores the same
        state through Lightning, so nothing changes there.
        """
        states = getattr(self, "_checkpoint_datamodule_states", None)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not states or datamodule is None or not hasattr(datamodule, "load_state_dict"):
            return
        state = states.get(type(datamodule).__qualname__)
        same = getattr(datamodule, "same_preprocessing", None)  # ParquetDataModule: ignores its partition record
        if not state or (same(state) if callable(same) else datamodule.state_dict() == state):
            return
        rank_zero_warn(
            f"{type(datamodule).__name__}: its encoders/normalisation statistics differ from those this model was "
            "trained with (saved in its checkpoint); using the checkpoint's, so ids and scales mean what the model "
            "learnt. To train with new encoders, build a new model instead of loading this checkpoint."
        )
        datamodule.load_state_dict(state)

    def configure_optimizers(self) -> Any:
        """The optimizer over ``optimized_parameters()`` with weight-decay groups (see ``mtl_lightning.optim``)."""
        hp = self.hparams
        tables = {id(t) for t in _embedding_tables(self.model)} if hp.get("sparse_embeddings") else set()
        sparse_tables = [p for p in self.parameters() if id(p) in tables]
        return build_optimizers(
            self.optimized_parameters(), optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
            optimizer_kwargs=hp.optimizer_kwargs,
            no_decay=no_weight_decay(self, decay_embeddings=bool(hp.get("decay_embeddings")), exclude=[self.weighting]),
            sparse_tables=sparse_tables, sparse_lr=hp.get("sparse_lr"), lr_scheduler=hp.lr_scheduler,
            lr_scheduler_kwargs=hp.lr_scheduler_kwargs, lr_scheduler_interval=hp.lr_scheduler_interval,
        )
