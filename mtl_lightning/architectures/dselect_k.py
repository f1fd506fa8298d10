"""DSelect-k: differentiable selection of k experts, in a multi-gate mixture of experts.

Hazimeh, H., Zhao, Z., Chowdhery, A., Sathiamoorthy, M., Chen, Y., Mazumder,
R., Hong, L., Chi, E. H. "DSelect-k: Differentiable Selection in the Mixture
of Experts with Applications to Multi-Task Learning." NeurIPS 2021.

MMoE's layout (shared experts, one gate and one tower per task) with every
softmax gate replaced by a DSelect-k gate over the ``n`` experts, which puts
non-zero weight on at most ``k`` of them once trained:

* the smooth-step function ``S(t) = 0`` for ``t <= -gamma/2``, ``1`` for
  ``t >= gamma/2``, and ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` between
  (continuously differentiable; exact 0 and 1 are reached);
* ``k`` single-expert selectors, each with ``m = ceil(log2 n)`` logits ``z^(i)``:
  expert ``j`` (binary code ``b(j)``, most significant bit first) gets
  ``r(z)_j = prod_l S(z_l)^[b(j)_l = 1] (1 - S(z_l))^[b(j)_l = 0]``, a
  distribution over the ``2^m`` codes that is one-hot once every ``S(z_l)`` is
  0 or 1;
* the gate ``q = sum_i softmax(alpha)_i r(z^(i))``.

Per-example gates (the paper's choice for multi-task learning; ``per_example=True``)
compute ``z^(i) = W^(i) x + b`` and ``alpha = A x + c`` from the gate's input
(the shared embedding); static gates (``per_example=False``) learn ``z`` and
``alpha`` directly. The entropy regulariser ``lambda sum_i H(r(z^(i)))``, with
``H(r) = -sum_j r_j log(r_j + 1e-6)`` (Eq. 7), drives each selector to a single
expert; it is added to the training loss through ``auxiliary_loss``, summed
over the tasks' gates. When ``n`` is not a power of two the codes ``n .. 2^m - 1``
select no expert; as in the authors' code, the term ``sum_i 1 / sum_j r(z^(i))_j``
(minimal, ``k``, once all mass is on real experts) keeps selectors off them.

Choices where the paper is open (the official Keras layer is followed):
``z`` weights and biases start uniform in ``(-gamma/100, gamma/100)`` (so every
``S(z_l)`` starts near 1/2 and the gate near uniform), ``alpha``'s in
``(-0.05, 0.05)``; per-example terms are averaged over the batch (the Keras
layer sums them), so ``entropy_weight`` does not depend on the batch size;
``entropy_weight`` defaults to 0.01 (the paper tunes it); experts are MLPs with
the activation after every layer, as in MMoE.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature
from ..layers import ExpertBank, mix
from ..registry import register
from ..tasks import Task
from .base import MultiTaskArchitecture, parameters_of, squeeze_logit

ENTROPY_EPSILON = 1e-6  # inside the log of the entropy, as in the authors' code


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """``S(t)``: 0 below ``-gamma/2``, 1 above ``gamma/2``, the cubic ``-2t^3/gamma^3 + 3t/(2 gamma) + 1/2`` between."""
    t = t.clamp(-gamma / 2, gamma / 2)  # the cubic is 0 and 1 at the ends, with zero slope: the same function
    return -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5


def binary_codes(num_experts: int) -> Tensor:
    """``(n, m)`` float: row ``j`` is ``j`` in ``m = ceil(log2 n)`` bits, most significant first."""
    bits = max(1, math.ceil(math.log2(num_experts)))
    return torch.tensor([[(j >> (bits - 1 - l)) & 1 for l in range(bits)] for j in range(num_experts)],
                        dtype=torch.float32)


class DSelectKGate(nn.Module):
    """A DSelect-k gate over ``num_experts``: ``forward(x) -> (weights (B, n), selectors (B, k, n))``."""

    def __init__(self, input_dim: int, num_experts: int, num_selected: int, gamma: float = 1.0,
                 per_example: bool = True) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"DSelect-k selects among experts: num_experts must be >= 2, got {num_experts}")
        if not 1 <= num_selected <= num_experts:
            raise ValueError(f"num_selected (k) must be in [1, num_experts={num_experts}], got {num_selected}")
        if not gamma > 0:
            raise ValueError(f"gamma (the smooth-step width) must be > 0, got {gamma}")
        self.num_experts, self.num_selected, self.gamma = num_experts, num_selected, float(gamma)
        self.per_example = bool(per_example)
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)  # (n, m)
        self.num_bits = self.codes.shape[1]
        self.power_of_two = num_experts == 2**self.num_bits
        z_bound = self.gamma / 100
        if self.per_example:
            self.z = nn.Linear(input_dim, num_selected * self.num_bits)
            self.alpha = nn.Linear(input_dim, num_selected)
            for layer, bound in ((self.z, z_bound), (self.alpha, 0.05)):
                nn.init.uniform_(layer.weight, -bound, bound)
                nn.init.uniform_(layer.bias, -bound, bound)
        else:
            self.z_logits = nn.Parameter(torch.empty(num_selected, self.num_bits).uniform_(-z_bound, z_bound))
            self.alpha_logits = nn.Parameter(torch.empty(num_selected).uniform_(-0.05, 0.05))

    def selector_outputs(self, z: Tensor) -> Tensor:
        """``r(z^(i))`` for logits ``z`` of shape ``(..., k, m)`` -> ``(..., k, n)``."""
        s = smooth_step(z, self.gamma).unsqueeze(-2)  # (..., k, 1, m)
        codes = self.codes  # (n, m)
        return (codes * s + (1 - codes) * (1 - s)).prod(dim=-1)  # (..., k, n)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        if self.per_example:
            z = self.z(x).view(batch, self.num_selected, self.num_bits)  # (B, k, m)
            alpha = torch.softmax(self.alpha(x), dim=-1)  # (B, k)
        else:
            z = self.z_logits.expand(batch, -1, -1)
            alpha = torch.softmax(self.alpha_logits, dim=-1).expand(batch, -1)
        selectors = self.selector_outputs(z)  # (B, k, n)
        return torch.einsum("bk,bkn->bn", alpha, selectors), selectors

    def regularizer(self, selectors: Tensor, entropy_weight: float) -> Tensor:
        """``entropy_weight * sum_i H(r_i)`` (+ the unreachable-code term when n is not a power of 2), batch mean."""
        entropy = -(selectors * torch.log(selectors + ENTROPY_EPSILON)).sum(dim=(-2, -1))  # (B,)
        total = entropy_weight * entropy
        if not self.power_of_two:
            total = total + (1.0 / selectors.sum(dim=-1)).sum(dim=-1)
        return total.mean()


@register("dselect_k")
class DSelectK(MultiTaskArchitecture):
    """embedding -> experts; one DSelect-k gate (choosing ``num_selected`` experts) and one tower per task."""

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        num_experts: int = 8,
        num_selected: int = 2,
        gamma: float = 1.0,
        entropy_weight: float = 0.01,
        per_example: bool = True,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction=interaction)
        if not entropy_weight >= 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.entropy_weight = float(entropy_weight)
        self.embedding = self.input_layer()
        self.experts = ExpertBank(num_experts, self.embedding.output_dim, expert_hidden, activation, dropout)
        self.gates = nn.ModuleDict({
            name: DSelectKGate(self.embedding.output_dim, num_experts, num_selected, gamma, per_example)
            for name in self.task_names
        })
        self.towers = self._towers(self.experts.output_dim, tower_hidden, activation, dropout)
        self._selectors: dict[str, Tensor] | None = None  # the last training forward's, for auxiliary_loss

    def gate_weights(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's expert weights ``(B, n)`` (rows sum to 1 when all mass is on real experts)."""
        x = self.embedding(features)
        return {name: self.gates[name](x)[0] for name in self.task_names}

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = self.embedding(features)  # (B, D)
        experts = self.experts(x)  # (B, E, H)
        outputs, selectors = {}, {}
        for name in self.task_names:
            weights, selectors[name] = self.gates[name](x)  # (B, E), (B, k, E)
            outputs[name] = squeeze_logit(self.towers[name](mix(weights, experts)))
        if self.training:
            self._selectors = selectors
        return outputs

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """The gates' regulariser for the batch of the last training ``forward`` (``None`` outside training).

        ``entropy_weight * sum_tasks mean_batch sum_i H(r(z^(i)))``, plus the
        unreachable-code term when ``num_experts`` is not a power of two.
        """
        if self._selectors is None:
            return None
        selectors, self._selectors = self._selectors, None  # used once: the next step brings its own
        return sum(self.gates[name].regularizer(selectors[name], self.entropy_weight) for name in self.task_names)

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.experts)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.experts.last_layer_parameters()
