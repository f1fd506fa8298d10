"""Init-argument capture, so a module can be rebuilt from a checkpoint without pickling code.

A class that inherits :class:`Configurable` records the arguments of its
outermost ``__init__`` call. :meth:`Configurable.config` returns them as plain
data (feature and task specs become dicts), and :func:`build` rebuilds the
object. ``MultiTaskLightningModule`` stores the architecture's config in every
checkpoint, which is what lets ``load_from_checkpoint(path)`` work without the
caller constructing the model again.

Checkpoints and configs are data, so :func:`build` never calls an arbitrary
callable: its ``class_path`` must be a registered name, or the import path of a
class (a ``type``, not a function) that subclasses the base the caller expects
(``MultiTaskArchitecture`` for ``model``, ``WeightingStrategy`` for
``weighting`` ...). That is checked before anything is called; anything else
raises naming the key and the class path.

Nothing is imported to resolve a class path: a registered name (or the class
name of a registered class, such as ``MMoE``) is looked up in the registries,
and a dotted path ``package.module.Class`` only in modules already imported
(``sys.modules``). Importing a module runs its code (``venv.__main__`` exits
the process, a ``helpers.py`` beside a checkpoint runs whatever it holds), so
a path whose module is not imported is refused, without running it, with a
``ValueError`` saying to import the module first. Your own architecture or
strategy therefore loads from a checkpoint once your code has imported its
module (``import my_models`` before ``load_from_checkpoint``). Only the CLI's
own config files and flags, which are code the user runs as much as a script
is, pass ``import_modules=True`` (jsonargparse would import them anyway).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from types import ModuleType
from typing import Any, Mapping, TypeVar

from .features import DenseFeature, SequenceFeature, SparseFeature, feature_to_config
from .tasks import Task

_PLAIN = (str, int, float, bool, type(None))
T = TypeVar("T")


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


def _subclasses(base: type) -> list[type]:
    """Every already imported subclass of ``base`` (recursively), ``base`` first."""
    found, todo = [], [base]
    while todo:
        cls = todo.pop(0)
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def _registered_names(base: type, registered: Mapping[str, type] | None) -> dict[str, type]:
    """Dot-free names a ``class_path`` may take: ``registered`` and ``@register`` names, and their classes' names.

    Only already imported classes count (importing ``mtl_lightning.architectures``
    imports, and so registers, every built-in architecture).
    """
    classes = {cls.__dict__["registry_name"]: cls for cls in _subclasses(base)
               if isinstance(cls.__dict__.get("registry_name"), str)}
    classes.update(registered or {})
    names = {cls.__name__: cls for cls in classes.values()}  # MMoE as well as mmoe
    names.update(classes)
    return names


def _imported_object(class_path: str, key: str, imported_now: bool = False) -> Any:
    """What the dotted ``class_path`` names inside an already imported module; nothing is imported."""
    parts = class_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is an imported module
        module = sys.modules.get(".".join(parts[:cut]))
        if isinstance(module, ModuleType):
            break
    else:
        module_name = class_path.rpartition(".")[0]
        raise ValueError(
            f"{key}: class_path {class_path!r}: module {module_name!r} is not imported, and a class path read from a "
            f"checkpoint is never imported (importing runs the module's code); if you trust it, import "
            f"{module_name} in your own code first, then load the checkpoint"
        )
    found: Any = module
    for depth, attribute in enumerate(parts[cut:]):
        # no module __getattr__ and no import of a submodule: only what the module defines or imports
        found = vars(found).get(attribute) if isinstance(found, (ModuleType, type)) else None
        if found is None:
            owner = ".".join(parts[:cut + depth])
            why = "" if imported_now else (" (nor is it a submodule already imported: a class path read from a "
                                           "checkpoint never imports one, as that would run its code)")
            raise ValueError(f"{key}: class_path {class_path!r}: {owner!r} has no {attribute!r}{why}")
    return found


def resolve_class(class_path: Any, base: type[T], key: str, registered: Mapping[str, type] | None = None,
                  import_modules: bool = False) -> type[T]:
    """The class ``class_path`` names, which must be a subclass of ``base``; nothing is called or imported.

    ``class_path`` is a registered name (``registered``, or the ``@register``
    name of an imported subclass of ``base``), the class name of a registered
    class (``MMoE`` as well as ``mmoe``), or a dotted path ``package.module.Class``
    into a module that is already imported (see the module docstring).
    ``import_modules=True`` imports the module of a dotted path first, as
    jsonargparse does: only for the CLI's own config files and flags. Raises
    ``ValueError`` for a name or path that resolves to nothing (or to a module
    not imported) and ``TypeError`` for one that resolves to something other than
    a subclass of ``base`` (a function such as ``subprocess.run``, another class),
    naming ``key`` and ``class_path``.
    """
    expected = f"a subclass of {base.__module__}.{base.__qualname__}"
    if not isinstance(class_path, str) or not class_path:
        raise TypeError(f"{key}: class_path must be a non-empty string naming {expected}, got {class_path!r}")
    if "." not in class_path:
        names = _registered_names(base, registered)
        if class_path not in names:
            raise ValueError(
                f"{key}: class_path {class_path!r} is not a registered name; use one of {sorted(names)} "
                f"or the import path of {expected}"
            )
        found: Any = names[class_path]
    else:
        if any(not part.isidentifier() for part in class_path.split(".")):
            raise ValueError(f"{key}: class_path {class_path!r} is not a dotted import path package.module.Class")
        if import_modules:
            module_name = class_path.rpartition(".")[0]
            try:
                importlib.import_module(module_name)
            except ImportError as error:
                raise ValueError(f"{key}: class_path {class_path!r}: cannot import module {module_name!r} "
                                 f"({error})") from None
        found = _imported_object(class_path, key, imported_now=import_modules)
    if not isinstance(found, type) or not issubclass(found, base):
        what = "a class that is not" if isinstance(found, type) else f"a {type(found).__name__}, not"
        raise TypeError(
            f"{key}: class_path {class_path!r} is {what} {expected}; checkpoints and configs may only name "
            "such a subclass or a registered name"
        )
    return found


def build(config: Mapping[str, Any], base: type[T], key: str, registered: Mapping[str, type] | None = None) -> T:
    """Instantiate ``config["class_path"]`` with ``config["init_args"]``, if it names a subclass of ``base``.

    ``key`` names the setting in error messages (``"model"``, ``"weighting"``);
    ``registered`` adds dot-free names (such as the weighting strategies'
    ``"gradnorm"``). See :func:`resolve_class`: the class is checked before it
    is called.
    """
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise TypeError(f"{key}: expected a dict with 'class_path' (and 'init_args'), got {config!r}")
    unknown = sorted(set(config) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"{key}: unknown entries {unknown} next to 'class_path'; only 'class_path' and 'init_args'")
    cls = resolve_class(config["class_path"], base, key, registered)
    init_args = config.get("init_args") or {}
    if not isinstance(init_args, Mapping) or not all(isinstance(k, str) for k in init_args):
        raise TypeError(f"{key}: init_args of {config['class_path']!r} must be a dict of argument names, got {init_args!r}")
    return cls(**init_args)


DEFAULT_DATAMODULE = "datamodules.parquet.ParquetDataModule"
PREDICTION_WRITER = "datamodules.predictions.ParquetPredictionWriter"


def default_class(class_path: str, base: type[T], key: str) -> type[T]:
    """A class this package uses by default but does not import (``DEFAULT_DATAMODULE``, ``PREDICTION_WRITER``).

    ``mtl_lightning`` never imports ``datamodules`` (which imports
    ``mtl_lightning``): the CLI and the exports name its classes by class path.
    The path is a constant of this package, not data, so its module is imported
    first; the class is then checked like any other (:func:`resolve_class`).
    """
    importlib.import_module(class_path.rpartition(".")[0])
    return resolve_class(class_path, base, key)
