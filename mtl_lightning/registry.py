"""Name -> class registries: one :class:`Registry` class for architectures, weighting strategies and interactions.

A registry holds subclasses of one base class under snake_case names. Each
has the same decorator (``@REGISTRY.register("name")``), listing
(``names()``), lookup (``get(name)``, an unknown name raising ``ValueError``
that lists the registered names and the closest one), construction
(``create(name, **kwargs)``) and ``class_path`` check (``resolve`` / ``build``:
a class path read from a config or a checkpoint resolves only to a subclass of
the registry's base, through :func:`mtl_lightning.config.resolve_class`).

The registries, each next to its base class:

* ``ARCHITECTURES`` (here; base ``mtl_lightning.architectures.MultiTaskArchitecture``);
* ``mtl_lightning.weighting.STRATEGIES`` (base ``WeightingStrategy``, decorator ``register_weighting``);
* ``mtl_lightning.interactions.INTERACTIONS`` (base ``Interaction``).

A registry is created with its kind only and bound to its base by decorating
the base class (``@ARCHITECTURES.base_class``), so this module never imports
the packages whose classes it holds: each package imports the registry. The
module-level ``register``, ``names``, ``get`` and ``create`` are the
architecture registry's (``registry.create("mmoe", features=..., tasks=...)``).

A new architecture is one file in ``mtl_lightning/architectures`` plus one
``@register("name")`` line: importing the package imports every module file in
it (:func:`import_submodules`), so no import list is kept by hand (the same
holds for ``mtl_lightning/weighting`` and ``mtl_lightning/interactions``).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from types import ModuleType
from typing import Any, Callable, Generic, ItemsView, Iterable, Iterator, KeysView, Mapping, TypeVar, ValuesView

from .config import build as build_from_config
from .config import resolve_class

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(Generic[T]):
    """Registered subclasses of one base class, by name; reads like a read-only ``dict`` of ``{name: class}``.

    ``kind`` names the entries in messages (``"architecture"``, ``"weighting"``).
    Decorate the base class with :meth:`base_class` before registering
    anything. Registering sets ``cls.registry_name``, which also lets a
    config's dot-free ``class_path`` name the class.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._base: type[T] | None = None
        self._classes: dict[str, type[T]] = {}

    # ------------------------------------------------------------------ declaring
    def base_class(self, cls: C) -> C:
        """Class decorator making ``cls`` the base every entry must subclass (once per registry)."""
        if not isinstance(cls, type):
            raise TypeError(f"the {self.kind} registry's base_class decorates a class, got {cls!r}")
        if self._base is not None and self._base is not cls:
            raise TypeError(f"the {self.kind} registry already has the base class {self._base.__qualname__}")
        self._base = cls
        return cls

    @property
    def base(self) -> type[T]:
        """The class every entry subclasses."""
        if self._base is None:
            raise TypeError(f"the {self.kind} registry has no base class yet: decorate it with "
                            f"@<registry>.base_class (importing its package does)")
        return self._base

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator registering a subclass of the base under ``name``.

        Raises ``TypeError`` for anything but a subclass of the base and
        ``ValueError`` for a name that another class holds, or a class that is
        already registered under another name. Registering the same class
        under the same name again does nothing.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"a {self.kind} name is a non-empty string without dots, got {name!r}")

        def decorator(cls: C) -> C:
            base = self.base
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"@register({name!r}) of the {self.kind} registry decorates {base.__name__} "
                                f"subclasses, got {cls!r}")
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered by "
                                 f"{self._classes[name].__name__}")
            earlier = cls.__dict__.get("registry_name")
            if isinstance(earlier, str) and earlier != name and self._classes.get(earlier) is cls:
                raise ValueError(f"{cls.__name__} is already registered as {self.kind} {earlier!r}")
            self._classes[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (and its class's ``registry_name``); for throwaway entries in tests and notebooks."""
        cls = self.get(name)
        del self._classes[name]
        if cls.__dict__.get("registry_name") == name:
            del cls.registry_name  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ looking up
    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``.

        An unknown name raises ``ValueError`` naming the closest registered
        name (when one is close) and listing them all.
        """
        if name not in self._classes:
            raise ValueError(self.unknown_name_message(name))
        return self._classes[name]

    def unknown_name_message(self, name: Any) -> str:
        """``unknown <kind> 'x' (did you mean 'y'?); registered names: ...``."""
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1) if isinstance(name, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; registered names: {', '.join(known) or '(none)'}"

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the class registered under ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)

    def resolve(self, class_path: Any, key: str) -> type[T]:
        """The class a config's ``class_path`` names, checked to subclass the base before anything is called.

        A registered name, a registered class's name (``MMoE``) or the import
        path of a subclass of the base; anything else raises naming ``key``
        (see :func:`mtl_lightning.config.resolve_class`).
        """
        return resolve_class(class_path, self.base, key, registered=self._classes)

    def build(self, config: Mapping[str, Any], key: str) -> T:
        """Instantiate ``{"class_path": ..., "init_args": {...}}`` after :meth:`resolve` checked the class."""
        return build_from_config(config, self.base, key, registered=self._classes)

    # ------------------------------------------------------------------ read-only mapping
    def __getitem__(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(self.unknown_name_message(name)) from None

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def keys(self) -> KeysView[str]:
        return self._classes.keys()

    def values(self) -> ValuesView[type[T]]:
        return self._classes.values()

    def items(self) -> ItemsView[str, type[T]]:
        return self._classes.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[ModuleType]:
    """Import every module file of ``package`` (its ``__path__``), except the names in ``skip``, in name order.

    A package's ``__init__`` calls it so that each module's decorators
    (``@register``, ``@register_weighting``, ``@register_interaction``) run on
    import: adding an architecture, a strategy or an interaction is adding one file.
    """
    skipped = set(skip)
    found = sorted(m.name for m in pkgutil.iter_modules(list(path)) if m.name not in skipped)
    return [importlib.import_module(f"{package}.{name}") for name in found]


#: Every architecture by name; its base class, ``MultiTaskArchitecture``, is bound by ``architectures/base.py``.
ARCHITECTURES: Registry[Any] = Registry("architecture")


def register(name: str) -> Callable[[C], C]:
    """Class decorator registering an architecture (a ``MultiTaskArchitecture`` subclass) under ``name``."""
    return ARCHITECTURES.register(name)


def names() -> list[str]:
    """Sorted registered architecture names."""
    return ARCHITECTURES.names()


def get(name: str) -> type:
    """The architecture class registered under ``name``; an unknown name raises listing the known ones."""
    return ARCHITECTURES.get(name)


def create(name: str, **kwargs: Any) -> Any:
    """Build the architecture registered under ``name`` with keyword arguments."""
    return ARCHITECTURES.create(name, **kwargs)


__all__ = ["Registry", "ARCHITECTURES", "import_submodules", "register", "names", "get", "create"]
