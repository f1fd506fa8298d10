"""Loss-weighting strategies, chosen by name or passed as objects.

``create_weighting("gradnorm")``, ``create_weighting({"name": "gradnorm", "alpha": 1.5})``,
``create_weighting({"class_path": "mtl_lightning.weighting.GradNorm", "init_args": {...}})``
or ``create_weighting(GradNorm(alpha=1.5))``. See ``base.py`` for the interface.

A strategy is one file in this package whose class carries ``@register_weighting("name")``:
importing this package imports every module in it, which registers every strategy in
``STRATEGIES`` (a ``mtl_lightning.registry.Registry``) and makes each class importable
from here (``from mtl_lightning.weighting import GradNorm``). Nothing here is edited by
hand to add one.
"""

from __future__ import annotations

from typing import Any

from ..registry import import_submodules
from .base import STRATEGIES, GradientStrategy, WeightingStrategy, distributed_mean, register_weighting

import_submodules(__name__, __path__, skip=("base",))
globals().update({cls.__name__: cls for cls in STRATEGIES.values()})


def create_weighting(spec: str | dict[str, Any] | WeightingStrategy) -> WeightingStrategy:
    """A strategy from its name, a ``{"name": ..., **kwargs}`` or ``class_path`` dict, or the object itself."""
    if isinstance(spec, WeightingStrategy):
        return spec
    if isinstance(spec, dict):
        if "class_path" in spec:  # checked to name a WeightingStrategy subclass before anything is called
            return STRATEGIES.build(spec, "weighting")
        if "name" not in spec:
            raise ValueError(f"a weighting dict needs 'name' (one of {STRATEGIES.names()}) or 'class_path'; got {spec}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return STRATEGIES.create(spec["name"], **kwargs)
    if not isinstance(spec, str):
        raise TypeError(f"weighting must be a name, a dict or a WeightingStrategy, got {type(spec).__name__}")
    return STRATEGIES.create(spec)


__all__ = [
    "WeightingStrategy", "GradientStrategy", "distributed_mean", "register_weighting", "STRATEGIES",
    "create_weighting", *sorted(cls.__name__ for cls in STRATEGIES.values()),
]
