"""``MultiTaskLightningModule(embedding_lr=...)``: the dense-gradient embedding tables at a rate of their own."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.optim import build_optimizers

TABLE = "model.embedding.fused.dim16.weight"  # every table of the synthetic features (one fused table per width)


def module(**kwargs) -> MultiTaskLightningModule:
    torch.manual_seed(0)
    model = MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(16,), tower_hidden=(8,))
    return MultiTaskLightningModule(model, **kwargs)


def groups(m: MultiTaskLightningModule, optimizer: torch.optim.Optimizer) -> list[tuple[float, float, set[str]]]:
    names = {id(p): n for n, p in m.named_parameters()}
    return [(g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


def test_tables_form_their_own_group_at_embedding_lr():
    m = module(lr=1e-3, embedding_lr=0.05)
    (rest_lr, _, rest), (table_lr, table_decay, tables) = groups(m, m.configure_optimizers())
    assert (rest_lr, table_lr, table_decay) == (1e-3, 0.05, 0.0)
    assert tables == {TABLE}
    assert rest == {n for n, _ in m.named_parameters()} - {TABLE}

    # with weight decay: the two decay groups keep lr and exclude the tables; the tables' group decays only
    # with decay_embeddings
    m = module(lr=1e-3, embedding_lr=0.05, weight_decay=0.1)
    found = groups(m, m.configure_optimizers())
    assert [(lr, decay) for lr, decay, _ in found] == [(1e-3, 0.1), (1e-3, 0.0), (0.05, 0.0)]
    assert found[2][2] == {TABLE} and not any(TABLE in names for _, _, names in found[:2])
    m = module(lr=1e-3, embedding_lr=0.05, weight_decay=0.1, decay_embeddings=True)
    assert groups(m, m.configure_optimizers())[2][:2] == (0.05, 0.1)

    # without embedding_lr: one group at lr, as before the option existed (so older checkpoints resume)
    m = module(lr=1e-3)
    assert [(lr, names) for lr, _, names in groups(m, m.configure_optimizers())] == \
        [(1e-3, {n for n, _ in m.named_parameters()})]


def test_one_sgd_step_moves_tables_and_the_rest_by_their_own_rate():
    """SGD, every gradient 1: the tables move by -embedding_lr, every other parameter by -lr."""
    m = module(optimizer="sgd", lr=0.01, embedding_lr=0.5)
    optimizer = m.configure_optimizers()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for n, p in m.named_parameters():
        step = 0.5 if n == TABLE else 0.01
        torch.testing.assert_close(p.detach(), before[n] - step, rtol=0, atol=1e-6, msg=n)


def test_scheduler_scales_both_groups():
    m = module(lr=1e-3, embedding_lr=0.05, lr_scheduler="StepLR", lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5},
               lr_scheduler_interval="step")
    configured = m.configure_optimizers()
    configured["optimizer"].step()
    configured["lr_scheduler"]["scheduler"].step()
    assert [g["lr"] for g in configured["optimizer"].param_groups] == [5e-4, 0.025]


def test_checkpoint_resume_is_exact(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    """5 steps, a checkpoint, then one more step from the live optimizer and from the restored one: equal."""
    first = module(lr=3e-3, embedding_lr=0.03)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_steps=5, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        first, synthetic_datamodule(synthetic_paths, 2048))
    saved = torch.load(checkpoint.last_model_path, weights_only=False)
    assert [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]] == [3e-3, 0.03]

    restored = MultiTaskLightningModule.load_from_checkpoint(checkpoint.last_model_path)
    assert restored.hparams.embedding_lr == 0.03
    optimizer = restored.configure_optimizers()
    optimizer.load_state_dict(saved["optimizer_states"][0])
    live = first.trainer.optimizers[0]
    dm = synthetic_datamodule(synthetic_paths, 256)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for m, opt in ((first, live), (restored, optimizer)):
        opt.zero_grad()
        sum(m.compute_losses(m.model(batch["features"]), batch["labels"]).values()).backward()
        opt.step()
    table_moved = (restored.state_dict()[TABLE] != saved["state_dict"][TABLE]).any()
    assert table_moved
    for key, value in first.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize("value", [float("nan"), -0.1, float("inf")])
def test_bad_rate_refused(value):
    with pytest.raises(ValueError, match="embedding_lr must be a finite number >= 0"):
        module(embedding_lr=value)
    with pytest.raises(TypeError, match="embedding_lr must be a number"):
        module(embedding_lr="0.01")


def test_refused_with_sparse_tables_or_without_tables():
    with pytest.raises(ValueError, match="with sparse_embeddings=True the tables' rate is sparse_lr"):
        module(sparse_embeddings=True, embedding_lr=0.01)
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no embedding table this optimizer trains"):
        build_optimizers(list(linear.parameters()), embedding_lr=0.01)
    table = torch.nn.Embedding(3, 2)
    with pytest.raises(ValueError, match="their rate is sparse_lr"):
        build_optimizers([table.weight], sparse_tables=[table.weight], dense_tables=[table.weight], embedding_lr=0.1)
