"""``MultiTaskLightningModule(sparse_embeddings=True)``: SparseAdam for the tables, the optimizer for the rest."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.features import DenseFeature, SequenceFeature
from mtl_lightning.module import _check_sparse_strategy
from mtl_lightning.optim import CombinedOptimizer, LazySparseAdam
from mtl_lightning.weighting.static import Static

ROOT = Path(__file__).resolve().parents[2]


def module(sparse: bool, **kwargs) -> MultiTaskLightningModule:
    torch.manual_seed(0)
    model = MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(16,), tower_hidden=(8,))
    return MultiTaskLightningModule(model, sparse_embeddings=sparse, **kwargs)


def test_sparse_gradients_and_optimizers():
    m = module(True, lr=0.01, optimizer="adamw", weight_decay=0.1)
    embedding = m.model.embedding
    owners = ["user_id", "item_id", "category", "city"]  # the history shares item_id's table
    optimizer = m.configure_optimizers()
    assert isinstance(optimizer, CombinedOptimizer)
    sparse_adam, rest = optimizer.optimizers
    assert isinstance(sparse_adam, LazySparseAdam) and isinstance(rest, torch.optim.AdamW)  # a SparseAdam subclass
    assert [p for g in sparse_adam.param_groups for p in g["params"]] == embedding.embedding_parameters()
    assert embedding.embedding_parameters() == [embedding.fused["dim16"].weight]  # every table of this model: one weight
    assert len(optimizer.param_groups) == 3 and [g["weight_decay"] for g in rest.param_groups] == [0.1, 0.0]
    assert sparse_adam.param_groups[0]["lr"] == 0.01 == rest.param_groups[0]["lr"]  # sparse_lr defaults to lr
    faster = module(True, lr=0.01, sparse_lr=0.05).configure_optimizers().optimizers
    assert faster[0].param_groups[0]["lr"] == 0.05 and faster[1].param_groups[0]["lr"] == 0.01
    x = {}
    for f in synthetic_features():
        if isinstance(f, SequenceFeature):
            x[f.name] = torch.zeros(4, f.max_len, dtype=torch.long)
        else:
            x[f.name] = torch.zeros(4) if isinstance(f, DenseFeature) else torch.ones(4, dtype=torch.long)
    sum(v.sum() for v in m.model(x).values()).backward()
    assert all(p.grad.is_sparse for p in embedding.embedding_parameters())
    before = {n: embedding.table_weight(n).detach().clone() for n in owners}
    optimizer.step()
    for name in owners:
        changed = (embedding.table_weight(name).detach() != before[name]).any(dim=1).nonzero().flatten().tolist()
        assert changed == [1], name  # id 1: the only row this batch touched (history is all padding)


def test_first_step_equals_dense_adam(synthetic_paths, quiet_trainer, synthetic_datamodule):
    """From zero moments Adam moves a row by lr*g/(|g|+eps) and leaves rows without gradient alone: so does SparseAdam.

    (SparseAdam adds eps before the bias correction, Adam after it; a negligible eps makes both exactly lr*sign(g).)
    """
    runs, items = {}, {}
    for sparse in (False, True):
        m = module(sparse, lr=0.01, optimizer_kwargs={"eps": 1e-30})
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(m, synthetic_datamodule(synthetic_paths))
        runs[sparse], items[sparse] = m.model.state_dict(), m.model.embedding.table_weight("item_id").detach()
    initial = module(False).model.embedding.table_weight("item_id").detach()
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-5, atol=1e-7)
    moved = (items[True] != initial).any(1)
    assert 0 < int(moved.sum()) < len(moved)  # some rows moved, untouched rows stayed


def test_sparse_learns_as_well_as_dense(synthetic_paths, quiet_trainer, synthetic_datamodule):
    auc = {}
    for sparse in (False, True):
        m = module(sparse, lr=3e-3)
        trainer = quiet_trainer(max_epochs=2)
        trainer.fit(m, synthetic_datamodule(synthetic_paths))
        auc[sparse] = float(trainer.callback_metrics["val/click/auc"])
    assert auc[True] > 0.8 and abs(auc[True] - auc[False]) < 0.01, auc


def test_optimizer_state_and_checkpoint_round_trip(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    first = module(True, lr=3e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_steps=5, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        first, synthetic_datamodule(synthetic_paths, 2048))
    saved = torch.load(checkpoint.last_model_path, weights_only=False)
    state = saved["optimizer_states"][0]
    assert len(state["param_groups"]) == 2 and len(state["state"]) == len(list(first.parameters()))

    # the Lightning module comes back with sparse tables; its combined optimizer with SparseAdam's and Adam's state
    restored = MultiTaskLightningModule.load_from_checkpoint(checkpoint.last_model_path)
    assert restored.hparams.sparse_embeddings and restored.model.embedding.sparse
    optimizer = restored.configure_optimizers()
    optimizer.load_state_dict(state)
    sparse_adam, adam = optimizer.optimizers
    table = restored.model.embedding.fused["dim16"].weight  # every table of this model (user_id's rows included)
    assert sparse_adam.state[table]["step"] == 5 and torch.equal(
        sparse_adam.state[table]["exp_avg"], state["state"][0]["exp_avg"])
    assert all(p in adam.state for g in adam.param_groups for p in g["params"])

    # one more identical step from the live optimizer and from the restored one: identical parameters
    live = first.trainer.optimizers[0]
    dm = synthetic_datamodule(synthetic_paths, 256)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for m, opt in ((first, live), (restored, optimizer)):
        opt.zero_grad()
        sum(m.compute_losses(m.model(batch["features"]), batch["labels"]).values()).backward()
        opt.step()
    for key, value in first.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_refusals():
    class PerTaskGradients(Static):
        needs_embedding_gradients = True

    with pytest.raises(ValueError, match="sparse_embeddings=True cannot be combined with weighting 'PerTaskGradients'"):
        module(True, weighting=PerTaskGradients())
    _check_sparse_strategy(types.SimpleNamespace(world_size=1))  # single process: fine
    with pytest.raises(ValueError, match="only DDPStrategy with the gloo backend"):
        _check_sparse_strategy(types.SimpleNamespace(world_size=2))


def test_ddp_gloo_reduces_sparse_gradients(synthetic_paths, tmp_path):
    """Two CPU processes: the all-reduced sparse gradient equals the all-reduced dense one on both ranks, with the
    history mean-pooled and read by DIN (the four runs in turn in one launch of the two processes)."""
    script = ROOT / "tests" / "scripts" / "ddp_sparse.py"
    pairs = [("dense", "sparse"), ("din-dense", "din-sparse")]  # din: the history read by DIN
    done = subprocess.run([sys.executable, str(script), ",".join(m for pair in pairs for m in pair),
                           str(synthetic_paths["train"]), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for modes in pairs:
        runs = {(mode, rank): torch.load(tmp_path / f"{mode}-rank{rank}.pt") for mode in modes for rank in (0, 1)}
        reference = runs[modes[0], 0]["grads"]
        assert len(reference) == 2 and reference[0].abs().sum() > 0
        for (mode, rank), run in runs.items():
            for got, want in zip(run["grads"], reference):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        for key, value in runs[modes[1], 0]["state"].items():
            assert torch.equal(runs[modes[1], 1]["state"][key], value)  # the ranks stayed in sync
