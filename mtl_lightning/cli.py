"""``mtl-lightning``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``).

YAML files (or command-line flags) configure the three parts. A run stacks three files, a later
``--config`` overriding an earlier one: ``configs/base.yaml`` (the seed, the trainer, the logger; no
data set), a data file (``configs/data/synthetic.yaml`` for ``make demo``'s data, your own from
``configs/data/template.yaml``) and an architecture file (``configs/mmoe.yaml``)::

    mtl-lightning fit --config configs/base.yaml --config configs/data/synthetic.yaml --config configs/mmoe.yaml
    mtl-lightning test --config configs/base.yaml --config configs/data/synthetic.yaml --config configs/mmoe.yaml \
        --ckpt_path=lightning_logs/mmoe/version_0/checkpoints/last.ckpt

* ``model``: :class:`~mtl_lightning.module.MultiTaskLightningModule`; its
  ``model`` argument is the architecture, chosen by ``class_path`` — a full
  path (``mtl_lightning.architectures.MMoE``), a class name (``MMoE``) or a
  registry name (``mmoe``, see ``mtl_lightning.registry.names()``) — with its
  hyper-parameters under ``init_args``. An unknown name is refused with the
  registered names and the closest one.
* ``data``: :class:`~datamodules.parquet.ParquetDataModule` (by default; ``build_cli(datamodule_class=...)``
  takes another data module class). The CLI names it by class path
  (``mtl_lightning.config.DEFAULT_DATAMODULE``), as it names the prediction
  writer: ``mtl_lightning`` never imports ``datamodules``.
* ``trainer``: any ``lightning.Trainer`` argument.
* ``trainer.strategy.class_path: mtl_lightning.distributed.TorchRecStrategy``
  shards the embedding tables; the model is then built with deferred tables
  (``mtl_lightning.layers.deferred_tables``), so no process allocates a whole
  table.
* ``prediction_writer``: where ``predict`` writes its Parquet files, one per
  rank (:class:`~datamodules.predictions.ParquetPredictionWriter`); by default
  the ``predictions/`` folder of the run (below).

Two links spare the YAML from repeating itself: ``data.tasks`` becomes the
architecture's ``tasks`` (when parsing), and the data module's feature specs
(given, or inferred from the Parquet schema and a statistics pass) become the
architecture's ``features`` once the data module is built — so vocabulary
sizes are never written in a config. A third makes ``data.ignore_label`` (the
label value that means "no label", checked by the reader) the module's
``ignore_label``, so the two always agree: set it under ``data``.

Runs. The logger's ``name`` left ``null`` (as in ``configs/base.yaml``) becomes
the architecture trained, with its weighting strategy unless ``static``
(``lightning_logs/mmoe/version_N``, ``lightning_logs/mmoe_gradnorm/...``), so
``--model.model=ple`` on top of ``configs/mmoe.yaml`` logs under ``ple``. A
command that fails before its first training step removes the ``version_N``
folder it created. ``fit`` ends by printing the run's folder, the best
checkpoint's path and a table of the final validation metrics per task
(:class:`~mtl_lightning.callbacks.RunSummary`).

``validate``, ``test`` and ``predict`` need a trained model: without
``--ckpt_path`` they stop with an error saying how to pass one, unless
``--untrained=true`` asks for the model as initialised. Given a checkpoint of a
run (``<run>/checkpoints/<file>.ckpt``) they write into that run's folder
instead of a new ``version_N``: the logger's events (a ``TensorBoardLogger`` or
``CSVLogger`` whose ``version`` is not set), their config as
``config_<subcommand>.yaml`` (the fit's ``config.yaml`` is kept), and
predictions in ``<run>/predictions/``. Predictions always go into a run folder:
another checkpoint's (or an untrained model's) go into the new run's
``predictions/``, unless ``--prediction_writer.output_dir`` names a folder;
each prints where it wrote.

Errors. :func:`main` prints a user's mistake -- a data error, an unknown name,
a missing file, a bad value -- as one message without a traceback
(``mtl-lightning: error: ...``, see :mod:`mtl_lightning.cli_messages`), naming
the config key and the file (or flag) that caused it, with hints in YAML and
flag syntax; ``MTL_LIGHTNING_TRACEBACK=1`` (or ``--traceback``) shows the
traceback instead. Lightning's tips, the TPU line, the model summary of the
metric containers and ``hp_metric`` are left out.

Configs and checkpoints are data. A ``class_path`` for ``model.model`` or
``model.weighting`` (in a YAML file, on the command line, or in the
``hyper_parameters`` of a ``--ckpt_path`` checkpoint) must be a registered name
or name a subclass of ``MultiTaskArchitecture`` / ``WeightingStrategy``; it is
checked before jsonargparse or the module sees it (:func:`check_class_paths`),
and anything else stops the command with an error naming the key and the path.
jsonargparse is set not to instantiate ``class_path`` dicts found in values of
type ``Any`` (``optimizer_kwargs`` ...): they stay dicts. The ``--ckpt_path``
file must be a complete checkpoint, loaded with ``weights_only=True`` (the
Trainer gets :class:`~mtl_lightning.checkpoint.SafeCheckpointIO` unless the
config names another ``CheckpointIO``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Sequence

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from . import registry
from .callbacks import RunSummary, run_log_dir
from .cli_arguments import (PARSER_MODE, _ARCHITECTURE_KEYS, _CHECKED_KEYS, _SUBCOMMANDS, _TASK_DEFAULTS,  # noqa: F401
                            _check_argument, _check_registered, _complete_tasks, _load_yaml, _registry_path,
                            _resolve_registry_names, check_checkpoint, check_class_paths, registry_name,
                            resolve_registry_args)
from .cli_messages import ConfigSources, user_message
from .checkpoint import SafeCheckpointIO
from .config import DEFAULT_DATAMODULE, PREDICTION_WRITER, default_class, resolve_class
from .layers.embedding import deferred_tables
from .module import MultiTaskLightningModule
from .weighting import STRATEGIES

def _features_of(data: LightningDataModule) -> list:
    """The data module's feature specs (its ``prepare_features()``): the given ones, or inferred from its files."""
    return data.prepare_features()


def prediction_writer_class() -> type[BasePredictionWriter]:
    """``ParquetPredictionWriter``, named by class path (``mtl_lightning.config.PREDICTION_WRITER``)."""
    return default_class(PREDICTION_WRITER, BasePredictionWriter, "prediction_writer")


def run_folder(ckpt_path: Any) -> Path | None:
    """The run a local checkpoint comes from: ``<run>`` for ``<run>/checkpoints/<file>.ckpt``, else ``None``."""
    if not ckpt_path or "://" in str(ckpt_path) or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    if len(path.parts) < 5:  # too short to name save_dir / name / version / checkpoints / file as given
        path = path.resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


_RUN_LOGGERS = ("TensorBoardLogger", "CSVLogger")


_EVALUATING = ("validate", "test", "predict")
DEFAULT_PREDICTIONS = "predictions"


def _untrained_refusal(subcommand: str) -> str:
    return (f"{subcommand} needs a trained model: pass its checkpoint with --ckpt_path=PATH (fit prints it: "
            f"lightning_logs/<name>/version_<n>/checkpoints/<file>.ckpt; ckpt_path: PATH in a config file), "
            f"or --untrained=true to {subcommand} with the model as initialised")


class MultiTaskCLI(LightningCLI):
    """LightningCLI with the data -> architecture links (tasks at parse time, features at instantiation).

    ``exit_on_error=False`` makes an argument error raise ``ArgumentError`` instead of printing the whole
    usage and exiting (:func:`main` prints one line for it).
    """

    def __init__(self, *args: Any, exit_on_error: bool = True, **kwargs: Any) -> None:
        self.exit_on_error = exit_on_error
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> Any:
        kwargs.setdefault("exit_on_error", self.exit_on_error)
        return super().init_parser(**kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in _EVALUATING:
            parser.add_argument("--untrained", type=bool, default=False,
                                help=f"{subcommand} with the model as initialised, without --ckpt_path")
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, []):
            parser.set_defaults(weights_only=True)  # SafeCheckpointIO loads with weights_only=True anyway
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(prediction_writer_class(), "prediction_writer")
        parser.set_defaults({"prediction_writer.output_dir": DEFAULT_PREDICTIONS})
        parser.link_arguments("data.tasks", "model.model.init_args.tasks", apply_on="parse")
        parser.link_arguments("data.ignore_label", "model.ignore_label", apply_on="parse")
        parser.link_arguments("data", "model.model.init_args.features", compute_fn=_features_of,
                              apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            try:
                args = resolve_registry_args(sys.argv[1:] if args is None else args)
            except (TypeError, ValueError) as error:
                parser.error(str(error))  # exits, as for any other invalid argument
            self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand in _EVALUATING and not ckpt_path and not self.config[subcommand].get("untrained"):
            parser.error(_untrained_refusal(subcommand))
        if ckpt_path and "://" not in str(ckpt_path) and ckpt_path not in ("last", "best", "hpc", "registry"):
            try:
                check_checkpoint(ckpt_path)  # before LightningCLI reads its hyper_parameters into the config
            except (TypeError, ValueError) as error:
                parser.error(str(error))

    def instantiate_classes(self) -> None:
        """Under ``TorchRecStrategy`` the model's tables are deferred: each process allocates only its shards."""
        with deferred_tables() if self._sharded_tables() else contextlib.nullcontext():
            super().instantiate_classes()

    def _sharded_tables(self) -> bool:
        """Whether ``trainer.strategy`` names ``TorchRecStrategy`` (or a subclass of it)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = (config.get("trainer") or Namespace()).get("strategy")
        if strategy == "torchrec":  # the registered name
            return True
        path = strategy.get("class_path") if isinstance(strategy, Namespace) else None
        if not isinstance(path, str):
            return False
        if "." not in path:
            return path == "TorchRecStrategy"
        module_name, _, name = path.rpartition(".")
        try:  # jsonargparse imports it right after, to build the strategy
            found = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            return False
        from .distributed.strategy import TorchRecStrategy

        return isinstance(found, type) and issubclass(found, TorchRecStrategy)

    def before_instantiate_classes(self) -> None:
        """The run's name; ``validate``/``test``/``predict`` from a run's checkpoint write into that run (see the
        module docstring)."""
        subcommand = self.subcommand
        self.run_folder = None
        self._name_run()
        if subcommand in (None, "fit"):
            return
        config = self.config[subcommand]
        run = run_folder(config.get("ckpt_path"))
        self.run_folder = run
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config_{subcommand}.yaml"}
        if run is None:
            return
        logger = config.get("trainer", {}).get("logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).rsplit(".", 1)[-1] in _RUN_LOGGERS:
            init = logger.get("init_args") or Namespace()
            if init.get("version") is None:  # log into <run> itself: save_dir / name / version
                init["save_dir"], init["name"], init["version"] = str(run.parent.parent), run.parent.name, run.name
                logger["init_args"] = init
        if subcommand == "predict" and str(config.get("prediction_writer", {}).get("output_dir")) == DEFAULT_PREDICTIONS:
            config["prediction_writer"]["output_dir"] = str(run / DEFAULT_PREDICTIONS)

    def _name_run(self) -> None:
        """A logger ``name`` left ``null``: the architecture's registered name (``_<weighting>`` unless static)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = (config.get("trainer") or Namespace()).get("logger")
        if not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
            return
        if logger["init_args"].get("name", "") is not None:
            return
        model = config.get("model") or Namespace()
        architecture = model.get("model")
        path = architecture.get("class_path") if isinstance(architecture, Namespace) else architecture
        name = registry_name(path, registry.ARCHITECTURES) or "model"
        weighting = model.get("weighting")
        if isinstance(weighting, (Namespace, dict)):
            weighting = weighting.get("class_path") or weighting.get("name")
        strategy = registry_name(weighting, STRATEGIES) if weighting is not None else "static"
        logger["init_args"]["name"] = name if strategy in (None, "static") else f"{name}_{strategy}"

    # --------------------------------------------------------------- running a subcommand
    def _run_subcommand(self, subcommand: str) -> None:
        """Runs it; a failure before the first training step removes the run folder this command created."""
        log_dir = run_log_dir(self.trainer) if self.trainer.is_global_zero else None
        created = log_dir is not None and "://" not in str(log_dir) and not Path(log_dir).exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created and self.trainer.global_step == 0 and Path(log_dir).is_dir():
                shutil.rmtree(log_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    Path(log_dir).parent.rmdir()  # the run name's folder, if this run was its only one
            raise

    def before_predict(self) -> None:
        """Predictions go into a run folder: the checkpoint's run, else the run this command logs to."""
        for writer in self._writers():
            if self.run_folder is None and str(writer.output_dir) == DEFAULT_PREDICTIONS:
                log_dir = run_log_dir(self.trainer)
                if log_dir is None:
                    raise ValueError("predict writes its predictions into the run folder of the logger, and this "
                                     "command has none (trainer.logger: false): name a folder with "
                                     "--prediction_writer.output_dir=DIR")
                writer.output_dir = Path(log_dir) / DEFAULT_PREDICTIONS

    def _writers(self) -> list[Any]:
        return [c for c in self.trainer.callbacks if isinstance(c, prediction_writer_class())]

    def _say_where(self, subcommand: str) -> None:
        if not self.trainer.is_global_zero:
            return
        log_dir = run_log_dir(self.trainer)
        if log_dir:
            print(f"{subcommand}: logged to {log_dir}", flush=True)
        if subcommand == "predict":
            for writer in self._writers():
                print(f"predict: predictions written to {writer.output_dir}", flush=True)

    def after_validate(self) -> None:
        self._say_where("validate")

    def after_test(self) -> None:
        self._say_where("test")

    def after_predict(self) -> None:
        self._say_where("predict")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with :class:`SafeCheckpointIO` unless the config gives another ``CheckpointIO``."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = kwargs.get("strategy", config.get("strategy"))
        if getattr(strategy, "_checkpoint_io", None) is None and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        callbacks = kwargs.get("callbacks", config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if not any(isinstance(c, RunSummary) for c in callbacks):  # fit ends with the run summary
            kwargs["callbacks"] = [*callbacks, RunSummary()]
        if config.get("enable_model_summary") is None:  # RunSummary's one line instead of a table of metric modules
            kwargs["enable_model_summary"] = False
        return super().instantiate_trainer(**kwargs)


def build_cli(
    args: Sequence[str] | None = None, run: bool = True, datamodule_class: type[LightningDataModule] | str | None = None,
    exit_on_error: bool = True,
) -> MultiTaskCLI:
    """The CLI object (``run=False`` parses and instantiates without running a subcommand).

    ``datamodule_class``: the data module the ``data`` section configures, a
    class or its class path (a subclass of ``LightningDataModule`` with a
    ``prepare_features()`` method); default ``ParquetDataModule``.
    ``exit_on_error=False``: an argument error raises ``argparse.ArgumentError``
    instead of printing the usage and exiting (:func:`main` sets it).
    """
    if datamodule_class is None:
        datamodule_class = default_class(DEFAULT_DATAMODULE, LightningDataModule, "data")
    elif isinstance(datamodule_class, str):
        datamodule_class = resolve_class(datamodule_class, LightningDataModule, "datamodule_class")
    if not callable(getattr(datamodule_class, "prepare_features", None)):
        raise TypeError(f"datamodule_class {datamodule_class.__qualname__} has no prepare_features() method: the CLI "
                        "builds the model with the feature specs it returns")
    return MultiTaskCLI(
        MultiTaskLightningModule,
        datamodule_class,
        args=list(args) if args is not None else None,
        run=run,
        parser_kwargs={"parser_mode": PARSER_MODE},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        exit_on_error=exit_on_error,
    )


TRACEBACK_VARIABLE = "MTL_LIGHTNING_TRACEBACK"
USER_ERRORS = (ValueError, TypeError, ArgumentError, FileNotFoundError)


class _Quiet(logging.Filter):
    """Drops Lightning's messages that say nothing about this run (tips for other products, the TPU line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip:"):
            return False
        return not (message.startswith("TPU available: False") or message.startswith("`weights_only` was not set"))


@contextlib.contextmanager
def quiet_lightning():
    """The noise of a command left out (see :class:`_Quiet`; torch's pytree deprecation that Lightning triggers)."""
    quiet = _Quiet()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch",
                                                    "lightning.fabric.utilities.rank_zero")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point; ``args`` defaults to ``sys.argv[1:]``.

    A user's mistake (``ValueError``, ``TypeError``, a missing file, an argument jsonargparse refuses)
    ends the command with ``mtl-lightning: error: <message>`` on stderr and exit status 2, without a
    traceback (see :mod:`mtl_lightning.cli_messages`); ``MTL_LIGHTNING_TRACEBACK=1`` in the environment, or
    ``--traceback`` among the arguments, raises it with its traceback instead. Any other exception is
    raised as it is.
    """
    args = list(sys.argv[1:] if args is None else args)
    show_traceback = "--traceback" in args or os.environ.get(TRACEBACK_VARIABLE, "").lower() not in ("", "0", "false")
    args = [a for a in args if a != "--traceback"]
    try:
        with quiet_lightning():
            build_cli(args, exit_on_error=False)
    except USER_ERRORS as error:
        if show_traceback:
            raise
        message = user_message(error, ConfigSources(args))
        if message.startswith("unknown option") and args and args[0] in _SUBCOMMANDS:
            message += f" (mtl-lightning {args[0]} --help lists every option)"
        print(f"mtl-lightning: error: {message}\n  ({TRACEBACK_VARIABLE}=1 shows the traceback)",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
