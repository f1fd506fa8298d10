"""Checkpoint files as data: weights-only loads with clear errors, atomic saves.

The functions :mod:`mtl_lightning.checkpoint` (the module's and the Trainer's
loading) and :mod:`mtl_lightning.distributed.checkpoint` (TorchRec folders)
both build on; see :mod:`mtl_lightning.checkpoint` for what they guarantee.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import shutil
import socket
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

import torch

PathLike = Union[str, Path]
#: the file of a TorchRecStrategy checkpoint folder holding its plain state (beside DCP's ``.metadata``)
META = "meta.pt"


def is_sharded_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a folder written by ``TorchRecStrategy`` (``meta.pt`` and DCP's ``.metadata``)."""
    if not isinstance(path, (str, Path)) or "://" in str(path):
        return False
    path = Path(path)
    return path.is_dir() and (path / META).is_file() and (path / ".metadata").is_file()


def _is_local(path: Any) -> bool:
    return isinstance(path, (str, Path)) and "://" not in str(path)


def check_checkpoint_file(path: PathLike) -> Path:
    """``path`` as a ``Path`` if it is a readable, complete checkpoint archive; ``ValueError`` naming it otherwise.

    Only the zip central directory is read (the tensors are not), so this is
    cheap even for a large checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        if is_sharded_checkpoint(path):
            raise ValueError(
                f"checkpoint {path} is a TorchRecStrategy checkpoint folder (sharded embedding tables), which only "
                "TorchRecStrategy loads as a Trainer checkpoint: use Trainer(strategy=TorchRecStrategy(...)) (or "
                "--trainer.strategy=torchrec), or MultiTaskLightningModule.load_from_checkpoint(folder) to read it "
                "into one process, or `python -m mtl_lightning.distributed.checkpoint FOLDER OUT.ckpt` to write it "
                "as one plain checkpoint file")
        raise ValueError(f"checkpoint {path} is a folder, not a checkpoint file (nor a TorchRecStrategy checkpoint "
                         "folder: it has no meta.pt and .metadata)")
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


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def temporary_path(path: PathLike) -> Path:
    """A fresh hidden name beside ``path`` for writing its replacement: ``.<name>.tmp-<host>-<pid>-<token>``."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporary files (and folders) that killed saves left in ``folder``; returns them.

    Only names made by :func:`temporary_path` on this host whose process no
    longer runs are removed (a save in progress in another process is left
    alone; another host's are left to that host).
    """
    folder, host, removed = Path(folder), _host(), []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            match = _TEMPORARY.match(entry.name)
            if match is None or match["host"] != host or int(match["pid"]) == os.getpid() \
                    or _running(int(match["pid"])):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
    return removed


def sync_folder(folder: PathLike) -> None:
    """``fsync`` a folder, so that a rename in it survives a power loss (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def atomic_save(checkpoint: Any, path: PathLike) -> None:
    """``torch.save(checkpoint)`` to the local ``path`` atomically (see the module docstring).

    Writes a temporary file in ``path``'s folder, flushes and ``fsync``-s it,
    and renames it over ``path``. On any failure or interruption the temporary
    file is removed and ``path`` is left as it was; a failed write raises
    ``OSError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temporary = temporary_path(path)
    try:
        with open(temporary, "xb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # KeyboardInterrupt too: no temporary file stays behind
        with contextlib.suppress(OSError):
            temporary.unlink()
        cause = error if isinstance(error, OSError) else error.__cause__ or error.__context__
        if isinstance(error, (OSError, RuntimeError)) and isinstance(cause, OSError):
            raise OSError(cause.errno, f"checkpoint {path} could not be written ({cause.strerror or cause}); "
                                       "the checkpoint there before, if any, is unchanged") from error
        raise
    sync_folder(path.parent)
