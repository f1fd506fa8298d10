"""Adaptive Information Transfer Multi-task (AITM) framework.

Xi, D., Chen, Z., Yan, P., Zhang, Y., Zhu, Y., Zhuang, F., Chen, Y. "Modeling
the Sequential Dependence among Audience Multi-step Conversions with
Multi-task Learning in Targeted Display Advertising." KDD 2021.

The tasks are the steps of one funnel in order (impression -> click ->
purchase -> ...), each predicted over every impression. All tasks share the
embedding; each task t has its own bottom MLP giving q_t. The first task's
fused representation is z_1 = q_1. For t >= 2 the AIT module decides how much
of the previous step to take in:

* p_{t-1} = transfer_t(z_{t-1}), an MLP of the previous task's fused
  representation (the information passed down the funnel);
* for u in {p_{t-1}, q_t}: w_u = softmax_u(<h1(u), h2(u)> / sqrt(k)) with
  bias-free linear maps h1, h2, h3 of width k (scaled dot-product attention of
  each input with itself);
* z_t = sum_u w_u h3(u).

Each task's tower maps z_t to a logit. The behavioural expectation calibrator
asks that a later step is never more likely than the one before it:
``alpha * sum_{t>=2} mean_i max(y_t(i) - y_{t-1}(i), 0)`` with y the predicted
probabilities; it is this architecture's ``auxiliary_loss``, which the training
module adds to the total (logged as ``train/aux_loss``).

Labels: every task's label covers every impression (e.g. ``click`` and
``purchase`` = click AND conversion, 0 on non-clicked rows), not the ignore
label. A step's label given only where the step before is 1 (a conversion
label on clicked rows, null elsewhere: the usual log shape) is completed by
``derive_labels``: 0 wherever the previous step's label is 0, so
``[Task("click"), Task("conversion")]`` trains the funnel directly. Choices where the paper is open: the transfer MLP is one layer of
width k with the activation; ``tower_hidden=()`` makes each tower a single
linear layer, as in the authors' code; the calibrator averages over the batch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class AdaptiveInformationTransfer(nn.Module):
    """``z = sum_u softmax_u(<h1 u, h2 u> / sqrt(k)) h3 u`` over the inputs ``u`` stacked as ``(B, U, k)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)  # h1
        self.key = nn.Linear(dim, dim, bias=False)  # h2
        self.value = nn.Linear(dim, dim, bias=False)  # h3
        self.scale = 1.0 / math.sqrt(dim)

    def weights(self, inputs: Tensor) -> Tensor:
        """Attention weights ``(B, U)`` of the stacked inputs ``(B, U, k)``."""
        return torch.softmax((self.query(inputs) * self.key(inputs)).sum(-1) * self.scale, dim=-1)

    def forward(self, inputs: Tensor) -> Tensor:
        return (self.weights(inputs).unsqueeze(-1) * self.value(inputs)).sum(dim=1)  # (B, k)


@register("aitm")
class AITM(MultiTaskArchitecture):
    """embedding -> per-task bottoms -> AIT from task t-1 to t -> towers; calibrator as auxiliary loss."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        bottom_hidden: Sequence[int] = (128, 64, 32),
        tower_hidden: Sequence[int] = (),
        calibrator_weight: float = 0.6,
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        other = {t.name: t.kind for t in self.tasks if t.kind != "binary"}
        if other:
            raise ValueError(f"AITM: every task is one step of a conversion funnel whose probabilities it multiplies, "
                             f"so binary; got {other} (train those tasks with another architecture)")
        if len(bottom_hidden) == 0:
            raise ValueError("AITM: bottom_hidden must list at least one layer size")
        if calibrator_weight < 0:
            raise ValueError(f"AITM: calibrator_weight must be >= 0, got {calibrator_weight}")
        self.calibrator_weight = float(calibrator_weight)
        self.embedding = self.input_layer()
        self.bottoms = nn.ModuleDict({
            name: MLP(self.embedding.output_dim, bottom_hidden, activation=activation, dropout=dropout)
            for name in self.task_names
        })
        width = bottom_hidden[-1]
        later = self.task_names[1:]
        self.transfers = nn.ModuleDict({name: MLP(width, (width,), activation=activation, dropout=dropout)
                                        for name in later})
        self.transfer_attention = nn.ModuleDict({name: AdaptiveInformationTransfer(width) for name in later})
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def fused(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's fused representation z_t ``(B, k)``."""
        x = self.embedding(features)  # (B, D)
        fused: dict[str, Tensor] = {}
        previous: Tensor | None = None
        for name in self.task_names:
            q = self.bottoms[name](x)  # (B, k)
            if previous is None:
                z = q
            else:
                p = self.transfers[name](previous)  # (B, k)
                z = self.transfer_attention[name](torch.stack([p, q], dim=1))  # (B, 2, k) -> (B, k)
            fused[name] = previous = z
        return fused

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: squeeze_logit(self.towers[name](z)) for name, z in self.fused(features).items()}

    def derive_labels(self, labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each step's labels over every impression: 0 wherever the previous step's (derived) label is 0."""
        labels = dict(labels)
        for earlier, later in zip(self.task_names, self.task_names[1:]):
            if earlier in labels and later in labels:
                labels[later] = torch.where(labels[earlier] == 0, torch.zeros_like(labels[later]), labels[later])
        return labels

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """The behavioural expectation calibrator ``alpha * sum_{t>=2} mean_i max(y_t - y_{t-1}, 0)``."""
        if len(self.task_names) < 2:
            return None
        probabilities = [torch.sigmoid(outputs[name].float()) for name in self.task_names]
        violation = sum(torch.relu(later - earlier).mean() for earlier, later in zip(probabilities, probabilities[1:]))
        return self.calibrator_weight * violation

    def shared_parameters(self) -> list[nn.Parameter]:
        """The embedding and the first task's bottom: through the transfer chain every task reads q_1."""
        return parameters_of(self.embedding, self.bottoms[self.task_names[0]])

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.bottoms[self.task_names[0]].last_linear())
