"""``mtl-lightning``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

One YAML file (or command-line flags) configures the three parts::

    mtl-lightning fit --config configs/mmoe.yaml --trainer.max_epochs=3
    mtl-lightning fit --config configs/mmoe.yaml --trainer.strategy=ddp --trainer.devices=2
    mtl-lightning test --config configs/mmoe.yaml --ckpt_path=path/to/last.ckpt

* ``model``: :class:`~mtl_lightning.module.MultiTaskLightningModule`; its
  ``model`` argument is the architecture, chosen by ``class_path`` — a full
  path (``mtl_lightning.architectures.MMoE``), a class name (``MMoE``) or a
  registry name (``mmoe``, see ``mtl_lightning.registry.names()``) — with its
  hyper-parameters under ``init_args``.
* ``data``: :class:`~datamodules.parquet.ParquetDataModule`.
* ``trainer``: any ``lightning.Trainer`` argument.
* ``prediction_writer``: where ``predict`` writes its Parquet files, one per
  rank (:class:`~mtl_lightning.callbacks.ParquetPredictionWriter`;
  ``output_dir`` defaults to ``predictions``).

Two links spare the YAML from repeating itself: ``data.tasks`` becomes the
architecture's ``tasks`` (when parsing), and the data module's feature specs
(given, or inferred from the Parquet schema and a statistics pass) become the
architecture's ``features`` once the data module is built — so vocabulary
sizes are never written in a config.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import yaml
from jsonargparse import Namespace, set_loader
from lightning.pytorch.cli import LightningCLI

from datamodules.parquet import ParquetDataModule

from . import registry
from .module import MultiTaskLightningModule
from .callbacks import ParquetPredictionWriter

PARSER_MODE = "mtl_yaml"
_ARCHITECTURE_KEYS = ("--model.model", "--model.model.class_path", "--model.model.help")


def _registry_path(name: Any) -> Any:
    """The import path of a registered architecture name; anything else unchanged."""
    if isinstance(name, str) and "." not in name and name in registry.names():
        cls = registry.get(name)
        return f"{cls.__module__}.{cls.__qualname__}"
    return name


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


def _load_yaml(text: str) -> Any:
    return _resolve_registry_names(yaml.safe_load(text))


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


def resolve_registry_args(args: Sequence[str]) -> list[str]:
    """``--model.model=mmoe`` (or ``--model.model mmoe``, ``--model.model.class_path=mmoe``) -> the class path."""
    out = list(args)
    for i, arg in enumerate(out):
        key, sep, value = arg.partition("=")
        if key in _ARCHITECTURE_KEYS:
            if sep:
                out[i] = f"{key}={_registry_path(value)}"
            elif i + 1 < len(out):
                out[i + 1] = _registry_path(out[i + 1])
    return out


def _features_of(data: ParquetDataModule) -> list:
    """The data module's feature specs: the given ones, or inferred from its Parquet files."""
    return data.prepare_features()


class MultiTaskCLI(LightningCLI):
    """LightningCLI with the data -> architecture links (tasks at parse time, features at instantiation)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(ParquetPredictionWriter, "prediction_writer")
        parser.set_defaults({"prediction_writer.output_dir": "predictions"})
        parser.link_arguments("data.tasks", "model.model.init_args.tasks", apply_on="parse")
        parser.link_arguments("data", "model.model.init_args.features", compute_fn=_features_of,
                              apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(resolve_registry_args(sys.argv[1:] if args is None else args))


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> MultiTaskCLI:
    """The CLI object (``run=False`` parses and instantiates without running a subcommand)."""
    return MultiTaskCLI(
        MultiTaskLightningModule,
        ParquetDataModule,
        args=list(args) if args is not None else None,
        run=run,
        parser_kwargs={"parser_mode": PARSER_MODE},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point; ``args`` defaults to ``sys.argv[1:]``."""
    build_cli(args)


if __name__ == "__main__":
    main()
