"""ExcessMTL on Census-Income, step by step: its excess-risk estimates, their baselines ``e(0)`` and the weights.

One MMoE run under the protocol of ``benchmarks/quality.py`` (batch 512, Adam lr 1e-3, early stopping on
``val/loss`` with patience 2, test AUC of the best validation checkpoint), with ``ExcessMTL(step_size,
warmup_steps)``. Prints the untrained model's mean prediction per task, then, per epoch, each task's baseline ``e(0)`` at its end, the mean of its estimates ``e`` over the
epoch, the mean ratio ``e / e(0)`` the exponentiated step used (0 while the baseline is unknown) and the
weights at the end of the epoch; then the test AUCs.

    python benchmarks/excess_mtl_trace.py --data-dir /path/to/census-income                    # the default
    python benchmarks/excess_mtl_trace.py --data-dir /path/to/census-income --warmup-steps 98  # e(0) over epoch 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from quality import add_domain, build_model, run  # noqa: E402

from datamodules.census import census_source, prepare_census  # noqa: E402
from mtl_lightning.weighting.excess_mtl import ExcessMTL  # noqa: E402


class TracedExcessMTL(ExcessMTL):
    """ExcessMTL that records, for every update, the estimates, the baselines before and after it and the weights."""

    def __init__(self, step_size: float = 0.01, warmup_steps: int = 1) -> None:
        super().__init__(step_size, warmup_steps)
        self.trace: list[tuple[list[float], ...]] = []

    def update(self, risks: torch.Tensor) -> None:
        used = self.initial_risks.tolist()
        super().update(risks)
        self.trace.append((risks.tolist(), used, self.initial_risks.tolist(), self.weights.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="the Census folder (as quality.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    paths, features, tasks = prepare_census(census_source(args.data_dir), Path(tempfile.mkdtemp(prefix="census-")))
    features = add_domain(paths, features)
    L.seed_everything(args.seed, verbose=False)
    model, _ = build_model("mmoe", features, tasks)
    untrained = _mean_predictions(model, paths["train"], features, [t.name for t in tasks])
    strategy = TracedExcessMTL(args.step_size, args.warmup_steps)
    aucs = run(model, tasks, paths, features, args.seed, args.max_epochs, weighting=strategy)
    names = [t.name for t in tasks]
    steps_per_epoch = _steps_per_epoch(paths["train"])
    print(f"ExcessMTL(step_size={args.step_size}, warmup_steps={args.warmup_steps}), seed {args.seed}, "
          f"{steps_per_epoch} steps per epoch")
    print("untrained model on the training split: " + ", ".join(
        f"{n} mean prediction {p:.3f} (positive rate {y:.3f})" for n, (p, y) in untrained.items()))
    print("epoch | " + " | ".join(f"{n}: e(0), mean e, mean e/e(0), weight" for n in names))
    for epoch, start in enumerate(range(0, len(strategy.trace), steps_per_epoch)):
        rows = strategy.trace[start:start + steps_per_epoch]
        cells = []
        for i in range(len(names)):
            risks = [r[0][i] for r in rows]
            ratios = [r[0][i] / r[1][i] if r[1][i] > 0 else 0.0 for r in rows]
            cells.append(f"{rows[-1][2][i]:.3f}, {sum(risks) / len(risks):.3f}, {sum(ratios) / len(ratios):.3f}, "
                         f"{rows[-1][3][i]:.4g}")
        print(f"{epoch} | " + " | ".join(cells))
    print("test AUC: " + ", ".join(f"{n} {aucs[n]:.4f}" for n in names))


def _mean_predictions(model, train_path: Path, features: list, names: list[str]) -> dict[str, tuple[float, float]]:
    """Each task's mean predicted probability and positive rate on the training split (eval mode, RNG untouched)."""
    table = pq.read_table(train_path)
    state = torch.get_rng_state()
    model.eval()
    with torch.no_grad():
        outputs = model({f.name: torch.from_numpy(table[f.name].to_numpy()) for f in features})
    model.train()
    torch.set_rng_state(state)
    labels = {n: table[n].to_numpy() for n in names}
    return {n: (float(torch.sigmoid(outputs[n]).mean()), float(labels[n].mean())) for n in names}


def _steps_per_epoch(train_path: Path, batch_size: int = 512) -> int:
    return -(-pq.ParquetFile(train_path).metadata.num_rows // batch_size)


if __name__ == "__main__":
    main()
