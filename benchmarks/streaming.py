"""Streaming throughput and peak memory of ``ParquetDataModule(streaming=True)`` (not a test).

For each dataset size the synthetic dataset is written to Parquet (in pieces,
so the writer never holds it), then a fresh Python process streams one training
epoch (shuffle buffer, whole batches) and reports rows/s and its peak resident
memory (``VmHWM`` of ``/proc/self/status``: unlike ``ru_maxrss`` it is not
inherited from the parent across ``exec``). With ``--in-memory`` the same epoch is also read by the
in-memory mode for contrast. Peak RSS of the streaming mode must not grow with
the dataset size: it is bounded by the shuffle buffer and the read chunk.

    .venv/bin/python benchmarks/streaming.py                      # 2 sizes, streaming only
    .venv/bin/python benchmarks/streaming.py --sizes 400000 2000000 --in-memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

PIECE = 200_000


def _status_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process in MiB, from ``/proc/self/status`` (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_dataset(directory: Path, rows: int, row_group: int) -> None:
    from datamodules.synthetic import make_table

    directory.mkdir(parents=True, exist_ok=True)
    for piece, start in enumerate(range(0, rows, PIECE)):
        table = make_table(min(PIECE, rows - start), seed=piece)
        pq.write_table(table, directory / f"part-{piece:04d}.parquet", row_group_size=row_group)


def measure(directory: Path, streaming: bool, batch_size: int, shuffle_buffer: int, read_rows: int) -> dict:
    import torch

    from datamodules import ParquetDataModule
    from datamodules.synthetic import synthetic_features, synthetic_tasks

    torch.set_num_threads(1)
    baseline = _status_mib("VmRSS")
    dm = ParquetDataModule(train=directory, tasks=synthetic_tasks(), features=synthetic_features(),
                           batch_size=batch_size, streaming=streaming, shuffle_buffer=shuffle_buffer,
                           read_rows=read_rows)
    start = time.perf_counter()
    dm.setup("fit")
    rows = batches = 0
    for batch in dm.dataset("train"):
        rows += len(batch["row_id"])
        batches += 1
    seconds = time.perf_counter() - start
    return {"rows": rows, "batches": batches, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_mib": _status_mib("VmHWM"),
            "rss_after_imports_mib": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[400_000, 2_000_000])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-buffer", type=int, default=65_536)
    parser.add_argument("--read-rows", type=int, default=65_536)
    parser.add_argument("--row-group", type=int, default=50_000)
    parser.add_argument("--in-memory", action="store_true", help="also time the in-memory mode")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="streaming", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:  # child process: one measurement, printed as JSON
        result = measure(args.measure, args.mode == "streaming", args.batch_size, args.shuffle_buffer, args.read_rows)
        print(json.dumps(result))
        return
    small = min(args.sizes)
    if small < 5 * args.shuffle_buffer:
        print(f"note: the smallest size {small} is under 5 x shuffle_buffer ({5 * args.shuffle_buffer})")
    modes = ["streaming"] + (["in-memory"] if args.in_memory else [])
    print(f"batch_size={args.batch_size} shuffle_buffer={args.shuffle_buffer} read_rows={args.read_rows} "
          f"row_group={args.row_group}")
    print(f"{'mode':>10} {'rows':>10} {'x buffer':>8} {'rows/s':>10} {'peak RSS MiB':>13} {'RSS after imports':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            directory = Path(tmp) / f"rows{rows}"
            write_dataset(directory, rows, args.row_group)
            for mode in modes:
                command = [sys.executable, __file__, "--measure", str(directory), "--mode", mode,
                           "--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer),
                           "--read-rows", str(args.read_rows)]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                assert result["rows"] == rows, result
                print(f"{mode:>10} {rows:>10} {rows / args.shuffle_buffer:>8.1f} {result['rows_per_s']:>10,.0f} "
                      f"{result['peak_rss_mib']:>13.0f} {result['rss_after_imports_mib']:>18.0f}")


if __name__ == "__main__":
    main()
