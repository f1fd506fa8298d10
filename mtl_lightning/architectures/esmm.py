"""Entire Space Multi-task Model (ESMM).

Ma, X., Zhao, L., Huang, G., Wang, Z., Hu, Z., Zhu, X., Gai, K. "Entire Space
Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion
Rate." SIGIR 2018.

A CTR tower and a CVR tower read the same embedding (optionally through a
shared bottom MLP; the paper shares only the embedding tables). Over every
impression, pCTR = sigma(a) and pCTCVR = pCTR * pCVR = sigma(a) * sigma(b),
where a and b are the two towers' logits. The model is trained on the click
label and the click-and-conversion label of every impression, so the CVR tower
is learnt over the entire space, supervised only through the product.

Outputs (keyed by the names given in ``click_task``, ``conversion_task``,
``ctcvr_task``; default ``ctr``, ``cvr``, ``ctcvr``), all logits:

* ``ctr``  = a;
* ``cvr``  = b;
* ``ctcvr`` = logit(sigma(a) * sigma(b)), computed in log space. With
  p = sigma(a) sigma(b) = 1 / ((1 + e^-a)(1 + e^-b)),
  p / (1 - p) = 1 / (e^-a + e^-b + e^-(a+b)), so
  ``ctcvr = -logsumexp(-a, -b, -a-b)`` (= logsigmoid(a) + logsigmoid(b)
  - log(1 - sigma(a) sigma(b)) without the cancellation): exact and finite for
  any finite a, b, so no loss ever sees a probability of exactly 0 or 1.

Tasks and labels: ``tasks`` is any non-empty subset of the three outputs, all
binary. The paper's model is ``tasks=[Task("ctr", label="click"),
Task("ctcvr", label="purchase")]`` (both labels over every impression); ``cvr``
is then an extra output (``extra_outputs()``), predicted but given no loss of
its own. Listing ``Task("cvr", label="conversion")`` too adds the click-space
CVR loss (conversion label on clicked rows, the ignore label elsewhere), or,
with the module's ``counterfactual=`` option, the ESCM² IPS/DR loss.

Logs in their usual shape (a click label on every impression, a conversion
label on clicked rows only: null, NaN or the ignore label elsewhere) need no
CTCVR column: ``derive_labels`` computes CTCVR = click · conversion per row
(0 where the click is 0, the conversion label where it is 1, missing where the
click is). With the click and conversion tasks given and no ctcvr task, the
ctcvr task is added (``Task(ctcvr_task)``, weight 1) and trained on that
product: ``tasks=[Task("ctr", label="click"), Task("cvr", label="conversion")]``
trains ctr, cvr (click space) and ctcvr (not in DCMT, whose paper model has no
CTCVR loss: ``adds_ctcvr_task``). A ctcvr task whose label column is
given is made 0 on unclicked rows, so ``Task("ctcvr", label="conversion")`` is
the paper's model from the same two columns.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import MLP
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """``logit(sigmoid(a) * sigmoid(b)) = -logsumexp(-a, -b, -a-b)``, exact and finite for finite logits."""
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0)


@register("esmm")
class ESMM(MultiTaskArchitecture):
    """embedding -> [shared bottom] -> CTR tower and CVR tower; ctcvr is the product of their probabilities."""

    #: Given the click and conversion tasks but no ctcvr task, add the ctcvr task (trained on click · conversion):
    #: ESMM's and ESCM²'s losses both have the CTCVR term. DCMT's paper model has none, so DCMT sets ``False``.
    adds_ctcvr_task: ClassVar[bool] = True

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
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        names = (click_task, conversion_task, ctcvr_task)
        if len(set(names)) != 3:
            raise ValueError(f"{type(self).__name__}: click_task, conversion_task and ctcvr_task must differ, got {names}")
        self.click_task, self.conversion_task, self.ctcvr_task = names
        unknown = [t.name for t in self.tasks if t.name not in names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: tasks {unknown} are not outputs of the model; its outputs are "
                f"{list(names)} (rename them with click_task=, conversion_task=, ctcvr_task=)"
            )
        other = {t.name: t.kind for t in self.tasks if t.kind != "binary"}
        if other:
            raise ValueError(f"{type(self).__name__}: every task is a probability of the funnel (CTCVR = CTR x CVR), "
                             f"so binary; got {other} (train those tasks with another architecture)")
        if self.adds_ctcvr_task and ctcvr_task not in self.task_names and {click_task, conversion_task} <= set(
                self.task_names):
            self.tasks = (*self.tasks, Task(ctcvr_task))  # trained on click · conversion (derive_labels)
        self.embedding = self.input_layer()
        self.bottom = MLP(self.embedding.output_dim, bottom_hidden, activation=activation, dropout=dropout)
        self.towers = self._towers(self.bottom.output_dim, tower_hidden, activation, dropout,
                                   names=(click_task, conversion_task))

    def extra_outputs(self) -> dict[str, str]:
        names = (self.click_task, self.conversion_task, self.ctcvr_task)
        return {name: "binary" for name in names if name not in self.task_names}

    def derive_labels(self, labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ctcvr task's labels: click · conversion (see the module docstring); the others unchanged."""
        labels = dict(labels)
        click = labels.get(self.click_task)
        if click is None or self.ctcvr_task not in self.task_names:
            return labels
        zero = torch.zeros_like(click)
        if self.ctcvr_task in labels:  # a CTCVR label, or a conversion label given on clicked rows only
            labels[self.ctcvr_task] = torch.where(click == 0, zero, labels[self.ctcvr_task])
        elif self.conversion_task in labels:
            unknown = torch.full_like(click, float("nan"))
            labels[self.ctcvr_task] = torch.where(click == 0, zero,
                                                  torch.where(click == 1, labels[self.conversion_task], unknown))
        return labels

    def heads(self, shared: Tensor) -> dict[str, Tensor]:
        """ctr, cvr and ctcvr logits from the shared representation ``(B, H)``."""
        ctr = squeeze_logit(self.towers[self.click_task](shared))  # (B,)
        cvr = squeeze_logit(self.towers[self.conversion_task](shared))  # (B,)
        return {self.click_task: ctr, self.conversion_task: cvr, self.ctcvr_task: product_logit(ctr, cvr)}

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.heads(self.bottom(self.embedding(features)))  # bottom: (B, H)

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.bottom)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The shared bottom's last linear layer; ESMM as in the paper (no bottom) shares only embedding tables."""
        if len(self.bottom) == 0:
            raise ValueError(
                f"{type(self).__name__} without a shared bottom shares only embedding tables, so it has no last "
                "shared layer for GradNorm; construct it with bottom_hidden=(...) to add one"
            )
        return parameters_of(self.bottom.last_linear())
