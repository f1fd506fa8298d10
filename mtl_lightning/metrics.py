"""Per-task metrics built on torchmetrics.

Binary tasks: AUROC and log-loss; regression tasks: MSE and MAE. Every metric
takes the model's raw output (logits for binary tasks), so log-loss is
computed stably from logits. Rows whose label is ignored are filtered out
before ``update``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchmetrics.wrappers import MultitaskWrapper

from .tasks import Task


class BinaryLogLoss(Metric):
    """Mean binary cross-entropy computed from logits (exact for any logit, no clipping)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        loss = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="sum")
        self.total += loss
        self.count += target.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class BinaryAUROCFromLogits(BinaryAUROC):
    """``BinaryAUROC`` fed with logits: they are turned into probabilities before every update.

    (torchmetrics applies a sigmoid only when a batch has values outside [0, 1],
    a per-batch decision that would mix scales across batches.)
    """

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(torch.sigmoid(preds.float()), target.long())


def task_metrics(tasks: Sequence[Task]) -> MultitaskWrapper:
    """``MultitaskWrapper`` with ``auc``/``logloss`` (binary) or ``mse``/``mae`` (regression) per task."""
    collections = {}
    for task in tasks:
        if task.kind == "binary":
            metrics = {"auc": BinaryAUROCFromLogits(validate_args=False), "logloss": BinaryLogLoss()}
        else:
            metrics = {"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}
        collections[task.name] = MetricCollection(metrics, compute_groups=False)
    return MultitaskWrapper(collections)


def flatten_metrics(stage: str, computed: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{task: {metric: v}}`` -> ``{"<stage>/<task>/<metric>": v}``."""
    return {f"{stage}/{task}/{name}": value for task, values in computed.items() for name, value in values.items()}
