"""Write the checkpoint fixtures that ``tests/test_old_checkpoints.py`` loads and resumes.

These files pin what checkpoints written by an earlier version of the library
hold: loading them and resuming training from them must keep working after any
refactor ("checkpoints written before load"). They were written once, with the
code of commit ``807107a`` (``main`` before the module was split), by::

    PYTHONPATH=$PWD python tests/data/checkpoints/make_checkpoints.py

Do not run this again to make a failing test pass: a test that fails on these
files means checkpoints users already have no longer load or resume the same.
Run it only to add a new fixture (and then keep the old files).

What it writes next to itself:

* ``train.parquet``: 48 rows, ids, a string ``city`` column, two dense columns,
  click / conversion (-1 = no label on unclicked rows) / purchase / dwell labels;
* ``<name>.ckpt`` for each setup in ``SETUPS``: a ``MultiTaskLightningModule``
  trained 3 steps (batches of 16, so one epoch) on ``train.parquet`` with a
  ``ParquetDataModule``, saved by ``trainer.save_checkpoint``;
* ``batch.pt``: a fixed feature batch (the first 8 rows, already encoded);
* ``expected.pt``: for each setup, the ``predict_step`` outputs on ``batch.pt`` of
  the module loaded from its checkpoint (``"loaded"``) and of the same module
  after ``trainer.fit(ckpt_path=...)`` resumed for one more step (``"resumed"``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import ESCM, MMoE, SharedBottom
from mtl_lightning.losses import CounterfactualCVR

HERE = Path(__file__).resolve().parent
ROWS, BATCH, STEPS = 48, 16, 3

FEATURES = [SparseFeature("user_id", 20, 4), SparseFeature("item_id", 30, 4), DenseFeature("dense_0"),
            DenseFeature("dense_1")]
CLICK_TASKS = [Task("click"), Task("conversion", weight=2.0), Task("dwell", kind="regression")]
CVR_TASKS = [Task("ctr", label="click"), Task("cvr", label="conversion"), Task("ctcvr", label="purchase")]


def make_table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 20, rows), rng.integers(0, 30, rows)
    dense = rng.normal(size=(rows, 2)).astype(np.float32)
    click = (rng.random(rows) < 1 / (1 + np.exp(-(dense[:, 0] + (user % 3) - 1)))).astype(np.int64)
    converted = (rng.random(rows) < 0.4 + 0.1 * (item % 3)).astype(np.int64)
    conversion = np.where(click == 1, converted, -1)
    return pa.table({
        "user_id": user, "item_id": item, "city": np.array(["ams", "ber", "cph", "dub", "edi", "fra"])[user % 6],
        "dense_0": dense[:, 0], "dense_1": dense[:, 1], "click": click, "conversion": conversion,
        "purchase": click * converted, "dwell": (dense[:, 1] + 0.5 * click).astype(np.float32),
    })


def mmoe_gradnorm() -> MultiTaskLightningModule:
    """MMoE + GradNorm; its data module encodes ``city`` (vocabulary) and normalises ``dense_0`` (see ``DATA``)."""
    features = FEATURES + [SparseFeature("city", 7, 4)]  # 6 cities + the out-of-vocabulary id 0
    model = MMoE(features, CLICK_TASKS, num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    module = MultiTaskLightningModule(model, lr=0.01, tasks=CLICK_TASKS,
                                      weighting={"name": "gradnorm", "alpha": 1.5, "lr": 0.05})
    return module


def escm_dr() -> MultiTaskLightningModule:
    """ESCM with the doubly robust counterfactual CVR loss (imputation tower trained by the module)."""
    model = ESCM(FEATURES, CVR_TASKS, tower_hidden=(8,))
    module = MultiTaskLightningModule(model, lr=0.01, counterfactual=CounterfactualCVR("dr", imputation_weight=0.5))
    return module


def shared_bottom_sparse() -> MultiTaskLightningModule:
    """SharedBottom with ``sparse_embeddings=True`` (LazySparseAdam state for the tables) and a step scheduler."""
    model = SharedBottom(FEATURES, CLICK_TASKS, bottom_hidden=(8,), tower_hidden=(4,))
    module = MultiTaskLightningModule(model, lr=0.01, sparse_embeddings=True, sparse_lr=0.05, lr_scheduler="StepLR",
                                      lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5},
                                      lr_scheduler_interval="step")
    return module


SETUPS = {"mmoe_gradnorm": mmoe_gradnorm, "escm_dr": escm_dr, "shared_bottom_sparse": shared_bottom_sparse}
# the ParquetDataModule arguments of each setup (besides train, batch size and seed)
DATA: dict[str, dict[str, Any]] = {
    "mmoe_gradnorm": dict(tasks=CLICK_TASKS, features=FEATURES, categorical={"city": {"embedding_dim": 4}},
                          normalize=["dense_0"]),
    "escm_dr": dict(tasks=CVR_TASKS, features=FEATURES),
    "shared_bottom_sparse": dict(tasks=CLICK_TASKS, features=FEATURES),
}


def datamodule(train: Path, data: dict[str, Any]) -> ParquetDataModule:
    return ParquetDataModule(train=train, batch_size=BATCH, seed=7, progress=False, **data)


def trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def predictions(module: MultiTaskLightningModule, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in module.predict_step(batch, 0).items()}


def resumed_predictions(checkpoint: Path, train: Path, data: dict[str, Any],
                        batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load ``checkpoint``, resume its fit for one step on ``train`` (a copy of the fixture data) and predict."""
    module = MultiTaskLightningModule.load_from_checkpoint(checkpoint)
    trainer(STEPS + 1).fit(module, datamodule(train, data), ckpt_path=checkpoint)
    return predictions(module, batch)


def main(out: Path = HERE) -> None:
    torch.set_num_threads(1)
    train = out / "train.parquet"
    pq.write_table(make_table(), train)
    expected: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    batch: dict[str, Any] | None = None
    for name, setup in SETUPS.items():
        torch.manual_seed(0)
        module, data = setup(), DATA[name]
        dm = datamodule(train, data)
        trainer(STEPS).fit(module, dm)
        path = out / f"{name}.ckpt"
        module.trainer.save_checkpoint(path)
        if batch is None:  # the first setup's data module encodes city: every setup reads a subset of its features
            reader = ParquetDataModule(train=train, batch_size=8, shuffle=False, progress=False, **data)
            batch = {"features": next(iter(reader.dataset("train")))["features"]}
        loaded = predictions(MultiTaskLightningModule.load_from_checkpoint(path), batch)
        with tempfile.TemporaryDirectory() as tmp:  # the test resumes on a copy too: another partition path
            copy = Path(tmp) / "train.parquet"
            shutil.copy(train, copy)
            resumed = resumed_predictions(path, copy, data, batch)
        expected[name] = {"loaded": loaded, "resumed": resumed}
    torch.save(batch, out / "batch.pt")
    torch.save(expected, out / "expected.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
