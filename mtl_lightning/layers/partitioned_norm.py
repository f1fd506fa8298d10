"""Partitioned Normalization (PN).

Sheng, X.-R. et al. "One Model to Serve All: Star Topology Adaptive
Recommender for Multi-Domain CTR Prediction." CIKM 2021, section 4.3.

Batch normalization whose scale and shift are shared-times-domain and
shared-plus-domain: ``z' = (gamma * gamma_p) (z - mu) / sqrt(var + eps) + (beta + beta_p)``
for a row of domain ``p``. Evaluation uses domain ``p``'s own moving mean and
variance. In training the paper takes ``mu, var`` from the mini-batch (its
batches come from one domain); with mixed batches we take each domain's
statistics over that domain's rows of the batch, so a row is normalised only
with rows of its own domain and each domain's moving statistics follow its own
data (domains absent from a batch keep theirs unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PartitionedNorm(nn.Module):
    """``(B, F)`` features and ``(B,)`` domain ids -> ``(B, F)``."""

    def __init__(self, num_features: int, num_domains: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"PartitionedNorm: num_domains must be >= 1, got {num_domains}")
        self.num_domains, self.momentum, self.eps = num_domains, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma (shared)
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta (shared)
        self.domain_weight = nn.Parameter(torch.ones(num_domains, num_features))  # gamma_p
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, num_features))  # beta_p
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))

    def domain_statistics(self, x: Tensor, domain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-domain mean and biased variance over the batch rows of each domain, and the row counts."""
        counts = torch.bincount(domain, minlength=self.num_domains).to(x.dtype)  # (P,)
        denom = counts.clamp(min=1).unsqueeze(-1)
        mean = x.new_zeros(self.num_domains, x.shape[1]).index_add(0, domain, x) / denom  # (P, F)
        centered = x - mean[domain]
        var = x.new_zeros(self.num_domains, x.shape[1]).index_add(0, domain, centered * centered) / denom
        return mean, var, counts

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        if self.training:
            mean, var, counts = self.domain_statistics(x, domain)
            with torch.no_grad():
                present = counts > 0
                n = counts.unsqueeze(-1)
                unbiased = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
                m = self.momentum
                self.running_mean[present] = (1 - m) * self.running_mean[present] + m * mean[present].detach()
                self.running_var[present] = (1 - m) * self.running_var[present] + m * unbiased[present].detach()
        else:
            mean, var = self.running_mean, self.running_var
        normalised = (x - mean[domain]) / torch.sqrt(var[domain] + self.eps)
        return normalised * (self.weight * self.domain_weight[domain]) + (self.bias + self.domain_bias[domain])
