"""Group AUC: the formula against hand counts, the metric across batches and DDP ranks, the module's logging."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.synthetic import synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from datamodules import read_split
from mtl_lightning.metrics import GroupAUC, group_auc



def _hand_rows():
    """Four users; the expected GAUC is worked out in test_group_auc_hand_count."""
    rows = [
        # (group, score, label)
        (42, 0.9, 1), (42, 0.2, 0), (42, 0.5, 0),                 # AUC 1 (2 of 2 pairs), n = 3
        (7, 0.3, 1), (7, 0.8, 0), (7, 0.1, 0), (7, 0.6, 1),       # 0.3>0.1, 0.6>0.1; 0.3<0.8, 0.6<0.8: AUC 2/4, n = 4
        (1000, 0.4, 1), (1000, 0.7, 1),                           # one class only: skipped
        (3, 0.5, 1), (3, 0.5, 0), (3, 0.2, 0),                    # tie counts 1/2: (0.5 + 1)/2 = 0.75, n = 3
        (9, 0.1, 0),                                              # one row: skipped
    ]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))  # groups interleaved
    rows = [rows[i] for i in order]
    groups, scores, labels = zip(*rows)
    return torch.tensor(scores), torch.tensor(labels, dtype=torch.float32), torch.tensor(groups)


def test_group_auc_hand_count():
    scores, labels, groups = _hand_rows()
    expected = (3 * 1.0 + 4 * 0.5 + 3 * 0.75) / (3 + 4 + 3)  # = 0.725
    assert group_auc(scores, labels, groups).item() == pytest.approx(expected, abs=1e-12)
    # AUC uses only the order of the scores: logits give the same value as probabilities
    logits = torch.logit(scores)
    assert group_auc(logits, labels, groups).item() == pytest.approx(expected, abs=1e-12)


def _pairwise_gauc(scores, labels, groups) -> float:
    """Brute force: every (positive, negative) pair of a group; ties count one half."""
    total, weight = 0.0, 0
    for g in groups.unique().tolist():
        rows = groups == g
        pos, neg = scores[rows & (labels == 1)].tolist(), scores[rows & (labels == 0)].tolist()
        if not pos or not neg:
            continue
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
        total += int(rows.sum()) * wins / (len(pos) * len(neg))
        weight += int(rows.sum())
    return total / weight


def test_group_auc_matches_pairwise_count_with_ties():
    generator = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 40, (600,), generator=generator)
    scores = torch.randint(0, 6, (600,), generator=generator).float()  # many ties
    labels = (torch.rand(600, generator=generator) < 0.3).float()
    assert group_auc(scores, labels, groups).item() == pytest.approx(_pairwise_gauc(scores, labels, groups), abs=1e-12)


def test_group_auc_without_two_class_group_is_nan_and_rejects_bad_shapes():
    assert torch.isnan(group_auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 1.0]), torch.tensor([0, 0])))
    with pytest.raises(ValueError, match="three \\(N,\\) tensors"):
        group_auc(torch.rand(3), torch.ones(2), torch.zeros(3, dtype=torch.long))


def test_metric_accumulates_batches():
    scores, labels, groups = _hand_rows()
    metric = GroupAUC()
    for chunk in torch.arange(len(scores)).split(4):  # groups straddle batches
        metric.update(scores[chunk], labels[chunk], groups[chunk])
    assert metric.compute().item() == pytest.approx(0.725, abs=1e-6)


def _ddp_worker(rank: int, world_size: int, port: int, scores, labels, groups, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = GroupAUC()
        rows = torch.arange(rank, len(scores), world_size)  # each rank sees every other row: users split across ranks
        metric.update(scores[rows], labels[rows], groups[rows])
        out[rank] = metric.compute().item()
    finally:
        dist.destroy_process_group()


def test_metric_is_global_under_ddp():
    scores, labels, groups = _hand_rows()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, scores, labels, groups, out), nprocs=2, join=True)
    assert out[0] == pytest.approx(0.725, abs=1e-6) and out[1] == pytest.approx(0.725, abs=1e-6)


@pytest.mark.parametrize("streaming", [False, True])
def test_module_logs_gauc_only_with_a_group_column(synthetic_paths, streaming, quiet_trainer, synthetic_datamodule):
    torch.manual_seed(0)
    tasks = synthetic_tasks()
    dm = synthetic_datamodule(synthetic_paths, batch_size=2048, group="user_id", streaming=streaming)
    dm.setup("fit")
    module = MultiTaskLightningModule(MMoE(dm.features, tasks, num_experts=2, expert_hidden=(16,), tower_hidden=(8,)))
    logged = quiet_trainer().validate(module, dm, verbose=False)[0]
    assert "val/dwell/gauc" not in logged  # regression task: no GAUC
    # the logged value is GAUC over the whole val split, computed here from the module's outputs
    store = read_split(dm.files("val"), dm.features, tasks, keys=["user_id"])
    module.eval()
    with torch.no_grad():
        outputs = module(store.features)
    for task in ("click", "conversion"):
        labels = store.labels[task]
        valid = labels != -1
        expected = group_auc(outputs[task][valid], labels[valid], store.keys["user_id"][valid]).item()
        assert logged[f"val/{task}/gauc"] == pytest.approx(expected, abs=1e-5)
        assert 0.0 < expected < 1.0
    # the Trainer's batches carry the group; it is not left among the keys (nor written to prediction files)
    batch = dm.on_before_batch_transfer(next(iter(dm.dataset("val"))), 0)
    assert torch.equal(batch["group"], batch["features"]["user_id"]) and "keys" not in batch

    plain = synthetic_datamodule(synthetic_paths, batch_size=2048, streaming=streaming)
    assert not any(k.endswith("/gauc") for k in quiet_trainer().validate(module, plain, verbose=False)[0])


def test_group_column_must_be_integer(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, group="dense_0")
    with pytest.raises(ValueError, match=r"train.parquet: group column 'dense_0' has type float"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="missing group column 'uid'"):
        synthetic_datamodule(synthetic_paths, group="uid").setup("fit")
