"""Name -> architecture class registry.

``@register("mmoe")`` on a class adds it; ``create("mmoe", features=..., tasks=...)``
builds one; ``names()`` lists what is registered. A new architecture is one
file in ``mtl_lightning/architectures`` plus one ``@register`` line: importing
the package imports every module file in it (:func:`import_submodules`), so no
import list is kept by hand (the same holds for ``mtl_lightning/weighting``).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")
_ARCHITECTURES: dict[str, type] = {}


def register(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator registering an architecture under a snake_case ``name``."""

    def decorator(cls: type[T]) -> type[T]:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture name {name!r} is already registered by {_ARCHITECTURES[name].__name__}")
        _ARCHITECTURES[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[ModuleType]:
    """Import every module file of ``package`` (its ``__path__``), except the names in ``skip``, in name order.

    A package's ``__init__`` calls it so that each module's decorators
    (``@register``, ``@register_weighting``) run on import: adding an
    architecture or a strategy is adding one file.
    """
    skipped = set(skip)
    found = sorted(m.name for m in pkgutil.iter_modules(list(path)) if m.name not in skipped)
    return [importlib.import_module(f"{package}.{name}") for name in found]


def _load() -> None:
    from . import architectures  # noqa: F401  (registers every architecture)


def names() -> list[str]:
    """Sorted registered architecture names."""
    _load()
    return sorted(_ARCHITECTURES)


def get(name: str) -> type:
    """The class registered under ``name``; an unknown name raises listing the known ones."""
    _load()
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; registered names: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def create(name: str, **kwargs: Any) -> Any:
    """Build the architecture registered under ``name`` with keyword arguments."""
    return get(name)(**kwargs)
