"""Streaming throughput from a local S3 server beside local disk, the same files, the same run (not a test).

Writes the synthetic dataset to Parquet on local disk, uploads the same files
to moto's S3 server started on 127.0.0.1 (``tests/s3_server.py``: the server
the test suite uses), then streams one training epoch
(``ParquetDataModule(streaming=True)``, no model) from each source, in turn:

* ``local``: the folder on disk;
* ``s3 (fsspec)``: ``s3://`` through s3fs, ``storage_options=`` (the default way);
* ``s3 (pyarrow)``: ``s3://`` through ``filesystem=pyarrow.fs.S3FileSystem(...)``.

Each is timed from ``setup`` (listing and footers included) to the last batch,
with ``--workers`` DataLoader workers, ``--repeats`` times in a rotating order.
moto's server is a single Python process serving from memory, so the S3 rows
measure this library's remote path plus that server's HTTP handling on the same
machine, not a cloud store's bandwidth or latency.

    .venv/bin/python benchmarks/object_store.py                     # 400,000 rows, 0 and 2 workers
    .venv/bin/python benchmarks/object_store.py --rows 1000000 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3_server import CREDENTIALS, S3Server  # noqa: E402

PIECE = 200_000


def write_dataset(directory: Path, rows: int, row_group: int) -> list[Path]:
    from datamodules.synthetic import make_table

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for piece, start in enumerate(range(0, rows, PIECE)):
        path = directory / f"day=2026-11-0{piece % 9 + 1}" / f"part-{piece:04d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(make_table(min(PIECE, rows - start), seed=piece), path, row_group_size=row_group)
        paths.append(path)
    return paths


def epoch(train: str, workers: int, batch_size: int, **source) -> tuple[int, float]:
    from datamodules import ParquetDataModule
    from datamodules.synthetic import synthetic_features, synthetic_tasks

    start = time.perf_counter()
    dm = ParquetDataModule(train=train, tasks=synthetic_tasks(), features=synthetic_features(), batch_size=batch_size,
                           streaming=True, num_workers=workers, **source)
    dm.setup("fit")
    rows = sum(len(batch["row_id"]) for batch in dm.train_dataloader())
    return rows, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--row-group", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    server = S3Server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "logs"
            paths = write_dataset(local, args.rows, args.row_group)
            s3 = server.filesystem()
            s3.mkdir("bench")
            s3.pipe({f"bench/logs/{p.relative_to(local).as_posix()}": p.read_bytes() for p in paths})
            size = sum(p.stat().st_size for p in paths) / 2**20
            native = pafs.S3FileSystem(endpoint_override=server.endpoint.removeprefix("http://"), scheme="http",
                                       access_key=CREDENTIALS["key"], secret_key=CREDENTIALS["secret"],
                                       region="us-east-1")
            sources = {
                "local disk": (str(local), {}),
                "s3 (fsspec)": ("s3://bench/logs/day=*/", {"storage_options": server.storage_options}),
                "s3 (pyarrow)": ("s3://bench/logs/day=*/", {"filesystem": native}),
            }
            print(f"{args.rows:,} rows in {len(paths)} files ({size:.1f} MiB), row groups of {args.row_group:,}, "
                  f"batch {args.batch_size}")
            print("| source | workers | rows/s (each repeat) | best rows/s |")
            print("|---|---|---|---|")
            for workers in args.workers:
                results: dict[str, list[float]] = {name: [] for name in sources}
                names = list(sources)
                for repeat in range(args.repeats):
                    for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                        train, options = sources[name]
                        rows, seconds = epoch(train, workers, args.batch_size, **options)
                        assert rows == args.rows, (name, rows)
                        results[name].append(rows / seconds)
                for name, rates in results.items():
                    each = ", ".join(f"{r:,.0f}" for r in rates)
                    print(f"| {name} | {workers} | {each} | {max(rates):,.0f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
