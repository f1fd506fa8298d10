"""Every task's masked loss in one set of tensor ops, for tasks trained with their kind's default loss.

``masked_loss`` (``losses.masked``) computes one task's loss with about fifteen
small tensor ops and a few Python calls (the label mask, the replacement of
ignored labels, the per-row loss, the masked mean). A training step of ``T``
tasks runs them ``T`` times, and on a small model or a GPU those ops and calls,
not the arithmetic, are what a step costs. :class:`FusedTaskLosses` stacks the
tasks' predictions and labels into ``(T, B)`` tensors and computes the same
losses for all of them at once: one mask, one replacement, one BCE-with-logits
over the binary tasks, one squared error over the regression tasks, one masked
mean per row. Each task's value is computed by the same formula on the same
numbers as ``masked_loss`` (``sum_i w_i l_i / max(sum_i w_i, 1)``, ``w`` the
valid-row mask), and tested equal to it, gradients included.

It applies to tasks whose ``Task.loss`` is their kind's default with no option
(``bce`` for ``binary``, ``mse`` for ``regression``: :meth:`supports`), to
batches without sample weights; ``MultiTaskLightningModule`` uses it when,
besides, no counterfactual CVR loss is configured and the weighting strategy
reads only the losses (``WeightingStrategy.reads == "losses"``): a strategy that
takes per-task gradients keeps one separate graph per task, since a per-task
gradient taken through the stacked losses would also run every other task's
branch backwards (with zeros).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tasks import Task

_DEFAULT = {"binary": "bce", "regression": "mse"}


class FusedTaskLosses:
    """The unweighted, masked losses of ``tasks`` (in their order) as one ``(T,)`` tensor; see the module docstring.

    Args:
        tasks: the tasks, each trained with its kind's default loss and no option (``supports(tasks)``).
        ignore_label: the label value that means "no label" (NaN always does), as ``masked_loss``'s.
    """

    def __init__(self, tasks: Sequence[Task], ignore_label: float | None = -1) -> None:
        if not self.supports(tasks):
            raise ValueError("FusedTaskLosses computes only the default losses (bce for binary tasks, mse for "
                             f"regression tasks) without options; got {[(t.name, t.kind, t.loss) for t in tasks]}")
        # binary tasks first, then regression tasks: each kind is one block of rows of the (T, B) stack
        order = ([i for i, t in enumerate(tasks) if t.kind == "binary"]
                 + [i for i, t in enumerate(tasks) if t.kind == "regression"])
        self.tasks = tuple(tasks)
        self.stacked_tasks = tuple(tasks[i] for i in order)
        self.num_binary = sum(t.kind == "binary" for t in tasks)
        self.ignore_label = ignore_label
        # position of task k in the stack; None when the stack is already in task order
        self._restore = None if order == sorted(order) else [order.index(k) for k in range(len(tasks))]
        self._restore_index: dict[torch.device, Tensor] = {}

    @staticmethod
    def supports(tasks: Sequence[Task]) -> bool:
        """Whether every task trains with its kind's default loss (``bce`` / ``mse``) and no loss option."""
        return bool(tasks) and all(_DEFAULT.get(t.kind) == t.loss and not t.loss_options for t in tasks)

    def __call__(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(losses, valid)``: each task's loss ``(T,)`` in task order, and its number of valid rows ``(T,)``
        (float; exact below 2**24 rows per batch)."""
        predictions = torch.stack([_float(_get(outputs, t, "output")) for t in self.stacked_tasks])  # (T, B)
        targets = _float(torch.stack([_get(labels, t, "label") for t in self.stacked_tasks]))
        mask = targets == targets  # not NaN
        if self.ignore_label is not None:
            mask &= targets != self.ignore_label
        safe = torch.where(mask, targets, 0.0)  # ignored labels replaced before the loss: NaN * 0 would be NaN
        weights = mask.to(predictions.dtype)  # (T, B)
        nb = self.num_binary
        if nb == len(self.stacked_tasks):
            row_losses = F.binary_cross_entropy_with_logits(predictions, safe, reduction="none")
        elif nb == 0:
            row_losses = (predictions - safe) ** 2
        else:
            row_losses = torch.cat([F.binary_cross_entropy_with_logits(predictions[:nb], safe[:nb], reduction="none"),
                                    (predictions[nb:] - safe[nb:]) ** 2])
        sums = (row_losses * weights).sum(1)
        valid = weights.sum(1)
        losses = sums / valid.clamp(min=1.0)
        if self._restore is not None:
            index = self._restore_index.get(losses.device)
            if index is None:
                index = self._restore_index[losses.device] = torch.tensor(self._restore, device=losses.device)
            losses, valid = losses.index_select(0, index), valid.index_select(0, index)
        return losses, valid


def _float(prediction: Tensor) -> Tensor:
    return prediction if prediction.dtype == torch.float32 else prediction.float()


def _get(values: Mapping[str, Tensor], task: Task, what: str) -> Tensor:
    try:
        return values[task.name]
    except KeyError:
        where = "the batch has no label" if what == "label" else "the model returned no output"
        raise ValueError(f"{where} for task {task.name!r}; it has {sorted(values)}") from None


__all__ = ["FusedTaskLosses"]
