"""2-process CPU (gloo) runs of ``TorchRecStrategy`` for ``tests/distributed/test_torchrec.py``; Lightning re-launches this script.

    python tests/scripts/torchrec_two_ranks.py DATA_DIR OUT_DIR

1. ``equivalence``: MMoE (with a mean-pooled sequence sharing a sparse table
   and a max-pooled one), HMoE (multi-scenario) and ESMM, each under
   ``table_wise``, ``column_wise`` and ``data_parallel`` sharding, trained
   ``STEPS`` steps with SGD on tables and dense part alike; rank ``r`` gets
   rows ``[r * half, (r + 1) * half)`` of :func:`global_batch` ``k % 2`` at
   step ``k``. Writes ``<arch>-<sharding>.ckpt`` (checkpoint folders) and per-rank
   losses ``losses-<arch>-<sharding>-rank<R>.json``.
2. ``every_architecture``: every registered architecture trained ``table_wise``
   (losses per rank, for the loss-goes-down check).
3. ``deferred``: MMoE built with deferred tables, saved before training
   (see :func:`deferred`).
4. ``parquet``: MMoE from a ``ParquetDataModule``, ``table_wise``, row-wise
   Adagrad: two epochs with a checkpoint folder per epoch (``straight/``), the
   same run resumed from the first one (``resumed/``), the first checkpoint
   validated under ``column_wise`` sharding, and prediction over a split whose
   two shards have different numbers of batches. Writes ``parquet-rank<R>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datamodules import ParquetDataModule  # noqa: E402
from datamodules.synthetic import synthetic_features, synthetic_tasks  # noqa: E402
from mtl_lightning import MultiTaskLightningModule, SequenceFeature, registry  # noqa: E402
from mtl_lightning.distributed import TorchRecStrategy  # noqa: E402
from tests.architectures.test_architectures import arguments, feature_batch  # noqa: E402

STEPS, GLOBAL_BATCH, LR = 6, 64, 0.05
EVERY_STEPS = 12
ARCHITECTURES = ("mmoe", "hmoe", "esmm")
SHARDINGS = ("table_wise", "column_wise", "data_parallel")
TAGS = SequenceFeature("tags", 20, max_len=3, embedding_dim=8, pooling="max")


def build(name: str) -> MultiTaskLightningModule:
    """The architecture ``name`` (MMoE with a max-pooled sequence too), seeded, trained by SGD at ``LR``."""
    torch.manual_seed(0)
    kwargs = mmoe_arguments() if name == "mmoe" else arguments(name)
    return MultiTaskLightningModule(registry.create(name, **kwargs), lr=LR, optimizer="sgd")


def mmoe_arguments() -> dict:
    kwargs = arguments("mmoe")
    return {**kwargs, "features": [*kwargs["features"], TAGS]}


def global_batch(step: int, size: int = GLOBAL_BATCH) -> dict:
    """Step ``step``'s batch over all ranks: every feature of every architecture, labels of every task, none ignored."""
    x = feature_batch(size, seed=100 + step)
    g = torch.Generator().manual_seed(200 + step)
    x["tags"] = torch.randint(0, 20, (size, 3), generator=g)
    x["tags"][::5] = 0  # all padding: pools to zeros
    click = ((x["user"] + x["item"]) % 3 == 0).float()
    labels = {"click": click, "conversion": (x["item"] % 2).float(), "dwell": x["price"] * 0.5,
              "purchase": click * (x["item"] % 2).float()}
    labels.update(ctr=labels["click"], cvr=labels["conversion"], ctcvr=labels["purchase"],
                  repurchase=labels["purchase"] * (x["user"] % 2).float())
    return {"features": x, "labels": labels}


def rank_batch(batch: dict, rank: int, world_size: int = 2) -> dict:
    half = len(batch["labels"]["click"]) // world_size
    take = slice(rank * half, (rank + 1) * half)
    return {part: {k: v[take] for k, v in batch[part].items()} for part in ("features", "labels")}


class RankBatches(L.LightningDataModule):
    """Rank ``r`` trains on its half of every :func:`global_batch`, in order."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader([rank_batch(global_batch(k % 2), rank, world) for k in range(STEPS)], batch_size=None)


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def quiet(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})


def equivalence(out: Path) -> None:
    for name in ARCHITECTURES:
        for sharding in SHARDINGS:
            plan: str | dict = sharding
            if name == "mmoe" and sharding == "data_parallel":  # the max-pooled table cannot be data_parallel
                plan = {"user": "data_parallel", "item": "data_parallel", "tags": "table_wise"}
            record = RecordLosses()
            trainer = quiet(strategy=TorchRecStrategy(sharding=plan, embedding_optimizer="sgd", embedding_lr=LR,
                                                      find_unused_parameters=True),
                            max_steps=STEPS, use_distributed_sampler=False, callbacks=[record])
            trainer.fit(build(name), datamodule=RankBatches())
            trainer.save_checkpoint(out / f"{name}-{sharding}.ckpt")
            (out / f"losses-{name}-{sharding}-rank{trainer.global_rank}.json").write_text(json.dumps(record.losses))


#: (architecture, inputs) pairs of :func:`every_architecture`: every architecture with the plain input and with a
#: DIN-encoded group of aligned sequences (its tables in the EmbeddingCollection), three with a DCN-v2 interaction
EVERY = [*((name, inputs) for inputs in ("plain", "din_group") for name in registry.names()),
         *((name, "dcn_v2") for name in ("mmoe", "ple", "star"))]


def every_architecture(out: Path) -> None:
    """Every pair of :data:`EVERY`, ``table_wise`` on 2 ranks, Adam on the dense part, row-wise Adagrad on the
    tables, ``EVERY_STEPS`` steps over the two batches of :class:`RankBatches`; writes
    ``losses-every-<arch>-<inputs>-rank<R>.json``."""
    for name, inputs in EVERY:
        torch.manual_seed(0)
        module = MultiTaskLightningModule(registry.create(name, **arguments(name, inputs)), lr=0.03)
        record = RecordLosses()
        trainer = quiet(strategy=TorchRecStrategy(sharding="table_wise", embedding_lr=0.1,
                                                  find_unused_parameters=name == "escm"),
                        max_steps=EVERY_STEPS, max_epochs=-1, use_distributed_sampler=False, callbacks=[record])
        trainer.fit(module, datamodule=RankBatches())
        (out / f"losses-every-{name}-{inputs}-rank{trainer.global_rank}.json").write_text(json.dumps(record.losses))


def deferred(out: Path) -> None:
    """MMoE built inside ``trainer.init_module()`` (deferred tables), rank ``r`` seeded with ``r``; saved before any step.

    Writes ``deferred-<sharding>.ckpt`` for ``column_wise`` and ``table_wise``:
    both must hold rank 0's dense part and the tables' ``initial_rows`` for rank
    0's ``table_seed`` (the ranks agree on it; the values do not depend on the sharding).
    """
    for sharding in ("column_wise", "table_wise"):
        trainer = quiet(strategy=TorchRecStrategy(sharding=sharding, embedding_optimizer="sgd", embedding_lr=LR),
                        max_steps=0, use_distributed_sampler=False)
        torch.manual_seed(trainer.global_rank)
        with trainer.init_module():
            module = MultiTaskLightningModule(registry.create("mmoe", **mmoe_arguments()), lr=LR, optimizer="sgd")
        assert module.model.embedding.deferred
        trainer.fit(module, datamodule=RankBatches())
        trainer.save_checkpoint(out / f"deferred-{sharding}.ckpt")


def parquet(data: Path, out: Path) -> None:
    features = synthetic_features(embedding_dim=8, max_history=5)

    def datamodule() -> ParquetDataModule:
        return ParquetDataModule(train=data / "train.parquet", val=data / "val", predict=data / "val",
                                 tasks=synthetic_tasks(), features=features, batch_size=100)

    def module() -> MultiTaskLightningModule:
        torch.manual_seed(0)
        model = registry.create("mmoe", features=features, tasks=synthetic_tasks(), num_experts=2,
                                expert_hidden=(16,), tower_hidden=(8,))
        return MultiTaskLightningModule(model, lr=3e-3)

    def strategy(sharding: str = "table_wise") -> TorchRecStrategy:
        return TorchRecStrategy(sharding=sharding, embedding_optimizer="rowwise_adagrad", embedding_lr=0.05)

    results = {}
    straight = ModelCheckpoint(dirpath=out / "straight", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = quiet(strategy=strategy(), max_epochs=2, callbacks=[straight], enable_checkpointing=True,
                    num_sanity_val_steps=0)
    trainer.fit(module(), datamodule())
    results["straight"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    resumed = ModelCheckpoint(dirpath=out / "resumed", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = quiet(strategy=strategy(), max_epochs=2, callbacks=[resumed], enable_checkpointing=True,
                    num_sanity_val_steps=0)
    trainer.fit(module(), datamodule(), ckpt_path=out / "straight" / "epoch=0.ckpt")
    results["resumed"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    trainer = quiet(strategy=strategy())
    results["first_epoch_table_wise"] = trainer.validate(module(), datamodule(), verbose=False,
                                                         ckpt_path=out / "straight" / "epoch=0.ckpt")[0]
    trainer = quiet(strategy=strategy("column_wise"))
    results["first_epoch_column_wise"] = trainer.validate(module(), datamodule(), verbose=False,
                                                          ckpt_path=out / "straight" / "epoch=0.ckpt")[0]
    trainer = quiet(strategy=strategy("column_wise"))
    predictions = trainer.predict(module(), datamodule(), ckpt_path=out / "straight" / "epoch=1.ckpt")
    results["predicted_rows"] = sorted(int(i) for p in predictions for i in p["row_id"])
    results["predicted_batches"] = len(predictions)
    (out / f"parquet-rank{trainer.global_rank}.json").write_text(json.dumps(results))


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    equivalence(out)
    every_architecture(out)
    deferred(out)
    parquet(data, out)


if __name__ == "__main__":
    main()
