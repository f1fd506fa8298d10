"""Serving benchmark: the throughput benchmark's MMoE exported in every format and table / dense dtype (not a test).

Trains the MMoE of ``benchmarks/throughput.py`` (16 sparse features of 10 to 100,000 ids, a 50,000-id history,
embedding dim 16: 4.29M of its 4.73M parameters are tables) for one epoch on the benchmark dataset
(``bench_data``), writes a test split of other rows (seed 2), then exports it as ONNX, TorchScript and a
``torch.export`` program (AOTInductor-compiled where a C++ compiler is present) with tables in float32, float16
and INT8 (dense float32), and INT8 tables with float16 dense weights. Every export writes its verification report
(``mtl_lightning.verification``) on the test split; this script collects them into one table: file size (and its
ratio to the float32 file of the same format), per-task AUC of the export, the largest AUC drop and probability
difference against the float32 PyTorch model, and latency p50 / p99 per call with one thread for batch sizes 1,
64 and 512 in the format's runtime.

    .venv/bin/python benchmarks/serving.py                                  # every format
    .venv/bin/python benchmarks/serving.py --formats onnx torchscript       # some (results merge into the table)

Writes ``benchmarks/results/serving.json`` (every report, merged with earlier runs of other formats) and
``benchmarks/results/serving.md`` (the table of docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_data  # noqa: E402
import throughput  # noqa: E402

from datamodules import ParquetDataModule  # noqa: E402
from mtl_lightning import MultiTaskLightningModule  # noqa: E402
from mtl_lightning.export import export_onnx, export_program, export_torchscript  # noqa: E402

DTYPES = [("float32", "float32"), ("float16", "float32"), ("int8", "float32"), ("int8", "float16")]
EXPORTS = {"onnx": (export_onnx, ".onnx"), "torchscript": (export_torchscript, ".pt"), "program": (export_program, ".pt2")}
RESULTS = ROOT / "benchmarks" / "results"


def test_split(train_rows: int, rows: int) -> Path:
    """A test split of the benchmark dataset (other rows: seed 2), cached beside its train split."""
    path = bench_data.dataset(train_rows)["train"].parent / f"test-{rows}.parquet"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        pq.write_table(bench_data.make_table(rows, seed=2), tmp, row_group_size=1 << 17)
        tmp.rename(path)
    return path


def train(args: argparse.Namespace) -> tuple[MultiTaskLightningModule, ParquetDataModule, str]:
    """The trained module (its weights cached under ``benchmarks/.cache/``, so that a run of other formats reuses
    them), the data module and how the weights were obtained."""
    features, tasks = throughput.features_and_tasks("mmoe")
    paths = bench_data.dataset(args.train_rows)
    torch.manual_seed(0)
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], test=test_split(args.train_rows, args.test_rows),
                           features=features, tasks=tasks, batch_size=args.batch_size, seed=0)
    module = MultiTaskLightningModule(throughput.build_model("mmoe", features, tasks), lr=2e-3)
    cached = bench_data.CACHE / f"serving-mmoe-{args.train_rows}-{args.epochs}-{args.batch_size}.pt"
    if cached.exists():
        module.model.load_state_dict(torch.load(cached, weights_only=True))
        return module.eval(), dm, f"weights cached in {cached.name}"
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    torch.save(module.model.state_dict(), cached)
    return module.eval(), dm, f"trained in {time.perf_counter() - start:.0f} s"


def table(reports: dict[str, dict]) -> str:
    """The Markdown table of the collected reports (format order, then dtype order)."""
    lines = ["| format | tables | dense | file MB | vs float32 | AUC click / conversion | max AUC drop "
             "| max prob. diff | p50 / p99 ms, batch 1 | batch 64 | batch 512 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in EXPORTS:
        base = reports.get(f"{kind}/float32/float32")
        for tables, dense in DTYPES:
            r = reports.get(f"{kind}/{tables}/{dense}")
            if r is None:
                continue
            auc = [r["outputs"][t]["exported"]["auc"] for t in ("click", "conversion")]
            drop = max(e.get("auc_drop", 0.0) for e in r["outputs"].values())
            ratio = f"{r['file_bytes'] / base['file_bytes']:.3f}x" if base else "–"
            latency = [f"{r['latency_ms'][b]['p50']:.3f} / {r['latency_ms'][b]['p99']:.3f}" for b in ("1", "64", "512")]
            lines.append(f"| {kind} (`.{r['served_file'].split('.', 1)[1]}`) | {tables} | {dense} | "
                         f"{r['file_bytes'] / 1e6:.2f} | {ratio} | {auc[0]:.4f} / {auc[1]:.4f} | {drop:+.5f} | "
                         f"{r['max_probability_difference']:.1e} | {' | '.join(latency)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="*", default=list(EXPORTS), choices=list(EXPORTS))
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--test-rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS / "serving.md")
    args = parser.parse_args()
    module, dm, how = train(args)
    print(how, flush=True)
    saved = args.output.with_suffix(".json")
    reports = json.loads(saved.read_text())["reports"] if saved.exists() else {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.formats:
            export, suffix = EXPORTS[kind]
            for tables, dense in DTYPES:
                start = time.perf_counter()
                path = Path(folder) / f"mmoe-{tables}-{dense}{suffix}"
                export(module, path, datamodule=dm, table_dtype=tables, dense_dtype=dense,
                       verification=dict(latency_runs=args.latency_runs))
                reports[f"{kind}/{tables}/{dense}"] = json.loads((path.parent / f"{path.name}.verification.json").read_text())
                print(f"{kind} {tables}/{dense}: {time.perf_counter() - start:.0f} s", flush=True)
    machine = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
               f"torch threads available, latency with 1")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"machine": machine, "train_rows": args.train_rows, "test_rows": args.test_rows,
                                 "epochs": args.epochs, "reports": reports}, indent=1))
    text = table(reports)
    args.output.write_text(f"# Serving benchmark (benchmarks/serving.py)\n\n{machine}; MMoE trained {args.epochs} "
                           f"epoch(s) on {args.train_rows:,} rows, compared on {args.test_rows:,} test rows.\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
