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
  tensors in a single process.

A checkpoint folder is data: only tensors are read from it, and everything is
checked before anything is allocated or read. DCP's index (``.metadata``, a
pickle) is read by an unpickler that accepts only DCP's own metadata classes,
then validated (:func:`check_index`): every entry must be a tensor (an entry
listed as a *bytes* item would make DCP's default load planner unpickle it
with ``torch.load(..., weights_only=False)``, i.e. run code), of an allowed
dtype, at most 2-D, its chunks inside its shape, each stored in a plain file of
the folder itself (no path out of it, no link) at an offset and length inside
that file and at least as long as the chunk's bytes, so no entry can promise
more memory than the folder holds. ``meta.pt`` is read with
``weights_only=True`` and its table description checked (:func:`read_meta`:
keys, positive sizes, known dtypes), and its tables must match the index entry
for entry in shape and dtype (:func:`check_tables`). The tensors are then read
by a load planner that refuses bytes items outright
(:class:`TensorOnlyLoadPlanner`). Any refusal is a ``ValueError`` naming the
folder and the entry.

Saving is atomic: every rank writes into a hidden staging folder beside the
destination (``.<name>.tmp-<host>-<pid>-<token>``, rank 0's name), the files
are ``fsync``-ed, and rank 0 swaps it with the destination in one
``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames, the old folder
kept under a hidden name until the new one is in place), then removes the old
one. A failed save removes its staging folder; a killed one leaves it for the
next save into that folder to remove.

:func:`consolidate` turns such a folder into a plain checkpoint dict (the
``FeatureEmbedding`` layout, ``fused.dim<d>.weight`` and ``tables.<feature>.weight``)
without TorchRec or a process group: ``MultiTaskLightningModule.load_from_checkpoint(folder)``
uses it, so ``python -m mtl_lightning.export folder`` works too, and
``python -m mtl_lightning.distributed.checkpoint FOLDER OUT.ckpt`` writes it as
one file.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..checkpoint_files import (META, atomic_save, is_sharded_checkpoint, load_checkpoint,  # noqa: F401
                                remove_stale_temporaries, sync_folder, temporary_path)

FORMAT = 1
#: dtypes a checkpoint folder may hold (tables, optimizer state, step counts)
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)
TABLE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")


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


def _refuse(path: Path, entry: str, problem: str) -> ValueError:
    return ValueError(f"checkpoint folder {path}: {entry}: {problem}; refused (a checkpoint folder is data: only "
                      "tensors are read from it, and only as its index and meta.pt describe them)")


def _size(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (a ``torch.Size`` or a sequence), or ``None``."""
    if not isinstance(value, (tuple, list)) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                   for v in value):
        return None
    return tuple(value)


def check_index(path: Path, metadata: Any) -> None:
    """Validate DCP's index of the folder ``path`` before anything is read (see the module docstring)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise _refuse(path, ".metadata", "not a torch.distributed.checkpoint index")
    storage = metadata.storage_data
    if not isinstance(storage, dict) or not all(isinstance(k, MetadataIndex) and isinstance(v, _StorageInfo)
                                                for k, v in storage.items()):
        raise _refuse(path, ".metadata", "its storage table is not a map of DCP storage entries")
    root = path.resolve()
    file_sizes: dict[str, int] = {}
    for info in storage.values():
        name = info.relative_path
        if name not in file_sizes:
            target = path / name if isinstance(name, str) else None
            if target is None or not name or name in (".", "..") or Path(name).name != name or "\0" in name \
                    or target.is_symlink() or not target.is_file() or target.resolve().parent != root:
                raise _refuse(path, f"storage file {name!r}", "not a plain file inside the checkpoint folder")
            file_sizes[name] = target.stat().st_size
        offset, length = info.offset, info.length
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)) \
                or offset + length > file_sizes[name]:
            raise _refuse(path, f"storage file {name!r}", f"an entry at bytes [{offset}, {offset}+{length}) lies "
                                                        f"outside the file ({file_sizes[name]} bytes)")
        if info.transform_descriptors:
            raise _refuse(path, f"storage file {name!r}", f"stored with transforms {info.transform_descriptors!r} "
                                                        "(this format writes plain tensors only)")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            raise _refuse(path, f"index entry {key!r}", "not a string key")
        if not isinstance(entry, TensorStorageMetadata):
            what = "a bytes item (a pickled object, which DCP would unpickle with weights_only=False and so run " \
                   "code)" if type(entry).__name__ == "BytesStorageMetadata" else f"a {type(entry).__name__}"
            raise _refuse(path, f"index entry {key!r}", f"is {what}, not a tensor")
        dtype = getattr(entry.properties, "dtype", None)
        if dtype not in ALLOWED_DTYPES:
            raise _refuse(path, f"index entry {key!r}", f"dtype {dtype} is not among {list(ALLOWED_DTYPES)}")
        size = _size(entry.size)
        if size is None or len(size) > 2:
            raise _refuse(path, f"index entry {key!r}", f"size {entry.size!r} is not a shape of at most 2 dims")
        if not isinstance(entry.chunks, list):
            raise _refuse(path, f"index entry {key!r}", "its chunks are not a list")
        itemsize = torch.empty((), dtype=dtype).element_size()
        for chunk in entry.chunks:
            offsets, sizes = _size(getattr(chunk, "offsets", None)), _size(getattr(chunk, "sizes", None))
            if offsets is None or sizes is None or len(offsets) != len(size) or len(sizes) != len(size) \
                    or any(o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise _refuse(path, f"index entry {key!r}", f"a chunk at {offsets} of {sizes} lies outside its "
                                                          f"size {size}")
            info = storage.get(MetadataIndex(key, offsets))
            if info is None:
                raise _refuse(path, f"index entry {key!r}", f"its chunk at {offsets} has no storage entry")
            numel = 1
            for s in sizes:
                numel *= s
            if numel * itemsize > info.length:
                raise _refuse(path, f"index entry {key!r}", f"its chunk at {offsets} of {sizes} needs "
                                                          f"{numel * itemsize} bytes, its storage holds {info.length}")


def _reader(path: Path) -> Any:
    """DCP's file reader; its index is read by :class:`_MetadataUnpickler` and checked by :func:`check_index`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = Path(self.path) / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(index.read_bytes())).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError,
                    IndexError, KeyError) as error:
                raise ValueError(f"checkpoint {path}: its table index {index} is not a torch.distributed.checkpoint "
                                 f"index (refused: {error}); checkpoints are data, never code") from None
            check_index(path, metadata)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def _tensor_only_planner(path: Path) -> Any:
    """DCP's default load planner, refusing any bytes item (which it would ``torch.load(weights_only=False)``)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            raise _refuse(path, f"index entry {read_item.dest_index.fqn!r}", "is a bytes item, not a tensor")

    return TensorOnlyLoadPlanner()


_META_FIELDS = {"key": str, "layer": str, "table": str, "plain_key": str, "rows": int, "dim": int, "first_row": int}


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of ``meta.pt`` (``weights_only=True``), checked to come from ``TorchRecStrategy``.

    Its table description is validated (every table a dict with the expected
    fields and types, ``key == "tables.<layer>.<table>"``, positive sizes, a
    dtype in ``TABLE_DTYPES``, a known embedding optimizer); ``ValueError``
    names the folder and the entry.
    """
    path = Path(path)
    meta = load_checkpoint(path / META)
    info = meta.get("torchrec")
    if not isinstance(info, Mapping) or info.get("format") != FORMAT or not isinstance(info.get("tables"), list):
        raise ValueError(f"checkpoint {path}: {META} has no TorchRecStrategy table description (format {FORMAT}); "
                         "it was not written by mtl_lightning.distributed.TorchRecStrategy")
    if not isinstance(meta.get("state_dict"), Mapping):
        raise _refuse(path, f"{META} state_dict", "missing or not a dict")
    if info.get("embedding_optimizer") not in (None, *EMBEDDING_OPTIMIZERS):
        raise _refuse(path, f"{META} embedding_optimizer", f"{info.get('embedding_optimizer')!r} is not among "
                                                          f"{EMBEDDING_OPTIMIZERS}")
    for number, table in enumerate(info["tables"]):
        entry = f"{META} table {number}"
        if not isinstance(table, Mapping):
            raise _refuse(path, entry, "not a dict")
        for field, kind in _META_FIELDS.items():
            value = table.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise _refuse(path, f"{entry} {field!r}", f"{value!r} is not a {kind.__name__}")
        if table["rows"] <= 0 or table["dim"] <= 0 or table["first_row"] < 0:
            raise _refuse(path, f"{entry} ({table['key']})", f"rows {table['rows']}, dim {table['dim']} and "
                                                            f"first_row {table['first_row']} must be positive")
        if table["key"] != f"tables.{table['layer']}.{table['table']}":
            raise _refuse(path, f"{entry} {table['key']!r}", f"not 'tables.<layer>.<table>' of its layer "
                                                            f"{table['layer']!r} and table {table['table']!r}")
        if table.get("dtype", "float32") not in TABLE_DTYPES:
            raise _refuse(path, f"{entry} ({table['key']}) dtype", f"{table.get('dtype')!r} is not among "
                                                                  f"{sorted(TABLE_DTYPES)}")
    return meta


def check_tables(path: str | Path, tables: list[Mapping[str, Any]], stored: Mapping[str, tuple[tuple[int, ...], Any]]
                 ) -> None:
    """Every table ``meta.pt`` describes must be an index entry of the same shape and dtype (``stored``:
    :func:`stored_entries`), so what is allocated for it is what the folder holds."""
    for table in tables:
        key, shape = table["key"], (table["rows"], table["dim"])
        dtype = TABLE_DTYPES[table.get("dtype", "float32")]
        if key not in stored:
            raise _refuse(Path(path), f"table {key!r}", f"{META} describes it, the index has no such entry")
        if stored[key] != (shape, dtype):
            raise _refuse(Path(path), f"table {key!r}", f"{META} says {shape} {dtype}, the index "
                                                       f"{stored[key][0]} {stored[key][1]}")


def _exchange(staging: Path, path: Path) -> None:
    """Put ``staging`` at ``path``; whatever was at ``path`` ends at ``staging`` (removed by the caller)."""
    if not path.exists() and not path.is_symlink():
        os.replace(staging, path)
        return
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if rename is not None:  # Linux: one atomic swap of two folders (or of a folder and a file)
        at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
        if rename(at_cwd, os.fsencode(staging), at_cwd, os.fsencode(path), exchange) == 0:
            return
    aside = temporary_path(path)  # elsewhere (or a filesystem without the swap): two renames
    os.replace(path, aside)
    os.replace(staging, path)
    os.replace(aside, staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def save_sharded(path: str | Path, meta: dict[str, Any], tensors: dict[str, Tensor], process_group: Any,
                 is_global_zero: bool, save_meta: Callable[[dict[str, Any], Path], None]) -> None:
    """Write ``tensors`` (tables and optimizer state, sharded or replicated) with DCP and ``meta`` as ``meta.pt``.

    Every rank calls this (DCP writes each rank's shards); ``save_meta(meta, file)`` runs on rank 0. The folder
    ``path`` is replaced atomically (see the module docstring): until the swap, readers see the previous one.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    distributed = dist.is_initialized() and dist.get_world_size(process_group) > 1
    staging = [None]
    if is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        staging = [temporary_path(path)]
        staging[0].mkdir()
    if distributed:
        dist.broadcast_object_list(staging, src=dist.get_global_rank(process_group, 0), group=process_group)
    folder = Path(staging[0])
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True),
                 process_group=process_group, no_dist=not distributed)
        if is_global_zero:
            save_meta(meta, folder / META)
            for child in folder.iterdir():  # DCP syncs its files; meta.pt (any CheckpointIO) and the index too
                with open(child, "rb+") as file:
                    os.fsync(file.fileno())
            sync_folder(folder)
            _exchange(folder, path)
            sync_folder(path.parent)
    finally:
        if is_global_zero:
            _remove(folder)  # the old checkpoint after the swap; the unfinished new one after a failure
        if distributed:
            dist.barrier(group=process_group)


def load_sharded(path: str | Path, tensors: dict[str, Tensor], process_group: Any = None) -> None:
    """Fill ``tensors`` (this rank's shards, or whole tensors) in place from the checkpoint folder ``path``.

    The index is validated first and bytes items are refused (see the module docstring).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(tensors, storage_reader=_reader(Path(path)), planner=_tensor_only_planner(Path(path)),
                 process_group=process_group, no_dist=not dist.is_initialized() or process_group is None)
    except CheckpointException as error:  # DCP wraps every rank's error: a refusal is raised as itself
        refusals = [failure for failure, _ in error.failures.values() if isinstance(failure, ValueError)]
        if refusals:
            raise refusals[0] from None
        raise


def stored_entries(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (global shape, dtype)}`` of the tensors the folder's DCP index lists (validated)."""
    metadata = _reader(Path(path)).read_metadata().state_dict_metadata
    return {key: (tuple(value.size), value.properties.dtype) for key, value in metadata.items()}


def stored_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: global shape}`` of the tensors the folder's DCP index lists (validated)."""
    return {key: shape for key, (shape, _) in stored_entries(path).items()}


def consolidate(path: str | Path) -> dict[str, Any]:
    """The plain (single-process, ``FeatureEmbedding`` layout) checkpoint dict of the folder ``path``.

    Tables are read whole (no process group, no TorchRec) and put where
    ``FeatureEmbedding`` keeps them; the embedding optimizer's state and the
    dense optimizer's (whose parameter list no longer matches) are left out,
    so the result serves ``load_from_checkpoint``, prediction and export, not
    resuming training (resume from the folder itself, under ``TorchRecStrategy``).
    ``meta.pt`` and the index are validated, and must agree, before any table is allocated.
    """
    path = Path(path)
    meta = read_meta(path)
    tables = meta["torchrec"]["tables"]
    check_tables(path, tables, stored_entries(path))
    whole = {t["key"]: torch.empty(t["rows"], t["dim"], dtype=TABLE_DTYPES[t.get("dtype", "float32")])
             for t in tables}
    load_sharded(path, whole)
    state = dict(meta["state_dict"])
    plain: dict[str, list[tuple[int, Tensor]]] = {}
    for t in tables:
        plain.setdefault(f"{t['layer']}.{t['plain_key']}", []).append((t["first_row"], whole[t["key"]]))
    for key, blocks in plain.items():
        blocks.sort(key=lambda block: block[0])
        expected = 0
        for first_row, value in blocks:
            if first_row != expected:
                raise _refuse(path, f"{META} tables of {key!r}", f"their rows do not follow each other (one starts "
                                                                f"at row {first_row}, the one before ends at {expected})")
            expected += value.shape[0]
        state[key] = torch.cat([value for _, value in blocks])
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
    try:
        checkpoint = consolidate(args.folder)
    except ValueError as error:
        parser.error(str(error))
    atomic_save(checkpoint, args.output)
    print(f"wrote {args.output}")


__all__ = ["is_sharded_checkpoint", "read_meta", "save_sharded", "load_sharded", "consolidate", "consolidated_file",
           "stored_keys", "stored_entries", "check_index", "check_tables", "ALLOWED_DTYPES", "TABLE_DTYPES"]


if __name__ == "__main__":
    main()
