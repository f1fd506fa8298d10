"""Which files a split reads: a file, a folder, a glob, or a list of those.

The first layer of the reader: nothing here opens a Parquet file.
"""

from __future__ import annotations

import glob as globlib
from pathlib import Path
from typing import Sequence

PathSpec = str | Path | Sequence[str | Path]


def resolve_paths(spec: PathSpec) -> list[Path]:
    """Files from a file, a folder (every ``*.parquet`` below it, sorted), a glob, or a list of those."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise ValueError(f"{path}: folder holds no .parquet file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(p) for p in globlib.glob(str(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"{item}: no such file, folder or matching glob")
            files.extend(matches)
    return files

