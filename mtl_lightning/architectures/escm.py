"""Entire Space Counterfactual Multi-task Model (ESCM²), the architecture.

Wang, H., Chang, T.-W., Liu, T., Huang, J., Chen, Z., Yu, C., Li, R., Chu, W.
"ESCM²: Entire Space Counterfactual Multi-Task Model for Post-Click Conversion
Rate Estimation." SIGIR 2022.

ESMM's body (shared embedding, CTR tower, CVR tower, ctcvr as the log-space
product of their probabilities; see ``esmm.py``) plus an imputation tower on
the same shared representation. The imputation tower's output (one real value
per row, under the name ``imputation_output``) is the doubly-robust estimator's
imputed CVR error ê_i; it is an extra output, never a task.

The counterfactual CVR losses themselves (IPS and DR, and the imputation
tower's own loss) are training concerns and live in
``mtl_lightning.losses.counterfactual``; ``MultiTaskLightningModule(...,
counterfactual=CounterfactualCVR("dr"))`` applies them. The paper's ESCM²-IPS
and ESCM²-DR are this model with tasks ``ctr`` (click), ``cvr`` (conversion,
the ignore label on non-clicked rows) and ``ctcvr`` (purchase) trained with
``counterfactual=CounterfactualCVR("ips")`` or ``("dr")``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

from ..features import Feature
from ..layers import MLP
from ..registry import register
from ..tasks import Task
from .base import squeeze_logit
from .esmm import ESMM


@register("escm")
class ESCM(ESMM):
    """ESMM plus an imputation tower whose output is DR's imputed error."""

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
        imputation_output: str = "imputation",
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, tower_hidden, bottom_hidden, activation, dropout, click_task,
                         conversion_task, ctcvr_task, interaction=interaction)
        if imputation_output in (click_task, conversion_task, ctcvr_task):
            raise ValueError(f"ESCM: imputation_output {imputation_output!r} must differ from the task outputs")
        self.imputation_output = imputation_output
        self.imputation_tower = MLP(self.bottom.output_dim, tower_hidden, output_dim=1, activation=activation,
                                    dropout=dropout)

    def extra_outputs(self) -> dict[str, str]:
        return {**super().extra_outputs(), self.imputation_output: "regression"}

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        shared = self.bottom(self.embedding(features))  # (B, H)
        return {**self.heads(shared), self.imputation_output: squeeze_logit(self.imputation_tower(shared))}
