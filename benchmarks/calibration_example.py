"""The calibration page's real run: a model trained on down-sampled negatives, then calibrated on the validation split.

The synthetic dataset (``datamodules.synthetic``) is written with ``--rows`` train rows (a quarter of that for
validation and test); the train split keeps every click but only ``--keep-negatives`` of the non-clicks, and the
click task is not told (no ``negative_sampling_rate``), so the model over-predicts on the unsampled validation and
test splits. A SharedBottom trains for ``--epochs`` epochs; then ``calibrate(..., method)`` fits isotonic and Platt
maps on the validation split. Printed: a Markdown table of the test split's click AUC, log-loss, NE, PCOC and ECE
before and after each map; written: the reliability diagram of the test split before and after isotonic
calibration (``--image``).

    python benchmarks/calibration_example.py                 # 80k train rows, 2 epochs, docs/images/calibration-reliability.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import ParquetDataModule  # noqa: E402
from datamodules.synthetic import write_synthetic  # noqa: E402
from mtl_lightning import MultiTaskLightningModule, Task, registry  # noqa: E402
from mtl_lightning.calibration import calibrate  # noqa: E402

METRICS = ("auc", "logloss", "ne", "pcoc", "ece")


def trainer() -> L.Trainer:
    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=80_000)
    parser.add_argument("--keep-negatives", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"
                                               / "calibration-reliability.png"))
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    paths = write_synthetic(folder, (args.rows, args.rows // 4, args.rows // 4))
    train = pq.read_table(paths["train"])
    rng = np.random.default_rng(0)
    kept = pc.or_(pc.equal(train["click"], 1), pc.less(rng.random(train.num_rows), args.keep_negatives))
    pq.write_table(train.filter(kept), paths["train"])
    train_rows = int(pc.sum(kept.cast("int64")).as_py())
    tasks = [Task("click")]
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], test=paths["test"], tasks=tasks,
                           labels=["conversion", "purchase", "dwell"], batch_size=1024, progress=False)
    dm.setup("fit")
    model = registry.create("shared_bottom", features=dm.features, tasks=tasks, bottom_hidden=(128, 64),
                            tower_hidden=(32,))
    module = MultiTaskLightningModule(model, lr=2e-3)
    L.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)
    rows, tables = {}, {}
    for name, method in (("uncalibrated", None), ("isotonic", "isotonic"), ("platt", "platt")):
        module.calibration = None
        if method is not None:
            calibrate(module, dm, method=method)
        rows[name] = trainer().test(module, dm, verbose=False)[0]
        tables[name] = module.test_evaluation.reliability_tables["click"]
    print(f"train rows {train_rows} of {args.rows} (negatives kept at {args.keep_negatives}), "
          f"validation and test rows {args.rows // 4} each\n")
    print("| test split, click | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[f'test/click/{m}']:.4f}" for m in METRICS) + " |")
    print("\nreliability (test split), uncalibrated then isotonic:")
    for name in ("uncalibrated", "isotonic"):
        print(tables[name].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    figure(tables["uncalibrated"], tables["isotonic"], Path(args.image))
    print(f"\nwrote {args.image}")


def figure(before, after, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.2), dpi=110)
    axes = fig.subplots(1, 2, sharey=True)
    for axis, table, title in ((axes[0], before, "uncalibrated"), (axes[1], after, "isotonic, fitted on val")):
        filled = table[table["rows"] > 0]
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
        axis.plot(filled["mean_predicted"], filled["observed_rate"], marker="o", label="model")
        for _, row in filled.iterrows():
            axis.annotate(f"{int(row['rows'])}", (row["mean_predicted"], row["observed_rate"]), fontsize=6,
                          textcoords="offset points", xytext=(3, -9))
        axis.set_title(f"test split, click: {title}", fontsize=10)
        axis.set_xlabel("mean predicted probability (bin)")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("observed click rate (bin)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
