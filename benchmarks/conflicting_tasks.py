"""Conflicting tasks: does the weighting strategy matter when the tasks pull the shared layer apart? (not a test)

The data (synthetic, Gaussian, known ground truth). ``x`` has ``DIM`` independent standard normal
columns. Three tasks read it along three unit directions:

* ``click`` (binary): ``P(y = 1) = sigmoid(3 <u_1, x>)``;
* ``conversion`` (binary): ``P(y = 1) = sigmoid(3 <u_2, x>)`` with ``u_2 = -0.8 u_1 + 0.6 v`` (``v`` a unit
  direction orthogonal to ``u_1``): cosine -0.8 with the click direction, so on a shared feature the two
  tasks' gradients point largely against each other;
* ``dwell`` (regression, unnormalised seconds): ``y = 30 <u_3, x> + N(0, 10^2)`` with ``u_3`` orthogonal to
  both: its squared error is in the hundreds while the binary losses are below 0.7, so under equal
  weights its gradient is two orders of magnitude larger.

The model is a shared bottom whose last shared layer has only ``--bottleneck`` units (default 2, fewer
than the three directions the tasks need), then one tower per task: the tasks compete for that layer's
units, the large-loss task pulls it towards ``u_3`` and the two binary tasks pull it towards opposite
sides. Every strategy trains the same model from the same initialisation (per seed) on the same data
(``--rows`` training rows, batch 256, Adam lr 3e-3, ``--epochs`` epochs), and is scored on a held-out
test set: AUC for the two binary tasks, R^2 for ``dwell``; ``static`` (equal weights) is the reference,
and each row shows the difference to it (a positive AUC difference means the strategy helped that task).

    python benchmarks/conflicting_tasks.py                      # every strategy, 2 seeds
    python benchmarks/conflicting_tasks.py --strategies static mgda --seeds 1

Writes ``benchmarks/results/conflicting_tasks.md`` (or ``--output``), rewritten after every strategy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import ParquetDataModule  # noqa: E402
from mtl_lightning import DenseFeature, MultiTaskLightningModule, Task  # noqa: E402
from mtl_lightning.architectures import SharedBottom  # noqa: E402
from mtl_lightning.weighting import STRATEGIES  # noqa: E402

DIM = 12
TASKS = [Task("click", kind="binary"), Task("conversion", kind="binary"), Task("dwell", kind="regression")]
FEATURES = [DenseFeature(f"x{k}") for k in range(DIM)]


def directions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``u_1``, ``u_2 = -0.8 u_1 + 0.6 v`` and ``u_3``: orthonormal ``u_1, v, u_3`` from a QR factorisation."""
    basis, _ = np.linalg.qr(np.random.RandomState(seed).randn(DIM, 3))
    u1, v, u3 = basis.T
    return u1, -0.8 * u1 + 0.6 * v, u3


def make_split(rows: int, seed: int) -> pa.Table:
    rng = np.random.RandomState(seed)
    x = rng.randn(rows, DIM).astype(np.float32)
    u1, u2, u3 = directions()
    click = (rng.rand(rows) < 1 / (1 + np.exp(-3 * x @ u1))).astype(np.float32)
    conversion = (rng.rand(rows) < 1 / (1 + np.exp(-3 * x @ u2))).astype(np.float32)
    dwell = (30 * x @ u3 + 10 * rng.randn(rows)).astype(np.float32)
    columns = {f"x{k}": x[:, k] for k in range(DIM)}
    columns.update(click=click, conversion=conversion, dwell=dwell)
    return pa.table(columns)


def train(strategy: str, seed: int, paths: dict[str, Path], epochs: int, bottleneck: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], test=paths["test"], features=FEATURES,
                           tasks=TASKS, batch_size=256, seed=seed)
    model = SharedBottom(FEATURES, TASKS, bottom_hidden=(32, bottleneck), tower_hidden=(16,))
    module = MultiTaskLightningModule(model, weighting=strategy, lr=3e-3)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, dm)
    result = trainer.test(module, dm, verbose=False)[0]
    return {"click": float(result["test/click/auc"]), "conversion": float(result["test/conversion/auc"]),
            "dwell": 1 - float(result["test/dwell/mse"]) / DWELL_VARIANCE}


DWELL_VARIANCE = 30.0 ** 2 + 10.0 ** 2  # Var(30 <u_3, x> + noise): R^2 = 1 - MSE / this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="*", help="default: every registered strategy")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--bottleneck", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "conflicting_tasks.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    strategies = args.strategies or sorted(STRATEGIES)
    strategies = ["static", *[s for s in strategies if s != "static"]]
    started = time.monotonic()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for split, rows, seed in (("train", args.rows, 1), ("val", 1024, 2), ("test", 8192, 3)):
            paths[split] = Path(tmp) / f"{split}.parquet"
            pq.write_table(make_split(rows, seed), paths[split])
        for strategy in strategies:
            results[strategy] = [train(strategy, seed, paths, args.epochs, args.bottleneck)
                                 for seed in range(args.seeds)]
            means = {k: statistics.mean(r[k] for r in results[strategy]) for k in ("click", "conversion", "dwell")}
            print(f"{strategy:<12} " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()), flush=True)
            write(args, results, time.monotonic() - started)


def write(args, results: dict[str, list[dict[str, float]]], seconds: float) -> None:
    command = " ".join(["python benchmarks/conflicting_tasks.py", *sys.argv[1:]])
    mean = {s: {k: statistics.mean(r[k] for r in runs) for k in ("click", "conversion", "dwell")}
            for s, runs in results.items()}
    base = mean["static"]
    lines = ["# Conflicting tasks: every weighting strategy against `static`", "",
             f"Produced by `{command}` ({args.seeds} seed(s), {args.epochs} epochs, {args.rows} training rows, "
             f"shared bottom (32, {args.bottleneck}), {seconds / 60:.0f} min on a shared 2-CPU machine). The data "
             "and why the tasks conflict: see the docstring of `benchmarks/conflicting_tasks.py` (click and "
             "conversion directions at cosine -0.8, an unnormalised regression task with a ~100x larger loss, a "
             f"{args.bottleneck}-unit shared layer). Test AUC (binary tasks) and R^2 (dwell), mean over seeds; "
             "in brackets the difference to `static`.", "",
             "| strategy | click AUC | conversion AUC | dwell R^2 | mean AUC - static |", "|---|---|---|---|---|"]
    order = sorted(mean, key=lambda s: -(mean[s]["click"] + mean[s]["conversion"]))
    for s in order:
        m = mean[s]
        gain = (m["click"] + m["conversion"] - base["click"] - base["conversion"]) / 2
        lines.append(f"| `{s}` | {m['click']:.4f} ({m['click'] - base['click']:+.4f}) | {m['conversion']:.4f} "
                     f"({m['conversion'] - base['conversion']:+.4f}) | {m['dwell']:.3f} "
                     f"({m['dwell'] - base['dwell']:+.3f}) | {gain:+.4f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
