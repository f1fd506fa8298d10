"""The training step hands values to Lightning's logger only on the steps it writes."""

from __future__ import annotations

import csv

import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE


def test_train_logs_only_on_written_steps(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    torch.manual_seed(0)
    model = MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(8,), tower_hidden=())
    module = MultiTaskLightningModule(model)
    calls, shown = [], []
    original, original_log = module.log_dict, module.log
    module.log_dict = lambda values, **kw: (calls.append(sorted(values)), original(values, **kw))[1]
    module.log = lambda name, value, **kw: (kw.get("prog_bar") and shown.append(name), original_log(name, value, **kw))[1]
    trainer = quiet_trainer(max_steps=12, limit_val_batches=0, logger=CSVLogger(tmp_path), log_every_n_steps=5)
    trainer.fit(module, synthetic_datamodule(synthetic_paths, batch_size=256))
    # steps 5 and 10 (0-based 4 and 9), which the logger writes, and the last one (for callbacks); the total loss is
    # logged on its own, for the progress bar (log_dict logs each of its values through log, prog_bar=False)
    assert len(calls) == 3 and "train/click/loss" in calls[0] and "train/click/weight" in calls[0]
    assert shown == ["train/loss"] * 3
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [4, 9]  # what the logger writes is unchanged
    assert float(trainer.callback_metrics["train/loss"]) > 0
    assert all(float(r["train/click/loss"]) > 0 for r in rows)


def test_train_logs_only_the_last_step_when_the_logger_writes_none(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    # log_every_n_steps=0: Lightning writes no on-step value, callbacks still find train/... at the end
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                           tower_hidden=()))
    calls, shown = [], []
    original, original_log = module.log_dict, module.log
    module.log_dict = lambda values, **kw: (calls.append(sorted(values)), original(values, **kw))[1]
    module.log = lambda name, value, **kw: (kw.get("prog_bar") and shown.append(name), original_log(name, value, **kw))[1]
    trainer = quiet_trainer(max_steps=6, limit_val_batches=0, logger=CSVLogger(tmp_path), log_every_n_steps=0)
    trainer.fit(module, synthetic_datamodule(synthetic_paths, batch_size=256))
    assert len(calls) == 1 and "train/click/loss" in calls[0] and shown == ["train/loss"]
    assert float(trainer.callback_metrics["train/loss"]) > 0


def test_barebones_trainer_trains_without_logging(synthetic_paths, quiet_trainer, synthetic_datamodule):
    # Trainer(barebones=True) (Lightning's speed mode, log_every_n_steps=0) discards self.log: nothing is handed over
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                           tower_hidden=()))
    before = [p.detach().clone() for p in module.parameters()]
    calls = []
    module.log_dict = lambda values, **kw: calls.append(sorted(values))
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, barebones=True, logger=None, enable_checkpointing=None,
                            enable_progress_bar=None, enable_model_summary=None)
    trainer.fit(module, synthetic_datamodule(synthetic_paths, batch_size=256))
    assert trainer.global_step == 4 and calls == []
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_compile_model_switch_compiles_in_place():
    model = MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(8,), tower_hidden=())
    keys = set(model.state_dict())
    module = MultiTaskLightningModule(model, compile_model=True)
    assert model._compiled_call_impl is None  # nothing happens before training starts
    module.setup("fit")
    module.setup("validate")  # compiled once
    assert model._compiled_call_impl is not None and module.model is model
    assert set(model.state_dict()) == keys  # checkpoints keep their keys
    assert MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks()), compile_model=False).hparams[
        "compile_model"] is False


def test_adam_uses_the_fused_kernel_unless_told_otherwise():
    from mtl_lightning import MultiTaskLightningModule, registry
    from datamodules.synthetic import synthetic_features, synthetic_tasks

    def optimizer(**kwargs):
        model = registry.create("mmoe", features=synthetic_features(4), tasks=synthetic_tasks(), num_experts=2,
                                expert_hidden=(8,), tower_hidden=(4,))
        return MultiTaskLightningModule(model, **kwargs).configure_optimizers()

    assert optimizer().defaults["fused"] is True
    assert optimizer(optimizer="adamw").defaults["fused"] is True
    assert not optimizer(optimizer_kwargs={"foreach": True}).defaults["fused"]  # the user's choice wins
    assert not optimizer(optimizer_kwargs={"fused": False}).defaults["fused"]
    combined = optimizer(sparse_embeddings=True)  # the dense part of sparse training is fused too
    assert [o.defaults.get("fused") for o in combined.optimizers] == [None, True]
