"""Loss-weighting strategies, chosen by name or passed as objects."""

from __future__ import annotations

from typing import Any

from ..config import build
from .base import WeightingStrategy
from .static import Static

STRATEGIES: dict[str, type[WeightingStrategy]] = {"static": Static}


def create_weighting(spec: str | dict[str, Any] | WeightingStrategy) -> WeightingStrategy:
    """A strategy from its name (``"static"``), its config dict, or the object itself."""
    if isinstance(spec, WeightingStrategy):
        return spec
    if isinstance(spec, dict):
        return build(spec)
    if spec not in STRATEGIES:
        raise ValueError(f"unknown weighting {spec!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[spec]()


__all__ = ["WeightingStrategy", "Static", "STRATEGIES", "create_weighting"]
