"""``trainer.validate`` under ``strategy="ddp"`` (2 CPU ranks, gloo) when a task's labels are missing on some ranks.

Run by ``tests/evaluation/test_evaluation.py`` (Lightning's DDP re-launches this script
once per rank). Usage: ``python ddp_eval_skip.py OUT_DIR``. The validation
loader is a list of 2 batches, so the DistributedSampler gives batch 0 to
rank 0 and batch 1 to rank 1. Two runs:

* ``partial``: batch 0 has no conversion label (all -1), batch 1 has some;
* ``none``: neither batch has a conversion label.

Writes ``<run>_rank<R>.json`` per run and rank: the metrics ``validate`` returned,
the conversion AUC of batch 1 computed by hand, and the skip warnings seen.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.features import DenseFeature, SparseFeature


def batch(seed: int, conversion: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    clicks = (torch.rand(64, generator=g) < 0.5).float()
    converted = torch.where(clicks > 0, (torch.rand(64, generator=g) < 0.5).float(), torch.tensor(-1.0))
    return {
        "features": {"user_id": torch.randint(0, 20, (64,), generator=g), "x": torch.randn(64, generator=g)},
        "labels": {"click": clicks, "conversion": converted if conversion else torch.full((64,), -1.0)},
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tasks = [Task("click"), Task("conversion")]
    for run, second_has_labels in (("partial", True), ("none", False)):
        torch.manual_seed(0)
        model = SharedBottom([SparseFeature("user_id", 20, 4), DenseFeature("x")], tasks, bottom_hidden=(8,),
                             tower_hidden=(4,))
        module = MultiTaskLightningModule(model)
        batches = [batch(0, conversion=False), batch(1, conversion=second_has_labels)]
        trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
        with torch.no_grad():
            logits = module.model(batches[1]["features"])["conversion"]
        labels = batches[1]["labels"]["conversion"]
        keep = labels >= 0
        expected = float(binary_auroc(torch.sigmoid(logits[keep]), labels[keep].long())) if keep.any() else None
        skips = [str(w.message) for w in caught if "warned once per task and split" in str(w.message)]
        (out / f"{run}_rank{trainer.global_rank}.json").write_text(
            json.dumps({"metrics": metrics, "expected_conversion_auc": expected, "warnings": skips}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
