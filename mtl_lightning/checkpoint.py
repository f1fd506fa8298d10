"""Loading checkpoints as data: ``weights_only=True``, and a clear error for a truncated or corrupt file.

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
  (``trainer.fit(ckpt_path=...)``, ``validate``/``test``/``predict``):
  ``Trainer(plugins=[SafeCheckpointIO()])``; the ``mtl-lightning`` CLI adds it
  unless the config names another ``CheckpointIO``.

A file cut short (a copy or an upload that stopped, a full disk) lacks the zip
archive's central directory, which sits at its end: :func:`check_checkpoint_file`
reads only that directory, so it costs next to nothing, and raises
``ValueError("checkpoint <file> is truncated or corrupt ...")`` instead of the
``OSError: [Errno 22] Invalid argument`` or miniz error ``torch.load`` gives.
"""

from __future__ import annotations

import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

PathLike = Union[str, Path]


def _is_local(path: Any) -> bool:
    return isinstance(path, (str, Path)) and "://" not in str(path)


def check_checkpoint_file(path: PathLike) -> Path:
    """``path`` as a ``Path`` if it is a readable, complete checkpoint archive; ``ValueError`` naming it otherwise.

    Only the zip central directory is read (the tensors are not), so this is
    cheap even for a large checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ValueError(
            f"checkpoint {path} is truncated or corrupt ({size} bytes; not a complete checkpoint archive: {error}); "
            "copy or write it again"
        ) from None
    end = max((m.header_offset + m.compress_size for m in members), default=0)
    if not members or end > size:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({size} bytes, its archive needs {end}); "
                         "copy or write it again")
    return path


def load_checkpoint(path: PathLike | IO[bytes], map_location: Any = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong.

    Raises ``ValueError`` for a missing, truncated or corrupt file, for one that
    pickles anything but tensors and plain data, and for one that is not a dict.
    """
    name = path if _is_local(path) else getattr(path, "name", repr(path))
    if _is_local(path):
        path = check_checkpoint_file(path)  # type: ignore[arg-type]
    with _explained(name):
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {name} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    return checkpoint


@contextmanager
def _explained(name: Any) -> Iterator[None]:
    """Turn ``torch.load``'s weights_only refusal and archive errors into a ``ValueError`` naming ``name``."""
    try:
        yield
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(
            f"checkpoint {name} holds pickled objects other than tensors and plain data, refused by "
            f"weights_only=True loading (checkpoints are data, never code): {reason}"
        ) from None
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):
            raise
        raise ValueError(f"checkpoint {name} is truncated or corrupt: {str(error).splitlines()[0]}") from None


class CheckpointLoading:
    """Mixin for a ``LightningModule``: ``load_from_checkpoint`` loads with ``weights_only=True``.

    Put it before ``lightning.LightningModule`` in the bases. A truncated,
    corrupt or code-carrying checkpoint raises ``ValueError`` naming the file.
    ``weights_only=False`` is there for a checkpoint you wrote yourself and trust.
    """

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
    """``TorchCheckpointIO`` whose loading is :func:`load_checkpoint` (``weights_only=True``, clear errors).

    ``Trainer(plugins=[SafeCheckpointIO()])``; saving is unchanged.
    """

    def load_checkpoint(
        self, path: PathLike, map_location: Any = lambda storage, location: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"checkpoint {path}: SafeCheckpointIO loads with weights_only=True only; "
                             "use lightning's TorchCheckpointIO for a checkpoint you trust that holds other objects")
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)


__all__ = ["check_checkpoint_file", "load_checkpoint", "CheckpointLoading", "SafeCheckpointIO"]
