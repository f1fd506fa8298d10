"""The per-step work of ``MultiTaskLightningModule.training_step``, kept lean: which losses, and when to log.

A training step of a small recommendation model is bound by host work (Python
calls, small tensor ops, Lightning's loop), not by arithmetic, so the step does
nothing per step that can be done once or not at all (docs/performance.md,
"Step overhead"):

* the per-task losses of tasks trained with their kind's default loss are
  computed in one set of ops (``losses.fused.FusedTaskLosses``, the same values
  as ``masked_loss`` task by task), which also counts the valid labels that
  ``TrainingChecks`` needs in the first epoch; everything else (other losses,
  sample weights, a counterfactual CVR loss, a weighting strategy that takes
  per-task gradients) goes through ``compute_losses`` task by task;
* values are handed to ``self.log`` only on the steps the logger writes
  (:func:`logs_this_step`), so no other step turns anything into a Python
  number (no host synchronisation), and as host tensors (:func:`log_step`), so
  that Lightning's progress-bar bookkeeping at later steps does not wait for
  the device either.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .batch import Batch


def task_losses(module: Any, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor],
                batch: Batch) -> tuple[dict[str, Tensor], list[Tensor], Tensor]:
    """``(losses by task, losses in task order, weighted loss)`` of one training step of ``module``.

    The weighted loss is ``module.weighting`` of the losses (without the auxiliary and imputation losses, which
    ``training_step`` adds). Counts the batch's valid labels per task for ``module.training_checks``.
    """
    fused = module.fused_losses
    if (fused is not None and module.counterfactual is None and module.weighting.reads == "losses"
            and not batch.get("weights")):
        stacked, valid = fused(outputs, labels)  # every task's loss in one set of ops, same values
        module.training_checks.add_label_counts(valid, labels[module.task_names[0]].shape[0])
        per_task = list(stacked.unbind())
        return dict(zip(module.task_names, per_task)), per_task, module.weighting(stacked)
    losses = module.compute_losses(outputs, labels, batch.get("weights"), batch.get("group"))
    per_task = [losses[name] for name in module.task_names]
    module.training_checks.count_labels(labels)
    return losses, per_task, module.weighting(per_task)  # a list: see weighting/base.py


def log_step(module: Any, losses: Mapping[str, Tensor], task_losses: Sequence[Tensor], total: Tensor,
             aux: Tensor | None, imputation: Tensor | None, rows: int) -> None:
    """Hand a logged step's values to ``module.log``: ``train/<task>/loss``, ``train/<task>/weight``,
    ``train/aux_loss`` and ``train/imputation_loss`` (when there are), and ``train/loss`` (progress bar).

    The values reach Lightning as host tensors, copied from the device in one transfer: the logger turns them into
    numbers on this step anyway, and Lightning turns the progress bar's value into a number again at every later step
    of the epoch (``_ResultCollection.metrics``), which for a device tensor would wait for the device at every step.
    """
    module.training_checks.check_losses(task_losses, total)
    logged = {f"train/{name}/loss": loss for name, loss in losses.items()}
    logged.update({f"train/{t.name}/weight": w for t, w in zip(module.tasks, module.weighting.last_weights)})
    if aux is not None:
        logged["train/aux_loss"] = aux
    if imputation is not None:
        logged["train/imputation_loss"] = imputation
    logged["train/loss"] = total
    values = dict(zip(logged, torch.stack([v.detach().float().reshape(()) for v in logged.values()]).cpu().unbind()))
    shown = values.pop("train/loss")
    module.log_dict(values, on_step=True, on_epoch=False, batch_size=rows)
    module.log("train/loss", shown, on_step=True, on_epoch=False, batch_size=rows, prog_bar=True)


def logs_this_step(trainer: Any, batch_idx: int) -> bool:
    """Whether the training step hands its values to ``log_dict``: on the steps the logger writes
    (every ``Trainer(log_every_n_steps=...)``) and on the last step of an epoch or of the run (so
    callbacks monitoring ``train/...`` always find it); never under ``Trainer(barebones=True)``,
    where Lightning discards every ``self.log``; always without a Trainer.

    ``self.log`` costs Lightning about a millisecond per key and step on the CPU, and on-step values
    of the other steps are never written, so on those steps the values are not even gathered (no
    per-step cost, and no host sync: they become numbers only when written). The step is the
    Trainer's ``global_step`` (optimizer steps taken so far: the module has one optimizer), the one
    Lightning's logger connector counts its ``log_every_n_steps`` in.
    """
    if trainer is None:
        return True
    if trainer.barebones:
        return False
    if trainer.fast_dev_run:
        return True
    step = trainer.global_step
    every = trainer.log_every_n_steps  # 0: the logger writes no step
    if every and (step + 1) % every == 0:
        return True
    return bool(
        trainer.is_last_batch or trainer.should_stop or batch_idx + 1 >= trainer.num_training_batches
        or (trainer.max_steps > 0 and step + 1 >= trainer.max_steps)
    )


__all__ = ["task_losses", "log_step", "logs_this_step"]
