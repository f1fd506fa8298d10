"""DCMT: Direct entire-space Causal Multi-Task framework for post-click conversion estimation.

Zhu, F., Zhong, M., Yang, X., Li, L., Yu, L., Zhang, T., Zhou, J., Chen, C., Wu, F., Liu, G., Wang, Y. "DCMT: A
Direct Entire-Space Causal Multi-Task Framework for Post-Click Conversion Estimation." ICDE 2023.

ESMM's body (shared embedding, CTR tower, CVR tower and the ctcvr product; see ``esmm.py``) plus a twin of the CVR
tower, the counterfactual CVR tower, whose logit is the extra output ``counterfactual_output``. The factual tower
predicts conversion in the click space; the counterfactual tower predicts, in the non-click space, the
counterfactual label ``r* = 1 - r`` of a non-clicked impression (whose conversion label ``r`` is 0, so ``r* = 1``).
The two towers are tied by the soft constraint ``r̂ + r̂* = 1``. Over D, the impressions with a valid click label
``o``, with ô the predicted CTR (detached, clipped to ``propensity_clip``) and δ the binary cross-entropy:

    L_CVR = 1/|D| sum_D [ o_i δ(r_i, r̂_i) / ô_i  +  (1 - o_i) δ(1, r̂*_i) / (1 - ô_i) ]
            + constraint_weight * 1/|D| sum_D |1 - (r̂_i + r̂*_i)|

The first term is ESCM²'s IPS loss, which ``MultiTaskLightningModule(counterfactual=CounterfactualCVR("ips"))``
applies to the conversion task; the rest (the counterfactual term and the constraint) is this architecture's
``auxiliary_loss``. DCMT as in the paper is therefore ``dcmt`` with tasks ``ctr`` (click) and ``cvr`` (conversion,
null or the ignore label on non-clicked rows) trained with ``counterfactual=CounterfactualCVR("ips")``
(``configs/dcmt.yaml``); the CVR prediction served is the factual tower's.

Choices where the paper is open: ``constraint_weight`` (the paper's λ) defaults to 1; the propensity of the
counterfactual term is clipped to ``propensity_clip = (0.01, 0.99)`` so ``1 - ô`` stays >= 0.01; both means are
over D (the impressions), like ESCM²'s.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..features import Feature
from ..layers import MLP
from ..registry import register
from ..tasks import Task
from .base import squeeze_logit
from .esmm import ESMM


def dcmt_counterfactual_loss(
    click_logits: Tensor,
    clicks: Tensor,
    conversion_logits: Tensor,
    counterfactual_logits: Tensor,
    propensity_clip: tuple[float, float] = (0.01, 0.99),
    constraint_weight: float = 1.0,
) -> Tensor:
    """DCMT's terms beyond IPS (see the module docstring), averaged over the rows whose click label is 0 or 1.

    All inputs are ``(B,)``; ``clicks`` holds 0/1 or an ignore value (anything else: the row is not in D).
    No valid row gives an exact zero that keeps the graph.
    """
    valid = (clicks == 0) | (clicks == 1)
    o = torch.where(valid, clicks, torch.zeros_like(clicks))
    low, high = propensity_clip
    propensity = torch.sigmoid(click_logits.detach()).clamp(low, high)  # ô
    counterfactual = F.binary_cross_entropy_with_logits(  # δ(1, r̂*)
        counterfactual_logits, torch.ones_like(counterfactual_logits), reduction="none")
    constraint = (1 - (torch.sigmoid(conversion_logits) + torch.sigmoid(counterfactual_logits))).abs()
    per_row = (1 - o) * counterfactual / (1 - propensity) + constraint_weight * constraint
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)


@register("dcmt")
class DCMT(ESMM):
    """ESMM plus a counterfactual CVR tower, trained through ``auxiliary_loss`` (see the module docstring)."""

    adds_ctcvr_task = False  # the paper trains ctr and cvr only; a ctcvr task given is trained on click · conversion

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        tower_hidden: Sequence[int] = (128, 64),
        bottom_hidden: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        click_task: str = "ctr",
        conversion_task: str = "cvr",
        ctcvr_task: str = "ctcvr",
        counterfactual_output: str = "counterfactual_cvr",
        propensity_clip: Sequence[float] = (0.01, 0.99),
        constraint_weight: float = 1.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, tower_hidden, bottom_hidden, activation, dropout, click_task,
                         conversion_task, ctcvr_task, interaction=interaction)
        if counterfactual_output in (click_task, conversion_task, ctcvr_task):
            raise ValueError(f"DCMT: counterfactual_output {counterfactual_output!r} must differ from the task outputs")
        clip = tuple(float(v) for v in propensity_clip)
        if len(clip) != 2 or not 0.0 < clip[0] <= clip[1] < 1.0:
            raise ValueError(f"DCMT: propensity_clip must be (low, high) with 0 < low <= high < 1 (1 - ô divides), "
                             f"got {propensity_clip!r}")
        if not constraint_weight >= 0:
            raise ValueError(f"DCMT: constraint_weight must be >= 0, got {constraint_weight!r}")
        if click_task not in self.task_names:
            raise ValueError(f"DCMT: the click output {click_task!r} must be a task (its labels give o and ô); "
                             f"tasks are {self.task_names}")
        self.counterfactual_output = counterfactual_output
        self.propensity_clip = clip
        self.constraint_weight = float(constraint_weight)
        self.counterfactual_tower = MLP(self.bottom.output_dim, tower_hidden, output_dim=1, activation=activation,
                                        dropout=dropout)

    def extra_outputs(self) -> dict[str, str]:
        return {**super().extra_outputs(), self.counterfactual_output: "binary"}

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        shared = self.bottom(self.embedding(features))  # (B, H)
        return {**self.heads(shared), self.counterfactual_output: squeeze_logit(self.counterfactual_tower(shared))}

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """The counterfactual term and the twin-tower constraint; ``None`` without click labels (no training)."""
        if self.click_task not in labels:
            return None
        return dcmt_counterfactual_loss(outputs[self.click_task], labels[self.click_task],
                                        outputs[self.conversion_task], outputs[self.counterfactual_output],
                                        self.propensity_clip, self.constraint_weight)
