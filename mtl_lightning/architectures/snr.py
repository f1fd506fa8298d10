"""Sub-Network Routing: SNR-Trans and SNR-Aver.

Ma, J., Zhao, Z., Chen, J., Li, A., Hong, L., Chi, E. H. "SNR: Sub-Network
Routing for Flexible Parameter Sharing in Multi-Task Learning." AAAI 2019.

The shared layers are split into sub-networks. Lower sub-networks (experts,
MLPs on the shared embedding) give ``u_1 .. u_E``; the upper sub-network of
task ``k`` (its tower) reads a routed combination of them, every connection
``(k, e)`` carrying a coding variable ``z_ke``:

* SNR-Trans: ``v_k = sum_e z_ke W_ke u_e`` with a learned transformation matrix per connection;
* SNR-Aver:  ``v_k = sum_e z_ke u_e`` (no matrices; a weighted average).

Each ``z_ke`` is a hard-concrete gate (Louizos et al., ICLR 2018) with its own
``log alpha``: sampled in training (``u ~ U(0,1)``, ``s = sigmoid((log u -
log(1-u) + log alpha) / beta)``, ``z = clip(s (zeta - gamma) + gamma, 0, 1)``)
and deterministic at evaluation (``s = sigmoid(log alpha)``). The expected L0
norm of the gates, times ``l0_weight``, is returned by ``auxiliary_loss`` and so
added to the training loss by the module, which prunes connections.

Choices where the paper is open: one routing level (lower experts to the task
towers; the towers are the upper sub-networks), per-example gate noise in
training, ``beta = 2/3, gamma = -0.1, zeta = 1.1`` (Louizos et al.), and
``log alpha`` initialised near ``log_alpha_init``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, HardConcreteGate
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit


class _SubNetworkRouting(MultiTaskArchitecture):
    """embedding -> lower sub-networks -> hard-concrete routed (optionally transformed) sum -> task towers."""

    transform: bool

    def _build(
        self,
        num_experts: int,
        expert_hidden: Sequence[int],
        transform_dim: int,
        tower_hidden: Sequence[int],
        activation: str,
        dropout: float,
        l0_weight: float,
        log_alpha_init: float,
    ) -> None:
        if l0_weight < 0:
            raise ValueError(f"l0_weight must be >= 0, got {l0_weight}")
        self.l0_weight = float(l0_weight)
        self.embedding = self.input_layer()
        self.experts = ExpertBank(num_experts, self.embedding.output_dim, expert_hidden, activation, dropout)
        width = self.experts.output_dim
        num_tasks = len(self.tasks)
        self.gates = HardConcreteGate((num_tasks, num_experts), log_alpha_init=log_alpha_init)
        if self.transform:
            if transform_dim < 1:
                raise ValueError(f"transform_dim must be >= 1, got {transform_dim}")
            bound = 1.0 / math.sqrt(width)
            # one matrix per connection (task k, expert e): (T, E, H, K)
            self.transforms = nn.Parameter(torch.empty(num_tasks, num_experts, width, transform_dim).uniform_(-bound, bound))
            width = transform_dim
        self.towers = self._towers(width, tower_hidden, activation, dropout)

    def routed(self, features: Mapping[str, Tensor]) -> Tensor:
        """The towers' inputs ``v``: ``(B, T, H)`` (Aver) or ``(B, T, K)`` (Trans)."""
        u = self.experts(self.embedding(features))  # (B, E, H)
        z = self.gates(u.shape[0])  # (B, T, E)
        if self.transform:
            transformed = torch.einsum("beh,tehk->btek", u, self.transforms)  # (B, T, E, K)
            return torch.einsum("bte,btek->btk", z, transformed)
        return torch.einsum("bte,beh->bth", z, u)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        v = self.routed(features)
        return {name: squeeze_logit(self.towers[name](v[:, k])) for k, name in enumerate(self.task_names)}

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """``l0_weight`` times the expected number of open connections."""
        return self.l0_weight * self.gates.l0_penalty()

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.experts)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()


@register("snr_trans")
class SNRTrans(_SubNetworkRouting):
    """SNR-Trans: ``v_k = sum_e z_ke W_ke u_e``."""

    transform = True

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        transform_dim: int = 64,
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        l0_weight: float = 1e-3,
        log_alpha_init: float = 1.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        self._build(num_experts, expert_hidden, transform_dim, tower_hidden, activation, dropout, l0_weight,
                    log_alpha_init)


@register("snr_aver")
class SNRAver(_SubNetworkRouting):
    """SNR-Aver: ``v_k = sum_e z_ke u_e``."""

    transform = False

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        l0_weight: float = 1e-3,
        log_alpha_init: float = 1.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        self._build(num_experts, expert_hidden, 0, tower_hidden, activation, dropout, l0_weight, log_alpha_init)
