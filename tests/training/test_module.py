"""MultiTaskLightningModule end to end: learning, logging, prediction, checkpoints."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from datamodules.synthetic import synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, Task, registry
from mtl_lightning.architectures import MMoE


SMALL = {
    "shared_bottom": dict(bottom_hidden=(64, 32), tower_hidden=(16,)),
    "mmoe": dict(num_experts=3, expert_hidden=(64, 32), tower_hidden=(16,)),
    "ple": dict(expert_hidden=(64, 32), tower_hidden=(16,)),
}


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple"])
def test_learns_synthetic_click(synthetic_paths, name, quiet_trainer, synthetic_datamodule):
    torch.manual_seed(0)
    dm = synthetic_datamodule(synthetic_paths)
    dm.setup("fit")
    model = registry.create(name, features=dm.features, tasks=synthetic_tasks(), **SMALL[name])
    module = MultiTaskLightningModule(model, lr=3e-3)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert metrics["val/click/auc"] >= 0.70
    assert metrics["val/conversion/auc"] >= 0.65
    assert metrics["val/dwell/mse"] < 1.0


def test_logs_per_task_metrics_and_predicts(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    torch.manual_seed(0)
    dm = synthetic_datamodule(synthetic_paths, batch_size=1024)
    dm.setup("fit")
    module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), **SMALL["mmoe"]), lr=3e-3)
    trainer = quiet_trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=5)
    trainer.fit(module, dm)
    logged = set(trainer.logged_metrics)
    for key in ["train/click/loss", "train/click/weight", "train/dwell/loss", "train/loss", "val/click/auc",
                "val/click/logloss", "val/conversion/auc", "val/dwell/mse", "val/dwell/mae", "val/loss"]:
        assert key in logged, key
    metrics = trainer.callback_metrics
    expected = metrics["val/click/logloss"] + metrics["val/conversion/logloss"] + metrics["val/dwell/mse"]
    assert torch.isclose(metrics["val/loss"], expected)
    test = trainer.test(module, dm, verbose=False)[0]
    assert test["test/click/auc"] > 0.7

    dm.paths["predict"] = dm.paths["test"]
    batches = trainer.predict(module, datamodule=dm)
    row_id = torch.cat([b["row_id"] for b in batches])
    assert row_id.tolist() == list(range(5_000))  # predictions line up with the predict file
    click = torch.cat([b["click"] for b in batches])
    assert ((click > 0) & (click < 1)).all()


def test_checkpoint_round_trip_predicts_the_same(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    torch.manual_seed(0)
    dm = synthetic_datamodule(synthetic_paths, batch_size=2048)
    dm.setup("fit")
    tasks = [Task("click"), Task("conversion", weight=2.0), Task("dwell", kind="regression")]
    module = MultiTaskLightningModule(MMoE(dm.features, tasks, **SMALL["mmoe"]), lr=3e-3, tasks=tasks)
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, dm)
    restored = MultiTaskLightningModule.load_from_checkpoint(checkpoint.best_model_path)  # no model argument
    assert isinstance(restored.model, MMoE) and restored.tasks == module.tasks
    module.eval(), restored.eval()
    batch = next(iter(dm.dataset("val")))
    with torch.no_grad():
        for task, value in module.predict_step(batch, 0).items():
            torch.testing.assert_close(restored.predict_step(batch, 0)[task], value)
    raw = torch.load(checkpoint.best_model_path, weights_only=True)  # plain data only
    assert raw["hyper_parameters"]["model"]["class_path"] == "mtl_lightning.architectures.mmoe.MMoE"


def test_rejects_bad_configuration(synthetic_paths, synthetic_datamodule):
    model = MMoE(synthetic_datamodule(synthetic_paths).prepare_features(), synthetic_tasks(),
                 **SMALL["mmoe"])
    with pytest.raises(ValueError, match=r"tasks \['ctcvr'\] are not outputs"):
        MultiTaskLightningModule(model, tasks=[Task("ctcvr")])
    with pytest.raises(ValueError, match="unknown optimizer"):
        MultiTaskLightningModule(model, optimizer="adamm")
    with pytest.raises(ValueError, match="unknown weighting"):
        MultiTaskLightningModule(model, weighting="nope")
    with pytest.raises(TypeError, match="MultiTaskArchitecture"):
        MultiTaskLightningModule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no label for task 'click'"):
        module = MultiTaskLightningModule(model)
        module.compute_losses({"click": torch.zeros(2)}, {})


def test_resume_from_an_end_of_epoch_checkpoint_is_exact(tmp_path, quiet_trainer, synthetic_datamodule):
    """ModelCheckpoint writes before the epoch counts as completed; the next epoch's order must still follow."""
    from datamodules.synthetic import write_synthetic

    paths = write_synthetic(tmp_path / "data", (3_000, 300, 300))

    def run(max_epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        dm = synthetic_datamodule(paths, batch_size=512)
        dm.setup("fit")
        module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(16,),
                                               tower_hidden=(8,)), lr=1e-2)
        quiet_trainer(max_epochs=max_epochs, enable_checkpointing=bool(callbacks), callbacks=list(callbacks)).fit(
            module, dm, ckpt_path=ckpt_path)
        return module

    # the checkpoint written at the end of epoch 0 of the 2-epoch run (a fit that ran to its end is not resumed)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    straight = run(2, callbacks=[checkpoint])
    resumed = run(2, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
