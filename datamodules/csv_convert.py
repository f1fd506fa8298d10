"""Published CSV layouts to Parquet: the shared part of the Ali-CCP and AliExpress converters.

:func:`convert_csv` reads one CSV with pyarrow, checks that the expected
columns are there with the expected kinds (integer ids, numbers, 0/1 labels),
and writes Parquet with int64 ids, float32 dense values and float32 labels, plus
the project's funnel labels: ``conversion`` (conversion given click: the
purchase label on clicked rows, ``-1`` -- no label -- elsewhere) next to
``purchase`` (the click-and-conversion label over every impression). A row
with a purchase but no click is refused. Errors name the file, the column and
the problem.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def _read(path: Path) -> pa.Table:
    try:
        table = pacsv.read_csv(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{path}: cannot read it as CSV with a header row ({error})") from None
    if table.num_rows == 0:
        raise ValueError(f"{path}: file is empty (0 rows)")
    return table


def convert_csv(
    source: str | Path, target: str | Path, click: str, purchase: str, sparse: Sequence[str], dense: Sequence[str],
    keys: Sequence[str] = (),
) -> Path:
    """Write ``target`` (Parquet) from ``source`` (CSV); see the module docstring. Returns ``target``."""
    source, target = Path(source), Path(target)
    table = _read(source)
    missing = [c for c in [click, purchase, *keys, *sparse, *dense] if c not in table.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing} of the published layout "
                         f"(columns: {table.column_names[:12]}{' ...' if table.num_columns > 12 else ''})")
    columns: dict[str, pa.Array] = {}
    for name in [*keys, *sparse]:
        column = table.column(name)
        if not pa.types.is_integer(column.type) or column.null_count:
            raise ValueError(f"{source}: column {name!r} must hold integer ids with no empty cell, got {column.type} "
                             f"with {column.null_count} empty cells")
        if name in sparse and (pc.min(column).as_py() or 0) < 0:
            raise ValueError(f"{source}: column {name!r} has a negative id ({pc.min(column).as_py()})")
        columns[name] = column.cast(pa.int64())
    for name in dense:
        column = table.column(name)
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            raise ValueError(f"{source}: column {name!r} must hold numbers, got {column.type}")
        columns[name] = column.cast(pa.float32())
    labels = {}
    for name in (click, purchase):
        column = table.column(name)
        values = column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False) if (
            pa.types.is_integer(column.type) or pa.types.is_floating(column.type)) else None
        if values is None or column.null_count or not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"{source}: label column {name!r} must hold 0/1 in every row (type {column.type})")
        labels[name] = values.astype(np.float32)
    bad = int(((labels[purchase] == 1) & (labels[click] == 0)).sum())
    if bad:
        raise ValueError(f"{source}: {bad} rows have {purchase!r} = 1 where {click!r} = 0; a conversion needs a click")
    columns["click"] = pa.array(labels[click])
    columns["conversion"] = pa.array(np.where(labels[click] == 1, labels[purchase], -1.0).astype(np.float32))
    columns["purchase"] = pa.array(labels[purchase])
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), target)
    return target


def sample_main(argv: list[str] | None, prog: str, description: str | None, splits: Sequence[str],
                download: Callable[[Path, str], dict[str, Path]], convert: Callable[[Path, Path], Path],
                base_url: str, download_help: str, base_url_help: str, convert_help: str) -> None:
    """The ``download`` / ``convert`` command line of a public sample's module (``datamodules.ali_ccp``, ...)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help=download_help)
    fetch.add_argument("out_dir", type=Path)
    fetch.add_argument("--base-url", default=base_url, help=base_url_help)
    local = commands.add_parser("convert", help=convert_help)
    for split in splits:
        local.add_argument(split, type=Path)
    local.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            paths = download(args.out_dir, args.base_url)
        else:
            paths = {split: convert(getattr(args, split), args.out_dir / f"{split}.parquet") for split in splits}
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for split, path in paths.items():
        print(f"{split}: {path}")
