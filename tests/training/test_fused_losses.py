"""The training step's fused per-task losses (``losses.fused``): the same numbers as ``masked_loss`` task by task,
and the same training, with the per-task path kept wherever the fused one does not apply."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import MMoE
from mtl_lightning.features import SequenceFeature, SparseFeature
from mtl_lightning.losses import masked_loss
from mtl_lightning.losses.fused import FusedTaskLosses

TASKS = [Task("dwell", kind="regression"), Task("click"), Task("conversion")]  # regression first: order restored


def outputs_and_labels(rows: int, seed: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    outputs = {t.name: (3 * torch.randn(rows, generator=g)).requires_grad_() for t in TASKS}
    labels = {"click": torch.randint(0, 2, (rows,), generator=g).float(),
              "conversion": torch.randint(-1, 2, (rows,), generator=g).float(),  # -1: ignored
              "dwell": torch.randn(rows, generator=g)}
    labels["dwell"][::3] = math.nan  # NaN: ignored
    return outputs, labels


@pytest.mark.parametrize("rows", [1, 5, 512, 4099])
def test_fused_losses_and_gradients_equal_masked_loss_bit_for_bit(rows):
    outputs, labels = outputs_and_labels(rows, rows)
    expected = torch.stack([masked_loss(outputs[t.name], labels[t.name], t.kind, -1) for t in TASKS])
    expected_grads = torch.autograd.grad((expected * torch.tensor([0.5, 1.0, 2.0])).sum(), list(outputs.values()))
    losses, valid = FusedTaskLosses(TASKS)(outputs, labels)
    grads = torch.autograd.grad((losses * torch.tensor([0.5, 1.0, 2.0])).sum(), list(outputs.values()))
    assert torch.equal(losses, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    counted = [int((~labels[t.name].isnan() & (labels[t.name] != -1)).sum()) for t in TASKS]
    assert valid.tolist() == counted


def test_a_task_without_valid_rows_is_an_exact_zero_that_keeps_the_graph():
    outputs, labels = outputs_and_labels(8, 0)
    labels["conversion"] = torch.full((8,), -1.0)
    losses, valid = FusedTaskLosses(TASKS, ignore_label=-1)(outputs, labels)
    assert losses[2].item() == 0.0 and valid[2].item() == 0 and losses.requires_grad
    (grad,) = torch.autograd.grad(losses[2], outputs["conversion"])
    assert torch.equal(grad, torch.zeros(8))


def test_ignore_label_none_keeps_every_label_but_nan():
    outputs, labels = outputs_and_labels(16, 1)
    labels["click"][0] = -1.0  # a label like any other with ignore_label=None
    expected = torch.stack([masked_loss(outputs[t.name], labels[t.name], t.kind, None) for t in TASKS])
    assert torch.equal(FusedTaskLosses(TASKS, ignore_label=None)(outputs, labels)[0], expected)


def test_only_default_losses_without_options_are_fused():
    assert FusedTaskLosses.supports(TASKS)
    for task in (Task("a", loss="focal"), Task("a", loss_options={"label_smoothing": 0.1}),
                 Task("a", kind="regression", loss="huber")):
        assert not FusedTaskLosses.supports([Task("b"), task])
        with pytest.raises(ValueError, match="only the default losses"):
            FusedTaskLosses([task])


def test_a_missing_label_is_named():
    outputs, labels = outputs_and_labels(4, 2)
    del labels["click"]
    with pytest.raises(ValueError, match="no label for task 'click'"):
        FusedTaskLosses(TASKS)(outputs, labels)


def feature_batch(rows: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ids, sequences and values for the synthetic features."""
    batch = {}
    for f in synthetic_features():
        if isinstance(f, SequenceFeature):
            batch[f.name] = torch.randint(0, f.vocab_size, (rows, f.max_len), generator=g)
        elif isinstance(f, SparseFeature):
            batch[f.name] = torch.randint(0, f.vocab_size, (rows,), generator=g)
        else:
            batch[f.name] = torch.randn(rows, generator=g)
    return batch


def train(module: MultiTaskLightningModule, batches: list[dict], fused: bool) -> list[float]:
    """Plain training steps through ``training_step`` (no Trainer); the total losses."""
    if not fused:
        module.fused_losses = None  # the per-task path
    optimizer = module.configure_optimizers()
    totals = []
    for i, batch in enumerate(batches):
        loss = module.training_step(batch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    return totals


@pytest.mark.parametrize("weighting", ["static", "uncertainty", "dwa"])
def test_training_with_fused_losses_equals_the_per_task_path(weighting):
    features, tasks = synthetic_features(), synthetic_tasks()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        batch = {"features": feature_batch(64, g),
                 "labels": {t.name: torch.randint(0, 2, (64,), generator=g).float() for t in tasks}}
        batch["labels"][tasks[-1].name][:10] = -1.0
        batches.append(batch)
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        modules.append(MultiTaskLightningModule(MMoE(features, tasks, num_experts=2, expert_hidden=(8,),
                                                     tower_hidden=(4,)), weighting=weighting))
    calls = []
    fused = modules[0].fused_losses
    modules[0].fused_losses = lambda *a: (calls.append(1), fused(*a))[1]  # type: ignore[assignment]
    assert train(modules[0], batches, fused=True) == train(modules[1], batches, fused=False)
    assert len(calls) == len(batches)
    for (name, a), b in zip(modules[0].state_dict().items(), modules[1].state_dict().values()):
        assert torch.equal(a, b), name


def test_strategies_reading_gradients_keep_one_graph_per_task():
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                           tower_hidden=()), weighting="pcgrad")
    assert module.fused_losses is not None and module.weighting.reads != "losses"
    module.fused_losses = lambda *a: pytest.fail("the fused losses must not serve a gradient strategy")  # type: ignore
    batch = {"features": feature_batch(8, torch.Generator().manual_seed(1)), "labels": {t.name: torch.ones(8) for t in synthetic_tasks()}}
    assert torch.isfinite(module.training_step(batch, 0))
    assert len(module.last_task_losses) == len(synthetic_tasks())
