"""Sharded checkpoints of ``TorchRecStrategy``: a folder, read back into any sharding, or into one plain process.

A checkpoint path (``epoch=0-step=8.ckpt``, ``last.ckpt`` ...) is a folder:

* ``meta.pt``: everything Lightning puts in a checkpoint except the embedding
  tables: the dense part of the module's ``state_dict`` (replicated, so written
  once), the dense optimizer's state, loops, callbacks, hyper-parameters, the
  data module's state; plus a ``"torchrec"`` entry describing every table. It
  is read with ``weights_only=True`` (:func:`mtl_lightning.checkpoint.load_checkpoint`).
* ``.metadata`` and ``__<rank>_0.distcp``: the tables and the embedding
  optimizer's state, written by ``torch.distributed.checkpoint`` (DCP), each
  rank writing its own shards. The keys name the table, never the shard:
  ``tables.<layer>.<feature>`` (``(rows, dim)``) and
  ``table_optimizer.<layer>.<feature>.momentum1`` (and ``momentum2`` for Adam),
  so DCP reads them back into any other sharding and world size, or into whole
  tensors in a single process. Only tensors are stored there; DCP's index
  (``.metadata``, a pickle) is read by an unpickler that accepts only DCP's own
  metadata classes.

:func:`consolidate` turns such a folder into a plain checkpoint dict (the
``FeatureEmbedding`` layout, ``fused.dim<d>.weight`` and ``tables.<feature>.weight``)
without TorchRec or a process group: ``MultiTaskLightningModule.load_from_checkpoint(folder)``
uses it, so ``python -m mtl_lightning.export folder`` works too, and
``python -m mtl_lightning.distributed.checkpoint FOLDER OUT.ckpt`` writes it as
one file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint

META = "meta.pt"
FORMAT = 1


def is_sharded_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a folder written by ``TorchRecStrategy`` (``meta.pt`` and DCP's ``.metadata``)."""
    if not isinstance(path, (str, Path)) or "://" in str(path):
        return False
    path = Path(path)
    return path.is_dir() and (path / META).is_file() and (path / ".metadata").is_file()


# DCP's .metadata is a pickle of these dataclasses (and torch.Size / dtypes / enums): nothing else is accepted.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_ALLOWED_TORCH = {"Size", "device", "layout", "memory_format", "strided", "contiguous_format", "preserve_format",
                  "channels_last", "channels_last_3d", "sparse_coo"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES:
            found = getattr(__import__(module, fromlist=[name]), name)
            if isinstance(found, type):
                return found
        if module == "torch" and (name in _ALLOWED_TORCH or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                              ("torch.serialization", "_get_layout"),  # a layout name -> torch.strided etc.
                              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}:
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name} (a checkpoint index holds only "
                                     "torch.distributed.checkpoint metadata)")


def _reader(path: Path) -> Any:
    """DCP's file reader, with its index read by :class:`_MetadataUnpickler` (checkpoints are data, never code)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = Path(self.path) / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(index.read_bytes())).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
                raise ValueError(f"checkpoint {path}: its table index {index} is not a torch.distributed.checkpoint "
                                 f"index (refused: {error}); checkpoints are data, never code") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``meta.pt`` (``weights_only=True``), checked to come from ``TorchRecStrategy``."""
    path = Path(path)
    meta = load_checkpoint(path / META)
    info = meta.get("torchrec")
    if not isinstance(info, Mapping) or info.get("format") != FORMAT or not isinstance(info.get("tables"), list):
        raise ValueError(f"checkpoint {path}: {META} has no TorchRecStrategy table description (format {FORMAT}); "
                         "it was not written by mtl_lightning.distributed.TorchRecStrategy")
    return meta


def save_sharded(path: str | Path, meta: dict[str, Any], tensors: dict[str, Tensor], process_group: Any,
                 is_global_zero: bool, save_meta: Any) -> None:
    """Write ``tensors`` (tables and optimizer state, sharded or replicated) with DCP and ``meta`` as ``meta.pt``.

    Every rank calls this (DCP writes each rank's shards); ``save_meta(meta, file)`` runs on rank 0.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if is_global_zero:
        if path.is_file() or path.is_symlink():
            path.unlink()
        elif path.is_dir():  # an older checkpoint of the same name: no stale shard of another world size stays
            for child in path.iterdir():
                child.unlink()
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier(group=process_group)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(path)), process_group=process_group)
    if is_global_zero:
        save_meta(meta, path / META)
    if dist.is_initialized():
        dist.barrier(group=process_group)


def load_sharded(path: str | Path, tensors: dict[str, Tensor], process_group: Any = None) -> None:
    """Fill ``tensors`` (this rank's shards, or whole tensors) in place from the checkpoint folder ``path``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, storage_reader=_reader(Path(path)), process_group=process_group,
             no_dist=not dist.is_initialized() or process_group is None)


def stored_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: global shape}`` of the tensors the folder's DCP index lists."""
    metadata = _reader(Path(path)).read_metadata().state_dict_metadata
    return {key: tuple(getattr(value, "size", ())) for key, value in metadata.items()}


def consolidate(path: str | Path) -> dict[str, Any]:
    """The plain (single-process, ``FeatureEmbedding`` layout) checkpoint dict of the folder ``path``.

    Tables are read whole (no process group, no TorchRec) and put where
    ``FeatureEmbedding`` keeps them; the embedding optimizer's state and the
    dense optimizer's (whose parameter list no longer matches) are left out,
    so the result serves ``load_from_checkpoint``, prediction and export, not
    resuming training (resume from the folder itself, under ``TorchRecStrategy``).
    """
    path = Path(path)
    meta = read_meta(path)
    stored_keys(path)  # reads DCP's index first: a refused one raises ValueError here, not inside DCP
    tables = meta["torchrec"]["tables"]
    whole = {t["key"]: torch.empty(t["rows"], t["dim"], dtype=getattr(torch, t.get("dtype", "float32")))
             for t in tables}
    load_sharded(path, whole)
    state = dict(meta["state_dict"])
    plain: dict[str, list[tuple[int, Tensor]]] = {}
    for t in tables:
        plain.setdefault(f"{t['layer']}.{t['plain_key']}", []).append((t["first_row"], whole[t["key"]]))
    for key, blocks in plain.items():
        state[key] = torch.cat([value for _, value in sorted(blocks, key=lambda block: block[0])])
    checkpoint = {k: v for k, v in meta.items() if k not in ("torchrec", "optimizer_states", "lr_schedulers")}
    checkpoint["state_dict"] = state
    return checkpoint


def consolidated_file(path: str | Path) -> io.BytesIO:
    """:func:`consolidate` as an in-memory checkpoint file (what ``load_from_checkpoint`` reads)."""
    buffer = io.BytesIO()
    torch.save(consolidate(path), buffer)
    buffer.seek(0)
    buffer.name = str(path)  # type: ignore[attr-defined]  (error messages name the folder)
    return buffer


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl_lightning.distributed.checkpoint FOLDER OUT.ckpt``: one plain checkpoint file."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a TorchRecStrategy checkpoint folder as one plain checkpoint "
                                                 "(FeatureEmbedding layout, no optimizer state) for one process.")
    parser.add_argument("folder", help="a checkpoint folder written by TorchRecStrategy")
    parser.add_argument("output", help="the checkpoint file to write")
    args = parser.parse_args(argv)
    if not is_sharded_checkpoint(args.folder):
        parser.error(f"{args.folder} is not a TorchRecStrategy checkpoint folder (it needs {META} and .metadata)")
    torch.save(consolidate(args.folder), args.output)
    print(f"wrote {args.output}")


__all__ = ["is_sharded_checkpoint", "read_meta", "save_sharded", "load_sharded", "consolidate", "consolidated_file",
           "stored_keys"]


if __name__ == "__main__":
    main()
