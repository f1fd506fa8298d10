"""Init-argument capture, so a module can be rebuilt from a checkpoint without pickling code.

A class that inherits :class:`Configurable` records the arguments of its
outermost ``__init__`` call. :meth:`Configurable.config` returns them as plain
data (feature and task specs become dicts), and :func:`build` rebuilds the
object. ``MultiTaskLightningModule`` stores the architecture's config in every
checkpoint, which is what lets ``load_from_checkpoint(path)`` work without the
caller constructing the model again.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from .features import DenseFeature, SequenceFeature, SparseFeature, feature_to_config
from .tasks import Task

_PLAIN = (str, int, float, bool, type(None))


def to_plain(value: Any) -> Any:
    """Convert specs, tuples and nested containers into checkpoint/YAML-safe data.

    Raises ``TypeError`` for anything else (an ``nn.Module``, a function ...).
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (SparseFeature, DenseFeature, SequenceFeature)):
        return feature_to_config(value)
    if isinstance(value, Task):
        return value.to_config()
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    raise TypeError(f"cannot store a {type(value).__name__} in a config; use plain values")


class Configurable:
    """Mixin recording the outermost ``__init__`` arguments of every subclass."""

    _init_args: dict[str, Any] | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop("self", None)
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(arguments.pop(name, {}))
                object.__setattr__(self, "_init_args", arguments)
            original(self, *args, **kw)

        cls.__init__ = __init__  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}`` with plain values only."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": to_plain(self.__dict__.get("_init_args") or {}),
        }


def build(config: dict[str, Any]) -> Any:
    """Instantiate ``config["class_path"]`` with ``config["init_args"]``."""
    module_name, _, class_name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**config.get("init_args", {}))
