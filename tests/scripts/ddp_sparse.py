"""Standalone 2-process CPU DDP run (gloo) for tests/training/test_sparse_embeddings.py; Lightning re-launches this script.

    python tests/scripts/ddp_sparse.py MODE[,MODE...] TRAIN_PARQUET OUT_DIR    # MODE: dense|sparse|din-dense|din-sparse

For each mode in turn, in the same two processes (one launch, one process group), trains MMoE for two steps with ``sparse_embeddings`` off or on (``din-``: the click history read by DIN with
the candidate item as query instead of mean-pooled) and saves, per
rank, the item_id table's gradient as the optimizer sees it (after DDP's
all-reduce) at each step and the final parameters.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from datamodules import ParquetDataModule  # noqa: E402
from datamodules.synthetic import synthetic_features, synthetic_tasks  # noqa: E402
from mtl_lightning import MultiTaskLightningModule  # noqa: E402
from mtl_lightning.architectures import MMoE  # noqa: E402


class GrabGradients(L.Callback):
    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(pl_module.model.embedding.table_grad("item_id").clone())


def main() -> None:
    modes, train, out = sys.argv[1].split(","), sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    for mode in modes:
        run(mode, train, out)


def run(mode: str, train: str, out: Path) -> None:
    torch.manual_seed(0)
    features = synthetic_features()
    if mode.startswith("din-"):
        features = [replace(f, pooling="din", query="item_id") if f.name == "history" else f for f in features]
    model = MMoE(features, synthetic_tasks(), num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    module = MultiTaskLightningModule(model, lr=1e-2, sparse_embeddings=mode.endswith("sparse"),
                                      optimizer_kwargs={"eps": 1e-12})
    dm = ParquetDataModule(train=train, tasks=synthetic_tasks(), features=features, batch_size=256)
    grab = GrabGradients()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[grab], limit_val_batches=0,
    )
    trainer.fit(module, dm)
    torch.save({"grads": grab.grads, "state": module.model.state_dict()}, out / f"{mode}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
