"""``trainer.validate`` under ``strategy="ddp"`` (2 CPU ranks, gloo) with uneven shards and sample weights.

Run by ``tests/evaluation/test_calibration_metrics.py`` (Lightning's DDP re-launches this script once per rank).
Usage: ``python ddp_calibration_metrics.py OUT_DIR``. Rank 0 validates :func:`shards` ``[0]`` (two batches of
40 and 25 rows), rank 1 ``[1]`` (one batch of 17 rows); each batch has sample weights for ``click``, the
regression task ``dwell`` and the 3-class ``genre`` task, and a ``scenario`` tensor. Writes ``metrics_rank<R>.json`` (what ``validate`` returned)
and ``reliability_rank<R>.json`` (the click task's reliability table).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.features import DenseFeature, SparseFeature

TASKS = [Task("click"), Task("dwell", kind="regression"), Task("genre", kind="multiclass", num_classes=3)]


def module() -> MultiTaskLightningModule:
    torch.manual_seed(0)
    model = SharedBottom([SparseFeature("user_id", 20, 4), DenseFeature("x")], TASKS, bottom_hidden=(8,),
                         tower_hidden=(4,))
    return MultiTaskLightningModule(model, ece_bins=5)


def batch(seed: int, rows: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, generator=g)
    clicks = (torch.rand(rows, generator=g) < torch.sigmoid(2 * x)).float()
    clicks[:2] = -1.0  # ignored rows
    genre = torch.bucketize(x + 0.5 * torch.randn(rows, generator=g), torch.tensor([-0.5, 0.5])).float()
    genre[2] = -1.0  # an ignored row
    out = {
        "features": {"user_id": torch.randint(0, 20, (rows,), generator=g), "x": x},
        "labels": {"click": clicks, "dwell": torch.round(3 * x + torch.randn(rows, generator=g)), "genre": genre},
        "weights": {"click": torch.rand(rows, generator=g) * 2, "genre": torch.rand(rows, generator=g) * 2},
        "scenario": torch.randint(0, 2, (rows,), generator=g),
    }
    out["weights"]["dwell"] = torch.rand(rows, generator=g) * 2
    return out


def shards() -> list[list[dict]]:
    return [[batch(0, 40), batch(1, 25)], [batch(2, 17)]]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trained = module()
    metrics = trainer.validate(trained, DataLoader(shards()[rank], batch_size=None), verbose=False)[0]
    (out / f"metrics_rank{trainer.global_rank}.json").write_text(json.dumps(metrics))
    table = trained.val_evaluation.reliability_tables["click"]
    (out / f"reliability_rank{trainer.global_rank}.json").write_text(table.to_json(orient="records"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
