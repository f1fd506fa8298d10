"""The CLI's checks of its arguments before jsonargparse reads them: registry names, class paths and checkpoint
paths in configs and flags (see :mod:`mtl_lightning.cli`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from jsonargparse import set_loader, set_parsing_settings

from . import registry
from .architectures.base import MultiTaskArchitecture
from .checkpoint import check_checkpoint_file
from .config import resolve_class
from .tasks import Task
from .weighting import STRATEGIES, WeightingStrategy

#: the YAML loader of the CLI's parser: registry names resolved, class paths checked (set_loader below)
PARSER_MODE = "mtl_yaml"
_ARCHITECTURE_KEYS = ("--model.model", "--model.model.class_path", "--model.model.help")


def _check_registered(name: Any, key: str) -> None:
    """A dot-free ``model.model`` / ``model.weighting`` name must be registered (or a registered class's name).

    The error is the registry's own: the closest registered name, then all of them.
    """
    if not isinstance(name, str) or not name or "." in name:
        return
    names = STRATEGIES if key.endswith("weighting") else registry.ARCHITECTURES
    if name not in names and name not in {cls.__name__ for cls in names.values()}:
        raise ValueError(f"{key}: {names.unknown_name_message(name)}")


def _registry_path(name: Any) -> Any:
    """The import path of a registered architecture name; anything else unchanged."""
    if isinstance(name, str) and "." not in name and name in registry.names():
        cls = registry.get(name)
        return f"{cls.__module__}.{cls.__qualname__}"
    return name


def registry_name(class_path: Any, registered: Any) -> str | None:
    """The registered name of the class ``class_path`` names (an import path, a class name or a name)."""
    if not isinstance(class_path, str):
        return None
    for name, cls in registered.items():
        if class_path in (name, cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return name
    return class_path.rpartition(".")[2].lower() or None


def _resolve_registry_names(value: Any) -> Any:
    """Replace every ``class_path: <registry name>`` in a loaded YAML tree by the class's import path."""
    if isinstance(value, dict):
        resolved = {k: _resolve_registry_names(v) for k, v in value.items()}
        if "class_path" in resolved:
            resolved["class_path"] = _registry_path(resolved["class_path"])
        return resolved
    if isinstance(value, list):
        return [_resolve_registry_names(v) for v in value]
    return value


_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def check_class_paths(config: Any, where: str = "", import_modules: bool = False) -> None:
    """Refuse a ``model.model`` / ``model.weighting`` class path that is not a registered name or a subclass of its base.

    ``config`` is a config tree (a loaded YAML file, possibly under a
    subcommand key) or, with ``where="model."``, a module's ``hyper_parameters``.
    Raises ``ValueError``/``TypeError`` naming the key and the class path
    (see :func:`mtl_lightning.config.resolve_class`); nothing is called.
    ``import_modules=True`` (the user's own config files and flags) imports the
    module of a dotted path first; a checkpoint's are only looked up among the
    modules already imported.
    """
    if not isinstance(config, dict):
        return
    if not where:
        for subcommand in _SUBCOMMANDS:
            check_class_paths(config.get(subcommand), f"{subcommand}.", import_modules)
        check_class_paths(config.get("model"), "model.", import_modules)
        return
    if where in {f"{s}." for s in _SUBCOMMANDS}:
        check_class_paths(config.get("model"), f"{where}model.", import_modules)
        return
    model = config.get("model")
    model_path = model.get("class_path") if isinstance(model, dict) else model
    _check_registered(model_path, f"{where}model")
    if isinstance(model_path, str) and "." in model_path:
        resolve_class(model_path, MultiTaskArchitecture, f"{where}model", import_modules=import_modules)
    weighting = config.get("weighting")
    _check_registered(weighting.get("class_path") if isinstance(weighting, dict) else weighting, f"{where}weighting")
    if isinstance(weighting, dict) and "class_path" in weighting:
        resolve_class(weighting["class_path"], WeightingStrategy, f"{where}weighting", registered=STRATEGIES,
                      import_modules=import_modules)


_TASK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Task) if f.default is not dataclasses.MISSING}


def _complete_tasks(config: Any) -> Any:
    """Every ``data.tasks`` item with all of ``Task``'s fields.

    jsonargparse merges a list of dataclasses given by a later ``--config`` item by item into the earlier list, so
    ``{name: purchase}`` over ``configs/base.yaml``'s ``{name: dwell, kind: regression, weight: 0.5}`` would keep
    the regression kind; with every field written out, a later file's tasks replace the earlier ones.
    """
    if not isinstance(config, dict):
        return config
    for section in [config, *(config.get(s) for s in _SUBCOMMANDS)]:
        data = section.get("data") if isinstance(section, dict) else None
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if isinstance(tasks, list):
            data["tasks"] = [{**_TASK_DEFAULTS, **t} if isinstance(t, dict) and "class_path" not in t else t
                             for t in tasks]
    return config


def _load_yaml(text: str) -> Any:
    config = _complete_tasks(_resolve_registry_names(yaml.safe_load(text)))
    check_class_paths(config, import_modules=True)
    return config


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))
# a class_path dict given where any value is accepted (optimizer_kwargs, a weighting dict's extra keys ...) stays a
# dict: jsonargparse 4.x would otherwise import and call whatever it names (this is its announced future default)
set_parsing_settings(instantiate_subclass_spec_in_any=False)


def check_checkpoint(path: str | Path) -> None:
    """A ``--ckpt_path`` checkpoint must be complete, load with ``weights_only=True`` and name only allowed classes.

    LightningCLI reads its ``hyper_parameters`` into the config, so their
    ``model`` and ``weighting`` class paths are checked as a YAML file's are.
    Raises ``ValueError``/``TypeError`` naming the file.
    """
    from .distributed.checkpoint import is_sharded_checkpoint, read_meta

    if is_sharded_checkpoint(path):  # a TorchRecStrategy folder: its meta.pt holds the hyper-parameters
        checkpoint = read_meta(path)
    else:
        path = check_checkpoint_file(path)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors are not read
        except Exception as error:
            raise ValueError(f"checkpoint {path} cannot be read with weights_only=True: "
                             f"{str(error).splitlines()[0]}") from None
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    try:
        check_class_paths(hyper_parameters, "model.")
    except (TypeError, ValueError) as error:
        raise type(error)(f"checkpoint {path}: hyper_parameters {error}") from None


def resolve_registry_args(args: Sequence[str]) -> list[str]:
    """``--model.model=mmoe`` (or ``--model.model mmoe``, ``--model.model.class_path=mmoe``) -> the class path.

    A ``model.model`` / ``model.weighting`` class path that is neither a
    registered name nor a subclass of its base raises (see :func:`check_class_paths`).
    """
    out = list(args)
    for i, arg in enumerate(out):
        key, sep, value = arg.partition("=")
        if key in _ARCHITECTURE_KEYS:
            if sep:
                out[i] = f"{key}={_registry_path(value)}"
            elif i + 1 < len(out):
                out[i + 1] = _registry_path(out[i + 1])
        if key in _CHECKED_KEYS:
            _check_argument(key, out[i].partition("=")[2] if sep else (out[i + 1] if i + 1 < len(out) else ""))
    return out


_CHECKED_KEYS = ("--model", "--model.model", "--model.model.class_path", "--model.weighting",
                 "--model.weighting.class_path")


def _check_argument(key: str, value: str) -> None:
    """A class path given on the command line (``--model.model=pkg.Cls``, ``--model.weighting='{class_path: ...}'``,
    ``--model=module.yaml``: the module's arguments, a file or a YAML string)."""
    name = key.lstrip("-").removesuffix(".class_path")
    if key == "--model":  # the module's own arguments, whose model / weighting are checked as a config's
        try:
            text = Path(value).read_text() if value and Path(value).is_file() else value
            loaded = yaml.safe_load(text) if text.lstrip().startswith("{") or Path(value).is_file() else None
        except (OSError, yaml.YAMLError):
            return  # jsonargparse reports it
        where = f"--model {value}" if Path(value).is_file() else "--model"
        try:
            check_class_paths(_resolve_registry_names(loaded), "model.", import_modules=True)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None
        return
    try:
        loaded = yaml.safe_load(value) if value.lstrip().startswith("{") else value
    except yaml.YAMLError:
        return  # jsonargparse reports it
    if isinstance(loaded, dict):
        check_class_paths({name.split(".")[1]: loaded}, "model.", import_modules=True)
    elif isinstance(loaded, str):
        check_class_paths({name.split(".")[1]: {"class_path": loaded}}, "model.", import_modules=True)
