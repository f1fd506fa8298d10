"""Exact mid-epoch resume: the train loader's position is saved in the checkpoint and restored.

A run that checkpoints every ``k`` steps (``ModelCheckpoint(every_n_train_steps=k, save_last=True)``) is
interrupted right after step ``k`` and resumed from ``last.ckpt``: the interrupted epoch must see every row
exactly once across both runs, in the order of an uninterrupted run, and the final weights must equal
the uninterrupted run's -- in memory and streaming, with and without DataLoader workers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from datamodules import ParquetDataModule
from datamodules.synthetic import make_table
from mtl_lightning import DenseFeature, SparseFeature, Task


ROWS, BATCH = 200, 16  # 13 batches per epoch, the last one of 8 rows
FEATURES = [SparseFeature("user_id", 500, 4), DenseFeature("dense_0"), DenseFeature("dense_1")]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    """Two files of uneven size, row groups of 30 rows."""
    directory = tmp_path_factory.mktemp("resume") / "train"
    directory.mkdir()
    table = make_table(ROWS, seed=3)
    pq.write_table(table.slice(0, 130), directory / "part-0.parquet", row_group_size=30)
    pq.write_table(table.slice(130), directory / "part-1.parquet", row_group_size=30)
    return directory


class TinyModel(L.LightningModule):
    """A deterministic click model (no dropout, SGD) that records the row ids of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(500, 4)
        self.linear = nn.Linear(6, 1)
        self.seen: list[tuple[int, list[int]]] = []  # (epoch, row ids) per trained batch
        self.validated: list[tuple[int, list[int]]] = []  # (epoch, row ids) per validation batch

    def logits(self, features):
        x = torch.cat([self.embedding(features["user_id"]), features["dense_0"][:, None], features["dense_1"][:, None]], 1)
        return self.linear(x).squeeze(1)

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["row_id"].tolist()))
        return nn.functional.binary_cross_entropy_with_logits(self.logits(batch["features"]), batch["labels"]["click"])

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.validated.append((self.current_epoch, batch["row_id"].tolist()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Interrupt(Exception):
    pass


class StopAfter(L.Callback):
    """Raises before training the batch after step ``steps`` (whose checkpoint is written by then)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.steps:
            raise Interrupt


def datamodule(train_dir: Path, streaming: bool, workers: int) -> ParquetDataModule:
    return ParquetDataModule(
        train=train_dir, val=train_dir, tasks=[Task("click")], features=FEATURES, batch_size=BATCH, num_workers=workers, seed=7,
        streaming=streaming, shuffle_buffer=64, read_rows=24,
    )


def fit(quiet_trainer, train_dir, streaming, workers, ckpt_path=None, callbacks=(), **trainer_kwargs) -> TinyModel:
    model = TinyModel()
    trainer = quiet_trainer(max_epochs=2, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                            **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule(train_dir, streaming, workers), ckpt_path=ckpt_path)
    return model


def interrupted_then_resumed(quiet_trainer, train_dir, tmp_path, streaming, workers, steps, **trainer_kwargs):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=steps, save_last=True)
    first = TinyModel()
    trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint, StopAfter(steps)],
                            **trainer_kwargs)
    with pytest.raises(Interrupt):
        trainer.fit(first, datamodule=datamodule(train_dir, streaming, workers))
    resumed = fit(quiet_trainer, train_dir, streaming, workers, ckpt_path=tmp_path / "last.ckpt", **trainer_kwargs)
    return first, resumed


def rows_of(seen, epoch) -> list[int]:
    return [i for e, ids in seen if e == epoch for i in ids]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_mid_epoch_resume_sees_every_row_once_and_reaches_the_same_weights(train_dir, tmp_path, streaming, workers, quiet_trainer):
    straight = fit(quiet_trainer, train_dir, streaming, workers)
    first, resumed = interrupted_then_resumed(quiet_trainer, train_dir, tmp_path, streaming, workers, steps=5)
    assert [e for e, _ in first.seen] == [0] * 5
    # (a) the interrupted epoch: every row exactly once across both runs, in the uninterrupted order
    interrupted = rows_of(first.seen, 0) + rows_of(resumed.seen, 0)
    assert sorted(interrupted) == list(range(ROWS))
    assert interrupted == rows_of(straight.seen, 0)
    assert len(resumed.seen) == 2 * 13 - 5 and rows_of(resumed.seen, 1) == rows_of(straight.seen, 1)
    assert rows_of(straight.seen, 1) != rows_of(straight.seen, 0)  # reshuffled: the epoch seed moved on
    # validation is not resumed: each epoch-end validation of the resumed run reads the whole split once
    assert resumed.validated == straight.validated
    assert [sorted(rows_of(resumed.validated, e)) for e in (0, 1)] == [list(range(ROWS))] * 2
    # (b) the same weights as the uninterrupted run
    assert_same_weights(straight, resumed)


@pytest.mark.parametrize("steps", [13, 18], ids=["last-batch-of-epoch-0", "mid-epoch-1"])
def test_resume_at_an_epoch_end_or_in_a_later_epoch(train_dir, tmp_path, steps, quiet_trainer):
    straight = fit(quiet_trainer, train_dir, True, 2)
    first, resumed = interrupted_then_resumed(quiet_trainer, train_dir, tmp_path, True, 2, steps=steps)
    assert [ids for _, ids in first.seen + resumed.seen] == [ids for _, ids in straight.seen]
    assert [e for e, _ in first.seen + resumed.seen] == [e for e, _ in straight.seen]
    assert_same_weights(straight, resumed)


def test_resume_with_gradient_accumulation(train_dir, tmp_path, quiet_trainer):
    # 3 optimizer steps = 6 batches; the checkpoint is written after the step, with no gradient pending
    straight = fit(quiet_trainer, train_dir, False, 0, accumulate_grad_batches=2)
    first, resumed = interrupted_then_resumed(quiet_trainer, train_dir, tmp_path, False, 0, steps=3, accumulate_grad_batches=2)
    assert len(first.seen) == 6
    assert [ids for _, ids in first.seen + resumed.seen] == [ids for _, ids in straight.seen]
    assert_same_weights(straight, resumed)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_loader_state_resumes_a_pass_without_a_trainer(train_dir, streaming, workers):
    """The loader alone: state after 4 batches of the second pass, loaded into a new loader, gives the rest."""
    dm = datamodule(train_dir, streaming, workers)

    def ids(batches) -> list[list[int]]:
        return [b["row_id"].tolist() for b in batches]

    straight = dm.train_dataloader()  # no trainer: the epoch is the number of passes
    passes = [ids(straight) for _ in range(3)]
    interrupted = dm.train_dataloader()
    list(interrupted)
    iterator = iter(interrupted)
    head = [next(iterator)["row_id"].tolist() for _ in range(4)]
    state = interrupted.state_dict()
    assert state["epoch"] == 1
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert head + ids(resumed) == passes[1]  # the rest of epoch 1, not re-emitting the 4 batches
    assert ids(resumed) == passes[2]  # then epoch 2 from its first batch


def test_resuming_mid_epoch_with_other_settings_is_refused(train_dir):
    dm = datamodule(train_dir, False, 0)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    other = ParquetDataModule(train=train_dir, tasks=[Task("click")], features=FEATURES, batch_size=8, seed=7)
    resumed = other.train_dataloader()
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"cannot resume epoch 0 in the middle.*'batch_size': \(16, 8\)"):
        next(iter(resumed))


def test_ddp_sigkill_mid_epoch_then_resume(tmp_path):
    """2 ranks x 2 workers, streaming: SIGKILL after step 2 of 6, resume: each rank goes on where it stopped."""
    script = Path(__file__).parents[1] / "scripts" / "ddp_resume.py"
    spec = importlib.util.spec_from_file_location("ddp_resume", script)
    ddp_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_resume)
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    table = make_table(192, seed=2)  # 96 rows = 6 batches per rank
    pq.write_table(table.slice(0, 110), data / "part-0.parquet", row_group_size=25)
    pq.write_table(table.slice(110), data / "part-1.parquet", row_group_size=25)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = {}
    for phase in ("interrupt", "resume"):
        runs[phase] = subprocess.run([sys.executable, str(script), str(data), str(out), phase], capture_output=True,
                                     text=True, timeout=300, env=env)
    assert runs["interrupt"].returncode == -signal.SIGKILL, runs["interrupt"].stderr[-3000:]
    assert runs["resume"].returncode == 0, runs["resume"].stdout[-3000:] + runs["resume"].stderr[-3000:]

    dm = ddp_resume.datamodule(data)
    dm.setup("fit")
    epoch0 = []
    for rank in range(2):
        def trained(phase):
            lines = (out / f"{phase}_rank{rank}.jsonl").read_text().splitlines()
            return [tuple(json.loads(line)) for line in lines]

        expected = []
        for epoch in range(2):
            dataset = dm.dataset("train", rank=rank, world_size=2)
            dataset.set_epoch(epoch)
            expected += [(epoch, b["row_id"].tolist()) for b in DataLoader(dataset, batch_size=None, num_workers=2)]
        assert len(trained("interrupt")) == ddp_resume.STEPS
        assert [(e, list(ids)) for e, ids in trained("interrupt") + trained("resume")] == expected
        epoch0 += [i for e, ids in trained("interrupt") + trained("resume") if e == 0 for i in ids]
    assert sorted(epoch0) == list(range(192))  # the interrupted epoch: every row once over both ranks and runs
