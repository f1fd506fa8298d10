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
"""

from __future__ import annotations

import glob as globlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

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
    goes wherever a path does.
    """

    path: Path
    partitions: tuple[Partition, ...] = ()

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


def as_data_file(file: DataFile | str | Path) -> DataFile:
    """``file`` as a ``DataFile`` (a plain path has no partitions)."""
    return file if isinstance(file, DataFile) else DataFile(Path(file))


RawPartitions = tuple[tuple[str, str | None], ...]


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(("_", ".")) for part in parts)


def _raw_partitions(folders: Sequence[str], path: Path) -> RawPartitions:
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


def _typed(files: list[tuple[Path, RawPartitions]]) -> list[DataFile]:
    """``DataFile``s whose partition values have one type per key over the split: int64 if all are integers, else string."""
    first: dict[str, tuple[bool, Path, str]] = {}  # key -> (is integer, first file with a value, that value)
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
        typed.append(DataFile(path, tuple(partitions)))
    return typed


def resolve_paths(spec: PathSpec) -> list[DataFile]:
    """The data files of a split: from a file, a folder (every ``*.parquet`` below it, sorted), a glob, or a list of those.

    Hidden names (``_*``, ``.*``) below a folder or a glob's fixed prefix are
    skipped, a file reached twice is kept once (where first met), and
    ``key=value`` folders become partition columns; see the module docstring.
    """
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: list[tuple[Path, RawPartitions]] = []
    for item in items:
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
    unique: dict[Path, tuple[Path, RawPartitions]] = {}
    for path, raw in found:
        unique.setdefault(path.resolve(), (path, raw))
    return _typed(list(unique.values()))
