"""Helpers for multi-scenario (multi-domain) architectures: the domain feature and per-feature slices.

A multi-scenario architecture names one sparse feature as its domain
indicator (``domain_feature=``) and has ``num_domains`` domains; ids of that
feature must lie in ``[0, num_domains)``. :func:`resolve_domain` checks the
spec when the model is built, :func:`domain_ids` checks every batch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..features import Feature, SparseFeature
from .embedding import FeatureEmbedding


def resolve_domain(owner: str, features: Sequence[Feature], domain_feature: str, num_domains: int | None) -> int:
    """Check that ``domain_feature`` is a sparse feature; return ``num_domains`` (default: its vocab_size)."""
    by_name = {f.name: f for f in features}
    if domain_feature not in by_name:
        raise ValueError(
            f"{owner}: domain_feature={domain_feature!r} is not one of the features {sorted(by_name)}; "
            "pass domain_feature=<name of the sparse feature holding the domain id>"
        )
    spec = by_name[domain_feature]
    if not isinstance(spec, SparseFeature):
        raise ValueError(f"{owner}: domain_feature={domain_feature!r} must be a SparseFeature, got {type(spec).__name__}")
    num = spec.vocab_size if num_domains is None else int(num_domains)
    if num < 1:
        raise ValueError(f"{owner}: num_domains must be >= 1, got {num_domains}")
    if num > spec.vocab_size:
        raise ValueError(
            f"{owner}: num_domains={num} exceeds the vocab_size {spec.vocab_size} of domain feature {domain_feature!r}"
        )
    return num


def domain_ids(owner: str, features: Mapping[str, Tensor], domain_feature: str, num_domains: int) -> Tensor:
    """The batch's domain ids as int64 ``(B,)``; an id outside ``[0, num_domains)`` raises ``ValueError``."""
    if domain_feature not in features:
        raise ValueError(f"{owner}: the batch has no domain feature {domain_feature!r}; it has {sorted(features)}")
    ids = features[domain_feature]
    if ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"{owner}: domain feature {domain_feature!r} must be int ids of shape (B,), got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    ids = ids.long()
    if torch.compiler.is_compiling():  # torch.compile / torch.export: no host sync, a device-side assert
        torch._assert_async(((ids >= 0) & (ids < num_domains)).all(),
                            f"{owner}: a domain id of {domain_feature!r} is outside [0, {num_domains})")
    elif ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_domains:
            bad = low if low < 0 else high
            raise ValueError(
                f"{owner}: domain feature {domain_feature!r} has id {bad}, outside [0, {num_domains}); "
                f"set num_domains to the number of domains (ids 0 .. num_domains-1)"
            )
    return ids


def feature_slices(embedding: FeatureEmbedding) -> dict[str, slice]:
    """Where each feature's vector sits in ``embedding``'s embedded flat ``(B, embedded_dim)`` vector.

    The members of a group of encoded sequences share the group's slice (see
    :meth:`FeatureEmbedding.feature_slices`).
    """
    return embedding.feature_slices()


def check_feature_names(owner: str, argument: str, names: Sequence[str], features: Sequence[Feature]) -> tuple[str, ...]:
    """Every name in ``names`` is a feature; returns them as a tuple."""
    known = {f.name for f in features}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{owner}: {argument} names unknown features {unknown}; features are {sorted(known)}")
    return tuple(names)
