"""GradientConflict: pairwise cosines of the tasks' shared gradients, on a toy with known gradients, under two
ranks, and in short fits with weighting strategies."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.callbacks import GradientConflict
from mtl_lightning.gradient_conflict import pairwise_cosines


def toy_losses(w: nn.Parameter) -> list[torch.Tensor]:
    """Linear losses with known gradients on w = (w1, w2): (3, 4), (-3, 1), (1, 1) and 0 (no signal)."""
    return [3 * w[0] + 4 * w[1], -3 * w[0] + w[1], w[0] + w[1] + 5, 0 * w.sum()]


def test_cosines_and_conflict_shares_by_hand():
    w = nn.Parameter(torch.tensor([0.7, -0.2]))
    callback = GradientConflict(every_n_steps=1)
    cosines = callback.measure(["a", "b", "c", "d"], toy_losses(w), [w])
    # cos(a, b) = (-9 + 4) / (5 sqrt 10); cos(a, c) = 7 / (5 sqrt 2); cos(b, c) = -2 / (sqrt 10 sqrt 2); d has none
    assert cosines == pytest.approx({"a-b": -1 / math.sqrt(10), "a-c": 7 / (5 * math.sqrt(2)),
                                     "b-c": -2 / math.sqrt(20)}, abs=1e-12)
    assert w.grad is None  # measuring leaves the parameters' gradients alone
    # a second step where b agrees with a: a-b conflicted on 1 of 2 measured steps
    callback.measure(["a", "b", "c", "d"], [3 * w[0] + 4 * w[1], 3 * w[0] + 4 * w[1], w[0] + w[1], 0 * w.sum()], [w])
    assert callback.conflicts == {"a-b": 1, "a-c": 0, "b-c": 1} and callback.measured == {"a-b": 2, "a-c": 2, "b-c": 2}
    assert math.isnan(pairwise_cosines(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))[0, 1])


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        w = nn.Parameter(torch.tensor([0.7, -0.2]))
        # rank 0: gradients (3, 4) and (-3, 1); rank 1: (1, 0) and (5, 1); means (2, 2) and (1, 1): cosine 1
        losses = [3 * w[0] + 4 * w[1], -3 * w[0] + w[1]] if rank == 0 else [w[0], 5 * w[0] + w[1]]
        results[rank] = GradientConflict(every_n_steps=1).measure(["a", "b"], losses, [w])["a-b"]
    finally:
        dist.destroy_process_group()


def test_two_ranks_measure_the_cosine_of_the_averaged_gradients():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
    # each rank alone would see -1/sqrt(10) and 0.98; the global batch's gradients agree exactly
    assert results[0] == pytest.approx(1.0, abs=1e-12) and results[1] == pytest.approx(1.0, abs=1e-12)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        GradientConflict(every_n_steps=0)
    with pytest.raises(ValueError, match="parameters must be one of"):
        GradientConflict(parameters="all")


class _CountingConflict(GradientConflict):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def measure(self, *args, **kwargs):
        self.calls += 1
        return super().measure(*args, **kwargs)


@pytest.mark.parametrize("weighting", ["static", "uncertainty", "pcgrad"])
def test_short_fit_logs_every_pair_on_measured_steps_only(synthetic_paths, synthetic_datamodule, quiet_trainer,
                                                         tmp_path, weighting):
    dm = synthetic_datamodule(synthetic_paths, batch_size=2048)
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(dm.features, dm.tasks, num_experts=2, expert_hidden=(8,),
                                           tower_hidden=(4,)), weighting=weighting)
    callback = _CountingConflict(every_n_steps=3, parameters="last_shared" if weighting == "pcgrad" else "shared")
    trainer = quiet_trainer(max_steps=7, limit_val_batches=0, callbacks=[callback], log_every_n_steps=1,
                            logger=CSVLogger(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert callback.calls == 3  # steps 0, 3 and 6 of 7
    pairs = ["click-conversion", "click-dwell", "conversion-dwell"]
    assert sorted(callback.measured) == sorted(pairs) and all(n == 3 for n in callback.measured.values())
    for pair in pairs:
        cosine = trainer.callback_metrics[f"train/conflict/{pair}/cosine"].item()
        share = trainer.callback_metrics[f"train/conflict/{pair}/share"].item()
        assert -1 <= cosine <= 1 and cosine == pytest.approx(callback.last_cosines[pair], abs=1e-6)
        assert share == pytest.approx(callback.conflicts[pair] / 3)
    # the counts resume with the checkpoint
    restored = GradientConflict()
    restored.load_state_dict(callback.state_dict())
    assert restored.measured == callback.measured and restored.batches == 7


def test_measuring_leaves_training_unchanged(synthetic_paths, synthetic_datamodule, quiet_trainer):
    """The per-task gradients are taken with autograd.grad, never into .grad: a fit with the callback ends on the
    same parameters as one without."""
    states = []
    conflict = GradientConflict(every_n_steps=2)
    for callbacks in ([], [conflict]):
        dm = synthetic_datamodule(synthetic_paths, batch_size=2048)
        torch.manual_seed(0)
        module = MultiTaskLightningModule(MMoE(dm.features, dm.tasks, num_experts=2, expert_hidden=(8,),
                                               tower_hidden=(4,)), weighting="gradnorm")
        quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=callbacks).fit(module, datamodule=dm)
        states.append({k: v.detach().clone() for k, v in module.named_parameters()})
    assert conflict.measured == {"click-conversion": 2, "click-dwell": 2, "conversion-dwell": 2}  # steps 0 and 2
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
