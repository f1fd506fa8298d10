"""``MultiTaskLightningModule``: the one LightningModule, owning everything about training.

The architecture is a plain ``nn.Module`` handed in as ``model``; this module
adds per-task losses with ignore-label masking, loss weighting, the
architecture's auxiliary loss, metrics, logging, prediction and the optimizer.

Losses. Task ``k`` trains with its ``Task.loss`` (by default BCE on the logits for ``binary``,
the squared error for ``regression``, softmax cross-entropy for ``multiclass``; focal, JRC, Huber and
label smoothing in ``mtl_lightning.losses.task_losses``), averaged over the rows
whose label is neither ``ignore_label`` nor NaN. A task with no valid row in a batch adds an
exact zero that keeps the graph. The training loss is
``weighting([L_1 .. L_T]) + model.auxiliary_loss(outputs, labels)``. The labels
are the batch's as the architecture completes them (``model.derive_labels``:
ESMM's CTCVR = click · conversion from a conversion label given on clicked rows),
for the losses and the metrics alike.

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
architecture has one), on the steps the logger writes and the last of an epoch;
``val/...`` and ``test/...`` metrics per task, group and scenario at the end of
each evaluation epoch, computed by ``mtl_lightning.evaluation`` (where what is
skipped as undefined, and why, is written), and a reliability diagram per binary
task as a TensorBoard image ``<stage>/<task>/reliability``. The progress bar
shows ``train/loss`` and the latest ``val/<task>/auc`` (binary),
``val/<task>/mse`` (regression) or ``val/<task>/accuracy`` (multiclass).

Warnings about tasks that cannot learn (``mtl_lightning.training_checks``): a
task with no valid label in the rows of the first training epoch of a fit, a
logged training loss or evaluation metric that is inf or NaN.

Learning rates: ``lr``, ``sparse_lr``, ``embedding_lr`` and ``weight_decay`` must be finite and
>= 0; anything else raises ``ValueError`` when the module is built.

Resuming (``trainer.fit(ckpt_path=...)``, ``load_from_checkpoint``,
``load_state_dict``) into a model whose embedding tables have another number of
rows than the checkpoint's (the inferred vocabulary grew or shrank) raises
``ValueError`` naming each such feature and both sizes, unless the data module
grew them (incremental training, ``mtl_lightning.growth``). Resuming into
another architecture than the checkpoint's (an MMoE from a SharedBottom
checkpoint) raises ``ValueError`` naming both classes.

Precision: ``precision="bf16-true"`` and ``"16-true"`` (every parameter and
input cast to half precision) are refused when training starts, with a
``ValueError`` that says to use ``"bf16-mixed"`` / ``"16-mixed"``; the dense
inputs, losses and metrics are computed in float32.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from .architectures.base import MultiTaskArchitecture
from .batch import Batch
from .calibration import Calibration, apply_calibration, evaluated_outputs, load_calibration, save_calibration
from .checkpoint import CheckpointLoading
from .config import build
from .evaluation import HEADLINE_METRIC, SplitEvaluation, funnel_outputs, log_reliability_figures, task_labels
from .growth import TableGrowth, check_vocabularies, datamodule_states, grow_checkpoint_tables, hand_datamodule_state
from .losses import CounterfactualCVR, masked_loss
from .losses.counterfactual import check_counterfactual
from .losses.fused import FusedTaskLosses
from .optim import build_optimizers, no_weight_decay, optimizer_class
from .optim import check_rate as _check_rate
from .sparse_embeddings import check_sparse_strategy, embedding_tables, enable_sparse_embeddings
from .tasks import Task, check_sampling_rates, check_tasks
from .training_checks import TrainingChecks, check_precision
from .training_step import log_step, logs_this_step, task_losses as step_task_losses
from .weighting import WeightingStrategy, create_weighting


_check_sparse_strategy = check_sparse_strategy  # importable from here as before
_PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "last_task_losses"})


class MultiTaskLightningModule(CheckpointLoading, L.LightningModule):
    """Trains any ``MultiTaskArchitecture``.

    Args:
        model: the architecture (or its ``config()`` dict, as stored in checkpoints).
        tasks: the tasks to train; defaults to ``model.tasks`` (less the DR
            imputation output). Every task must be an output of the model
            (``model.output_names``); labels in the batch are keyed by task name.
            Outputs that are not tasks get no loss of their own. Tasks whose
            weights are all 0 raise ``ValueError`` (nothing would train).
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
        ece_bins: equal-width probability bins of ``ece`` and the reliability diagrams (``mtl_lightning.evaluation``).
        embedding_lr: the embedding tables' learning rate when they train with dense
            gradients (default ``lr``): they form a parameter group of their own in
            the same optimizer. Attention over sequences learns only if the tables
            move fast enough (docs/inputs.md); ``sparse_lr`` with ``sparse_embeddings``.
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
        ece_bins: int = 10,
        embedding_lr: float | None = None,
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
        if all(t.weight == 0 for t in self.tasks):
            raise ValueError(
                f"every task has weight 0 ({[t.name for t in self.tasks]}): Task.weight weighs the static training "
                "loss (and starts most weighting strategies) and val/loss, which would be 0, so nothing would train "
                "or be compared; give the tasks to train a weight > 0 (Task(..., weight=1.0))"
            )
        missing = [t.name for t in self.tasks if t.name not in model.output_names]
        if missing:
            raise ValueError(f"tasks {missing} are not outputs of {type(model).__name__} (outputs: {model.output_names})")
        if self.counterfactual is not None:
            check_counterfactual(self.counterfactual, self.tasks, self.model)
        check_sampling_rates(self.tasks, model.tasks)
        optimizer_class(optimizer)
        if decay_embeddings and sparse_embeddings:
            raise ValueError("decay_embeddings=True cannot apply with sparse_embeddings=True: the tables' SparseAdam "
                             "has no weight decay; use one or the other")
        if {"lr", "weight_decay"} & set(optimizer_kwargs or {}):
            raise ValueError("optimizer_kwargs may not hold lr or weight_decay; give them as the module's arguments")
        _check_rate("lr", lr)
        _check_rate("weight_decay", weight_decay)
        _check_rate("sparse_lr", sparse_lr, optional=True)
        _check_rate("embedding_lr", embedding_lr, optional=True)
        if sparse_embeddings and embedding_lr is not None:
            raise ValueError("embedding_lr applies to tables with dense gradients; with sparse_embeddings=True the "
                             "tables' rate is sparse_lr")
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
            enable_sparse_embeddings(self.model, self.weighting)

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

        domain_feature = model.domain_feature if model.multi_scenario else None
        evaluation = dict(domain_feature=domain_feature, bins=ece_bins, funnel=funnel_outputs(model))
        self.val_evaluation = SplitEvaluation("val", self.tasks, ignore_label, **evaluation)
        self.test_evaluation = SplitEvaluation("test", self.tasks, ignore_label, **evaluation)
        self.training_checks = TrainingChecks(self.tasks, ignore_label)
        self._table_growth: TableGrowth | None = None  # a loaded checkpoint's grown tables, see on_load_checkpoint
        self._checkpoint_datamodule_states: dict[str, Mapping[str, Any]] = {}
        self.calibration: Calibration | None = None  # attached by mtl_lightning.calibration.calibrate
        self.last_task_losses: list[Tensor] = []  # the last training step's per-task losses, in self.tasks order
        self.task_names = [t.name for t in self.tasks]
        self.fused_losses = FusedTaskLosses(self.tasks, ignore_label) if FusedTaskLosses.supports(self.tasks) else None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around every hook it calls (about 40 times a step), and the step sets
        # last_task_losses: plain attributes, for which nn.Module.__setattr__'s checks (is it a parameter, a
        # module, a buffer?) end in object.__setattr__ anyway, at a few microseconds each (training_step.py)
        if name in _PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ losses
    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.model(features)

    def compute_losses(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor],
                       weights: Mapping[str, Tensor] | None = None, groups: Tensor | None = None) -> dict[str, Tensor]:
        """Unweighted loss per task: its ``Task.loss`` masked, or the counterfactual L_CVR for the conversion task.

        ``weights`` are a batch's per-task sample weights (``Batch["weights"]``):
        a task listed there has the weighted mean over its valid rows as loss
        (``losses.masked_loss``); the counterfactual conversion task takes none.
        ``groups`` are the batch's group ids (``Batch["group"]``), JRC's sessions.
        """
        weights = weights or {}
        losses = {
            t.name: masked_loss(outputs[t.name], task_labels(labels, t), t.kind, self.hparams.ignore_label,
                                weights.get(t.name), t.loss, t.loss_options, groups)
            for t in self.tasks
            if self.counterfactual is None or t.name != self.counterfactual.conversion_task
        }
        if self.counterfactual is not None:
            if self.counterfactual.conversion_task in weights:
                raise ValueError(f"the batch has sample weights for {self.counterfactual.conversion_task!r}, the "
                                 "counterfactual conversion task, whose IPS/DR loss takes none; leave it out of "
                                 "batch['weights']")
            losses[self.counterfactual.conversion_task] = self.counterfactual.cvr_loss(
                outputs, labels, self.hparams.ignore_label)
        return losses

    def imputation_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """The DR imputation output's weighted loss, or ``None`` (no counterfactual, or IPS)."""
        if self.counterfactual is None:
            return None
        return self.counterfactual.imputation_loss(outputs, labels, self.hparams.ignore_label)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        outputs = self.model(batch["features"])
        labels = self.model.derive_labels(batch["labels"])  # e.g. ESMM's CTCVR = click · conversion
        losses, task_losses, total = step_task_losses(self, outputs, labels, batch)  # see training_step.py
        self.last_task_losses = task_losses  # the step's graph, for callbacks (gradient_conflict.GradientConflict)
        aux = self.model.auxiliary_loss(outputs, labels)
        if aux is not None:
            total = total + aux
        imputation = self.imputation_loss(outputs, labels)
        if imputation is not None:
            total = total + imputation
        if self._logs_this_step(batch_idx):
            log_step(self, losses, task_losses, total, aux, imputation, rows=len(next(iter(outputs.values()))))
        return total

    def on_train_epoch_start(self) -> None:
        self.weighting.begin_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.training_checks.end_epoch(self.current_epoch, self._reduce_sum, self.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.weighting.before_optimizer_step()

    def _logs_this_step(self, batch_idx: int) -> bool:
        return logs_this_step(self._trainer, batch_idx)  # see training_step.py

    def _reduce_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over every rank (itself without a Trainer)."""
        return self.trainer.strategy.reduce(value, reduce_op="sum") if self._trainer is not None else value

    # -------------------------------------------------------------- evaluation
    def _with_derived_labels(self, batch: Batch) -> Batch:
        return {**batch, "labels": self.model.derive_labels(batch["labels"])}  # type: ignore[typeddict-item]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_evaluation.update(evaluated_outputs(self, self.model(batch["features"]), batch["features"]),
                                   self._with_derived_labels(batch))

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation(self.val_evaluation)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.test_evaluation.update(evaluated_outputs(self, self.model(batch["features"]), batch["features"]),
                                    self._with_derived_labels(batch))

    def on_test_epoch_end(self) -> None:
        self._log_evaluation(self.test_evaluation)

    def _log_evaluation(self, evaluation: SplitEvaluation) -> None:
        """Log the split's defined metrics (``SplitEvaluation.compute``: skips, warnings, stale keys dropped)."""
        trainer = self._trainer
        logged = evaluation.compute(
            self._reduce_sum, sanity_checking=trainer is not None and trainer.sanity_checking,
            callback_metrics=trainer.callback_metrics if trainer is not None else None,
        )
        # the progress bar shows each task's headline metric (AUC binary, MSE regression, accuracy multiclass)
        headline = {f"{evaluation.stage}/{t.name}/{HEADLINE_METRIC[t.kind]}" for t in self.tasks}
        shown = {key: value for key, value in logged.items() if key in headline}
        self.log_dict({key: value for key, value in logged.items() if key not in shown}, sync_dist=False)
        if shown:
            self.log_dict(shown, sync_dist=False, prog_bar=True)
        if trainer is not None and not trainer.sanity_checking and trainer.is_global_zero:
            log_reliability_figures(trainer.loggers, evaluation, trainer.global_step)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Probabilities (binary; multiclass ``(B, K)``) or values (regression) of every output, plus ``row_id``.

        The outputs are the architecture's ``output_names`` (its tasks, then its extra outputs such as ESMM's
        ``cvr``, or a DR imputation task the module does not train as a task), computed by
        ``MultiTaskArchitecture.predictions``, then the attached calibration (``mtl_lightning.calibration``): the
        same outputs the ONNX and TorchScript exports return.
        """
        predictions = apply_calibration(self, self.model.predictions(self.model(batch["features"])), batch["features"])
        if "row_id" in batch:
            predictions["row_id"] = batch["row_id"]
        return predictions

    # ------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture or vocabulary, naming the classes or features; grow tables.

        Lightning calls this before ``load_state_dict`` (``trainer.fit(ckpt_path=...)``,
        ``validate``/``test``/``predict`` with ``ckpt_path``, ``load_from_checkpoint``).

        * A checkpoint whose architecture (``hyper_parameters["model"]["class_path"]``)
          is another class than ``self.model``'s, and whose model weights do not
          fit it, raises ``ValueError`` naming both classes (unless
          ``strict_loading`` is off). ``load_from_checkpoint(path, model=...)``
          replaces that class path with the given model before this runs:
          there Lightning's listing of the keys remains.
        * Incremental training: when the Trainer's data module grew vocabularies
          since the state saved in this checkpoint, the checkpoint's tables (and,
          once the optimizers exist, their optimizer state) are grown the same
          way (``mtl_lightning.growth.grow_checkpoint_tables``).
        * Any other change of a table's size raises ``ValueError`` naming each
          feature and both sizes (``mtl_lightning.growth.check_vocabularies``;
          without plain feature specs in the checkpoint, ``FeatureEmbedding``
          checks the tables as they load).

        The data module state saved beside the model is kept for ``setup``
        (``mtl_lightning.growth.hand_datamodule_state``).
        """
        self._checkpoint_datamodule_states = datamodule_states(checkpoint)
        load_calibration(self, checkpoint)
        self._check_architecture(checkpoint)
        grown, self._table_growth = grow_checkpoint_tables(self, checkpoint, self._datamodule())
        self._grow_optimizer_states()
        check_vocabularies(self.model, checkpoint, grown)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_calibration(self, checkpoint)  # the attached calibration, as plain data

    def _check_architecture(self, checkpoint: Mapping[str, Any]) -> None:
        """``ValueError`` naming both classes when the checkpoint's model is another architecture whose weights
        do not fit this one (Lightning would list every missing and unexpected key instead)."""
        config = (checkpoint.get("hyper_parameters") or {}).get("model")
        class_path = config.get("class_path") if isinstance(config, Mapping) else None
        state = checkpoint.get("state_dict")
        if not isinstance(class_path, str) or not isinstance(state, Mapping) or not self.strict_loading:
            return  # (load_from_checkpoint(path, model=...) writes the given model over the class path)
        mine = type(self.model)
        if class_path.rpartition(".")[2] == mine.__name__:
            return
        saved = {key for key in state if isinstance(key, str) and key.startswith("model.")}
        if saved == {f"model.{key}" for key in self.model.state_dict()}:
            return  # another class with the very same weights (a subclass, a renamed copy): it loads
        raise ValueError(
            f"the checkpoint holds a {class_path.rpartition('.')[2]} model ({class_path}), but this module's model "
            f"is a {mine.__name__} ({mine.__module__}.{mine.__qualname__}): its weights do not fit. Load it with "
            "MultiTaskLightningModule.load_from_checkpoint(path) (which builds the checkpoint's architecture), or "
            f"build the module with a {class_path.rpartition('.')[2]} to resume it"
        )

    def _datamodule(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def _grow_optimizer_states(self) -> None:
        """Resize the loaded checkpoint's optimizer state of grown tables, once the Trainer's optimizers exist."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if self._table_growth is not None and optimizers:
            self._table_growth.grow_optimizer_states(self, optimizers)
            self._table_growth = None

    def on_fit_start(self) -> None:
        self._grow_optimizer_states()  # a checkpoint whose tables grew, loaded before the optimizers existed
        self.training_checks.start_fit()

    # --------------------------------------------------------------- optimizer
    def optimized_parameters(self) -> list[nn.Parameter]:
        """Every parameter except those the weighting strategy updates itself (GradNorm's weights)."""
        private = {id(p) for p in self.weighting.private_parameters()}
        return [p for p in self.parameters() if id(p) not in private]

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_precision(self.trainer)
        hand_datamodule_state(self._datamodule(), self._checkpoint_datamodule_states)
        if self.hparams.get("sparse_embeddings") and self._trainer is not None:
            check_sparse_strategy(self.trainer.strategy)
        if self.hparams.get("compile_model") and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self) -> Any:
        """The optimizer over ``optimized_parameters()`` with weight-decay groups (see ``mtl_lightning.optim``)."""
        hp = self.hparams
        tables = {id(t) for t in embedding_tables(self.model)}
        sparse_tables = [p for p in self.parameters() if id(p) in tables] if hp.get("sparse_embeddings") else []
        return build_optimizers(
            self.optimized_parameters(), optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
            optimizer_kwargs=hp.optimizer_kwargs,
            no_decay=no_weight_decay(self, decay_embeddings=bool(hp.get("decay_embeddings")), exclude=[self.weighting]),
            sparse_tables=sparse_tables, sparse_lr=hp.get("sparse_lr"), embedding_lr=hp.get("embedding_lr"),
            dense_tables=[p for p in self.parameters() if id(p) in tables], lr_scheduler=hp.lr_scheduler,
            lr_scheduler_kwargs=hp.lr_scheduler_kwargs, lr_scheduler_interval=hp.lr_scheduler_interval,
        )


# Lightning reads training_step's signature (inspect.getfullargspec, to pass batch_idx) at every step; a cached
# __signature__ turns that into a lookup: about 20 us a step on the 2-core machine (training_step.py)
MultiTaskLightningModule.training_step.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    MultiTaskLightningModule.training_step)
