"""Checkpoints as data: loaded with ``weights_only=True`` (clear errors for a truncated or corrupt file), saved atomically.

A checkpoint is data, never code. Everything here loads with
``torch.load(..., weights_only=True)``, which unpickles only tensors and plain
containers; a checkpoint holding any other pickled object (a function, a
class instance) is refused with a ``ValueError`` naming the file. The
architecture and weighting strategy are rebuilt from the plain
``hyper_parameters`` by :func:`mtl_lightning.config.build`, which only
instantiates subclasses of the expected base.

* :class:`CheckpointLoading` is mixed into ``MultiTaskLightningModule`` so that
  ``MultiTaskLightningModule.load_from_checkpoint(path)`` (and therefore
  ``python -m mtl_lightning.export``) loads that way.
  A checkpoint folder written by ``mtl_lightning.distributed.TorchRecStrategy``
  (sharded tables) loads too: its tables are read whole into the plain
  ``FeatureEmbedding`` layout (``mtl_lightning.distributed.checkpoint.consolidate``).
* :class:`SafeCheckpointIO` does the same for the Trainer
  (``trainer.fit(ckpt_path=...)``, ``validate``/``test``/``predict``), and
  saves atomically (:func:`atomic_save`). ``MultiTaskLightningModule`` installs
  it on any Trainer whose strategy has no ``CheckpointIO`` of the user's
  (:class:`SafeCheckpointing`, a callback the module returns from
  ``configure_callbacks``), so a plain ``L.Trainer()`` gets it; the
  ``mtl-lightning`` CLI adds it too, unless the config names another
  ``CheckpointIO``. ``Trainer(plugins=[TorchCheckpointIO()])`` opts out (for a
  checkpoint you wrote yourself that holds other objects).

Saving is atomic on any filesystem: the checkpoint is written to a hidden
temporary file in the destination folder (``.<name>.tmp-<host>-<pid>-<token>``,
never the system's temporary folder, which may be another filesystem),
flushed and ``fsync``-ed, then renamed over the destination with
``os.replace`` (and the folder ``fsync``-ed). A save that fails (a full disk)
or is interrupted (``KeyboardInterrupt``) removes its temporary file and
leaves the previous checkpoint of that name as it was; one killed outright
(``kill -9``, power loss) leaves only its temporary file, which the next save
into that folder removes (:func:`remove_stale_temporaries`: files of this
host's processes that no longer run). A reader never sees a partly written
checkpoint under its final name.

A file cut short (a copy or an upload that stopped, a full disk) lacks the zip
archive's central directory, which sits at its end: :func:`check_checkpoint_file`
reads only that directory, so it costs next to nothing, and raises
``ValueError("checkpoint <file> is truncated or corrupt ...")`` instead of the
``OSError: [Errno 22] Invalid argument`` or miniz error ``torch.load`` gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Callable

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from .checkpoint_files import (PathLike, _explained, _is_local, atomic_save, check_checkpoint_file,  # noqa: F401
                               is_sharded_checkpoint, load_checkpoint, remove_stale_temporaries, sync_folder,
                               temporary_path)


class CheckpointLoading:
    """Mixin for a ``LightningModule``: ``load_from_checkpoint`` loads with ``weights_only=True``, and the Trainer
    gets :class:`SafeCheckpointIO` (loading as data, atomic saves) unless the user gave it a ``CheckpointIO``.

    Put it before ``lightning.LightningModule`` in the bases. A truncated,
    corrupt or code-carrying checkpoint raises ``ValueError`` naming the file.
    ``weights_only=False`` is there for a checkpoint you wrote yourself and trust.
    A subclass that overrides ``configure_callbacks`` keeps this by adding
    ``super().configure_callbacks()`` to its own.
    """

    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`SafeCheckpointing`, which installs :class:`SafeCheckpointIO` at set-up (see the class doc);
        nothing when the Trainer has it already (a second ``fit``/``validate`` ... with the same Trainer)."""
        try:
            callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a Trainer
            callbacks = []
        return [] if any(isinstance(c, SafeCheckpointing) for c in callbacks) else [SafeCheckpointing()]

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> Any:
        if _is_local(checkpoint_path) and Path(checkpoint_path).is_dir():
            # a TorchRecStrategy checkpoint folder: its sharded tables, read whole into the plain layout
            from .distributed.checkpoint import consolidated_file, is_sharded_checkpoint

            if not is_sharded_checkpoint(checkpoint_path):
                raise ValueError(f"checkpoint {checkpoint_path} is a folder but not one written by TorchRecStrategy "
                                 "(no meta.pt and .metadata in it)")
            checkpoint_path = consolidated_file(checkpoint_path)
        elif _is_local(checkpoint_path):
            check_checkpoint_file(checkpoint_path)  # type: ignore[arg-type]
        name = checkpoint_path if _is_local(checkpoint_path) else getattr(checkpoint_path, "name", checkpoint_path)
        parent: Callable[..., Any] = super().load_from_checkpoint  # type: ignore[misc]
        with _explained(name):
            return parent(checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
                          weights_only=weights_only, **kwargs)


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that loads with :func:`load_checkpoint` (``weights_only=True``, clear errors) and
    saves local files with :func:`atomic_save`.

    ``Trainer(plugins=[SafeCheckpointIO()])``; ``MultiTaskLightningModule`` installs it by itself when the
    Trainer has no ``CheckpointIO`` of the user's (:class:`SafeCheckpointing`). Remote paths (``s3://`` ...)
    are saved by ``TorchCheckpointIO`` (an object store's upload replaces the object whole).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: PathLike, map_location: Any = lambda storage, location: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"checkpoint {path}: SafeCheckpointIO loads with weights_only=True only; "
                             "use lightning's TorchCheckpointIO for a checkpoint you trust that holds other objects")
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)


def install_safe_checkpoint_io(strategy: Any) -> bool:
    """Give a Trainer's ``strategy`` a :class:`SafeCheckpointIO` unless the user gave it a ``CheckpointIO``.

    Lightning keeps a ``CheckpointIO`` given through ``plugins=`` or the
    strategy's ``checkpoint_io=`` in ``strategy._checkpoint_io``; ``None`` there
    means none was given (the public ``checkpoint_io`` property would create a
    plain ``TorchCheckpointIO`` on first use, indistinguishable from one the
    user chose, so the attribute is read instead). A wrapping IO
    (``AsyncCheckpointIO``) without its own inner IO gets one. Returns whether
    one was installed.
    """
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None:
        strategy.checkpoint_io = SafeCheckpointIO()
        return True
    if isinstance(current, _WrappingCheckpointIO) and current.checkpoint_io is None:
        current.checkpoint_io = SafeCheckpointIO()
        return True
    return False


class SafeCheckpointing(L.Callback):
    """Installs :class:`SafeCheckpointIO` at set-up (before any checkpoint is read or written) when the Trainer's
    strategy has no ``CheckpointIO`` of the user's; ``MultiTaskLightningModule.configure_callbacks`` returns it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_safe_checkpoint_io(trainer.strategy)


__all__ = ["check_checkpoint_file", "load_checkpoint", "CheckpointLoading", "SafeCheckpointIO", "SafeCheckpointing",
           "atomic_save", "install_safe_checkpoint_io", "remove_stale_temporaries", "temporary_path", "sync_folder"]
