"""Which files a split reads: a file, a folder, a glob, or a list of those.

The first layer of the reader: nothing here opens a Parquet file.

Folders are discovered the way pyarrow datasets and Spark read them:

* **Hidden names.** Below a given folder, and below the fixed prefix of a glob
  (its folders before the first wildcard), every file or folder whose name
  starts with ``_`` or ``.`` is skipped: Spark's ``_SUCCESS``,
  ``_common_metadata``, ``_temporary/`` (uncommitted task attempts),
  ``.part-*.inprogress.parquet`` and ``.crc`` checksums are never read. A file
  the user names explicitly (not through a folder or a wildcard) is read
  whatever its name: the rule is about discovery.
* **Each file once.** A file reached twice in one split (overlapping globs, a
  folder and a file inside it) is read once, where it is first met; files
  keep the order of the spec (a folder's files and a glob's matches sorted).
* **Hive partitions.** ``key=value`` folder names below the given folder (or
  below a glob's fixed prefix) become columns of every row of the files below
  them (``DataFile.partitions``). Values are URL-decoded and
  ``__HIVE_DEFAULT_PARTITION__`` is null (as pyarrow does). A key whose values
  are all integers (``day=3``) is an int64 column, one whose values are none
  (``day=2026-11-01``) a string column; a key with integers in some folders
  and other text in others is an error naming the file. Folders above the
  given folder, and the folders of an explicitly named file, are not
  partitions (as ``pyarrow.dataset`` without a ``partition_base_dir``).

The same rules hold for URIs (``s3://bucket/logs/day=*/``, ``gs://``,
``hdfs://``, ``abfs://``...; see ``datamodules.storage``): a URI is a file
or a folder as its filesystem lists it (an object store's "folder" is a key
prefix), a glob is expanded folder level by folder level from its fixed prefix
(one listing per matched folder, never a listing of the whole bucket; ``**``
lists below the folder it starts in; a URI with ``*``, ``?`` or ``[`` is always
a glob), and the ``DataFile`` of a remote file
has its URI as ``path`` and its ``Storage``. Listings are retried like reads.
"""

from __future__ import annotations

import glob as globlib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import unquote

import pyarrow.fs as pafs

from .storage import RetryPolicy, Storage, local_path, uri_scheme

PathSpec = str | Path | Sequence[str | Path]

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_INT64 = re.compile(r"[-+]?[0-9]{1,19}")
_WILDCARD = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Partition:
    """A Hive partition key of one file, from a ``name=value`` folder: a constant column of the file's rows."""

    name: str
    value: int | str | None  # None: Hive's null partition (``__HIVE_DEFAULT_PARTITION__``)
    dtype: str = "string"  # the key's type over the split: "int64" or "string"


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of a split and the Hive partition values of the folders it lies in.

    Formats as its path (``f"{file}"``) and is path-like (``os.fspath``), so it
    goes wherever a path does. A remote file's ``path`` is its URI (a ``str``)
    and ``storage`` the filesystem it is read through; a local file has
    ``storage=None``.
    """

    path: Path | str
    partitions: tuple[Partition, ...] = ()
    storage: Storage | None = None

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


def as_data_file(file: DataFile | str | Path) -> DataFile:
    """``file`` as a ``DataFile`` (a plain path or URI has no partitions; a URI is read with default options)."""
    if isinstance(file, DataFile):
        return file
    if uri_scheme(file) is not None:
        return DataFile(str(file), (), Storage(str(file)))
    return DataFile(Path(local_path(file) if isinstance(file, str) else file))


RawPartitions = tuple[tuple[str, str | None], ...]
Found = tuple[Path | str, RawPartitions]


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(("_", ".")) for part in parts)


def _raw_partitions(folders: Sequence[str], path: Path | str) -> RawPartitions:
    """``(key, value)`` of the ``key=value`` names among ``folders`` (the folders between the root and the file)."""
    found: dict[str, str | None] = {}
    for folder in folders:
        key, sep, value = folder.partition("=")
        if not (sep and key):
            continue
        key = unquote(key)
        if key in found:
            raise ValueError(f"{path}: partition key {key!r} appears twice in the file's folders")
        found[key] = None if value == HIVE_NULL else unquote(value)
    return tuple(found.items())


def _below(root: Path, found: Path) -> tuple[str, ...]:
    return found.parts[len(root.parts):]


def _discover(folder: Path, root: Path) -> tuple[list[tuple[Path, RawPartitions]], int]:
    """The ``*.parquet`` files below ``folder`` (sorted) whose names below ``root`` are not hidden, and how many were skipped."""
    files, skipped = [], 0
    for path in sorted(folder.rglob("*.parquet")):
        parts = _below(root, path)
        if _hidden(parts):
            skipped += 1
        elif path.is_file():
            files.append((path, _raw_partitions(parts[:-1], path)))
    return files, skipped


def _glob(pattern: str) -> list[tuple[Path, RawPartitions]]:
    """The files a glob matches, and the ``*.parquet`` files of the folders it matches (names below its fixed prefix)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path()
    files: list[tuple[Path, RawPartitions]] = []
    for match in sorted(Path(p) for p in globlib.glob(pattern, recursive=True)):
        below = _below(root, match)
        if _hidden(below):
            continue
        if match.is_dir():
            files.extend(_discover(match, root)[0])
        elif match.is_file():
            files.append((match, _raw_partitions(below[:-1], match)))
    return files


def _typed(files: list[Found], storages: Mapping[str, Storage] | None = None) -> list[DataFile]:
    # ``storages``: the Storage of each remote file, by URI
    """``DataFile``s whose partition values have one type per key over the split: int64 if all are integers, else string."""
    first: dict[str, tuple[bool, Path | str, str]] = {}  # key -> (is integer, first file with a value, that value)
    for path, raw in files:
        for key, value in raw:
            if value is None:
                continue
            integer = _INT64.fullmatch(value) is not None and -(2**63) <= int(value) < 2**63
            if key not in first:
                first[key] = (integer, path, value)
            elif first[key][0] != integer:
                kind = {True: "an integer", False: "not an integer"}
                raise ValueError(
                    f"{path}: partition {key}={value} is {kind[integer]}, but {first[key][1]} has {key}={first[key][2]} "
                    f"({kind[first[key][0]]}); a partition key must hold integers in every folder or in none"
                )
    typed = []
    for path, raw in files:
        partitions = []
        for key, value in raw:
            integer = key in first and first[key][0]
            partitions.append(Partition(key, int(value) if integer and value is not None else value,
                                        "int64" if integer else "string"))
        storage = (storages or {}).get(path) if isinstance(path, str) else None
        typed.append(DataFile(path, tuple(partitions), storage))
    return typed


# ------------------------------------------------------------------ remote
def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _relative(root: str, path: str) -> tuple[str, ...]:
    """The names of ``path`` below folder ``root`` (filesystem paths)."""
    rest = path[len(root):] if root else path
    return tuple(part for part in rest.split("/") if part)


def _remote_discover(storage: Storage, folder: str, root: str) -> tuple[list[Found], int]:
    """Like ``_discover``: the ``*.parquet`` files below filesystem folder ``folder`` (one recursive listing)."""
    files, skipped = [], 0
    entries = storage.list(storage.uri(folder), recursive=True)
    for info in sorted((i for i in entries if i.type == pafs.FileType.File and i.path.endswith(".parquet")),
                       key=lambda i: i.path):
        parts = _relative(root, info.path)
        if _hidden(parts):
            skipped += 1
        else:
            uri = storage.uri(info.path)
            files.append((uri, _raw_partitions(parts[:-1], uri)))
    return files, skipped


def _match(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether names ``parts`` match glob parts ``pattern`` (``**``: zero or more names, as ``glob(recursive=True)``)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[k:], pattern[1:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def _remote_glob(storage: Storage, pattern: str) -> list[Found]:
    """Like ``_glob`` for a URI: expanded level by level with one listing per matched folder; see the module docstring."""
    path = storage.path(pattern)
    parts = path.split("/")
    fixed = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
    root = "/".join(parts[:fixed])
    rest = parts[fixed:]
    level: list[tuple[str, pafs.FileType | None]] = [(root, pafs.FileType.Directory)]
    matches: list[tuple[str, pafs.FileType]] = []
    for i, part in enumerate(rest):
        if part == "**":  # everything below each folder reached so far, matched against the rest of the pattern
            for folder, _ in level:
                entries = storage.list(storage.uri(folder), recursive=True)
                matches += [(e.path, e.type) for e in entries if _match(_relative(folder, e.path), rest[i:])]
                if _match((), rest[i:]):
                    matches.append((folder, pafs.FileType.Directory))
            level = []
            break
        last = i == len(rest) - 1
        next_level: list[tuple[str, pafs.FileType | None]] = []
        for folder, kind in level:
            if kind not in (pafs.FileType.Directory, None):
                continue
            if not _WILDCARD.search(part):
                next_level.append((f"{folder}/{part}" if folder else part, None))
                continue
            for entry in storage.list(storage.uri(folder), recursive=False):
                if fnmatchcase(_name(entry.path), part) and (last or entry.type == pafs.FileType.Directory):
                    next_level.append((entry.path, entry.type))
        level = next_level
    for candidate, kind in level:
        matches.append((candidate, kind if kind is not None else storage.info(storage.uri(candidate)).type))
    files: list[Found] = []
    for found, kind in sorted(set(matches)):
        below = _relative(root, found)
        if _hidden(below):
            continue
        if kind == pafs.FileType.Directory:
            files.extend(_remote_discover(storage, found, root)[0])
        elif kind == pafs.FileType.File:
            uri = storage.uri(found)
            files.append((uri, _raw_partitions(below[:-1], uri)))
    return files


def _remote(item: str, storage: Storage) -> list[Found]:
    """The files of one URI item: a glob (a URI with ``*``, ``?`` or ``[``), a file or a folder."""
    if _WILDCARD.search(item):
        files = _remote_glob(storage, item)
        if not files:
            raise ValueError(f"{item}: no file or folder matches the glob (names starting with '_' or '.' below its "
                             "fixed folders are skipped)")
        return files
    info = storage.info(item)
    if info.type == pafs.FileType.Directory:
        folder = storage.path(item)
        files, skipped = _remote_discover(storage, folder, folder)
        if not files:
            hidden = f" ({skipped} under hidden names starting with '_' or '.' are skipped)" if skipped else ""
            raise ValueError(f"{item}: folder holds no .parquet file{hidden}")
        return files
    if info.type == pafs.FileType.File:
        return [(storage.uri(storage.path(item)), ())]
    raise ValueError(f"{item}: no such file or folder")


def resolve_paths(
    spec: PathSpec,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
    retry: RetryPolicy | None = None,
) -> list[DataFile]:
    """The data files of a split: from a file, a folder (every ``*.parquet`` below it, sorted), a glob, or a list of those.

    Hidden names (``_*``, ``.*``) below a folder or a glob's fixed prefix are
    skipped, a file reached twice is kept once (where first met), and
    ``key=value`` folders become partition columns; see the module docstring.
    Items may be URIs (``s3://...``), read through ``filesystem`` or fsspec
    with ``storage_options`` and retried with ``retry`` (``datamodules.storage``).
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: list[Found] = []
    storages: dict[str, Storage] = {}  # by scheme and host: one client per filesystem
    by_uri: dict[str, Storage] = {}
    for item in items:
        if uri_scheme(item) is not None:
            probe = Storage(str(item), storage_options, filesystem, retry)
            storage = storages.setdefault(probe.key, probe)
            files = _remote(str(item), storage)
            by_uri.update((uri, storage) for uri, _ in files)
            found.extend(files)
            continue
        item = local_path(item) if isinstance(item, str) else item
        path = Path(item)
        if path.is_dir():
            files, skipped = _discover(path, path)
            if not files:
                hidden = f" ({skipped} under hidden names starting with '_' or '.' are skipped)" if skipped else ""
                raise ValueError(f"{path}: folder holds no .parquet file{hidden}")
            found.extend(files)
        elif path.is_file():
            found.append((path, ()))
        else:
            files = _glob(str(item))
            if not files:
                raise ValueError(f"{item}: no such file, folder or matching glob (names starting with '_' or '.' "
                                 "below its fixed folders are skipped)")
            found.extend(files)
    unique: dict[Path | str, Found] = {}
    for path, raw in found:
        unique.setdefault(path if isinstance(path, str) else path.resolve(), (path, raw))
    return _typed(list(unique.values()), by_uri)
