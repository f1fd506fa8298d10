"""Checkpoint saves are atomic on any filesystem: a save killed with ``kill -9``, one that fills the disk, one
interrupted by Ctrl-C, leave the previous checkpoint whole and (after the next save) no temporary file; a plain
``L.Trainer()`` gets this from ``MultiTaskLightningModule`` without a plugin. TorchRec folders are swapped whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic
from mtl_lightning import MultiTaskLightningModule, registry
from mtl_lightning.checkpoint import SafeCheckpointIO, atomic_save, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TABLE = {"key": "tables.model.embedding.item", "layer": "model.embedding", "table": "item", "rows": 4, "dim": 2,
         "plain_key": "tables.item.weight", "first_row": 0, "dtype": "float32"}


def _small_module() -> MultiTaskLightningModule:
    model = registry.create("shared_bottom", features=synthetic_features(embedding_dim=4), tasks=synthetic_tasks(),
                            bottom_hidden=(8,), tower_hidden=(4,))
    return MultiTaskLightningModule(model)


def _data(folder: Path, **kwargs) -> ParquetDataModule:
    paths = write_synthetic(folder, (200, 100, 100))
    return ParquetDataModule(train=paths["train"], tasks=synthetic_tasks(), features=synthetic_features(embedding_dim=4),
                             batch_size=100, **kwargs)

# trains a tiny module with a plain Trainer (no plugin) saving epoch=<e>-step=<s>.ckpt and last.ckpt every epoch; the
# fourth save (the second epoch's last.ckpt) writes 4 kB of its temporary file, says STALLED and sleeps (a slow
# disk), so the test can kill -9 it in the middle of the write
KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader
    from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic
    from mtl_lightning import MultiTaskLightningModule, registry

    real_save, calls = torch.save, [0]

    class SlowFile:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += self.file.write(data)
            if self.written > 4096:
                self.file.flush()
                print("STALLED", flush=True)
                time.sleep(600)
            return len(data)

        def flush(self):
            self.file.flush()

    def slow_save(obj, file, *args, **kwargs):
        calls[0] += 1
        return real_save(obj, SlowFile(file) if calls[0] >= 4 else file, *args, **kwargs)

    torch.save = slow_save
    torch.manual_seed(0)
    features, tasks = synthetic_features(embedding_dim=4), synthetic_tasks()
    model = registry.create("shared_bottom", features=features, tasks=tasks, bottom_hidden=(8,), tower_hidden=(4,))
    batches = [{"features": {f.name: (torch.randint(0, f.vocab_size, (16, f.max_len)) if hasattr(f, "max_len")
                                      else torch.randint(0, f.vocab_size, (16,)) if hasattr(f, "vocab_size")
                                      else torch.randn(16)) for f in features},
                "labels": {t.name: torch.randint(0, 2, (16,)).float() for t in tasks}} for _ in range(2)]
    saver = ModelCheckpoint(dirpath=sys.argv[1], save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[saver])
    trainer.fit(MultiTaskLightningModule(model), DataLoader(batches, batch_size=None))
""")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_plain_trainer_gets_safe_checkpoint_io_and_a_users_choice_is_kept(tmp_path, quiet_trainer):
    data = _data(tmp_path / "data")
    plain = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    plain.fit(_small_module(), data)
    assert type(plain.strategy.checkpoint_io) is SafeCheckpointIO
    plain.save_checkpoint(tmp_path / "saved.ckpt")
    assert load_checkpoint(tmp_path / "saved.ckpt")["global_step"] == 1 and not _temporaries(tmp_path)
    chosen = TorchCheckpointIO()
    trusting = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, plugins=[chosen])
    trusting.fit(_small_module(), data)
    assert trusting.strategy.checkpoint_io is chosen


def test_kill_9_during_a_save_keeps_the_previous_last_ckpt(tmp_path):
    folder = tmp_path / "checkpoints"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in process.stdout:
            if line.strip() == "STALLED":
                break
        else:
            pytest.fail(f"the training process ended ({process.wait()}) before its fourth save")
        partial = _temporaries(folder)
        assert len(partial) == 1 and partial[0].startswith(".last.ckpt.tmp-"), partial
        assert (folder / partial[0]).stat().st_size > 4096  # killed in the middle of writing it
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    previous = load_checkpoint(folder / "last.ckpt")  # whole: the first epoch's
    assert previous["epoch"] == 0 and previous["global_step"] == 2
    assert _temporaries(folder) == partial  # what kill -9 leaves ...
    SafeCheckpointIO().save_checkpoint({**previous, "epoch": 1}, folder / "last.ckpt")
    assert _temporaries(folder) == []  # ... the next save into the folder removes (its process is gone)
    assert load_checkpoint(folder / "last.ckpt")["epoch"] == 1
    assert load_checkpoint(folder / "epoch=1-step=4.ckpt")["epoch"] == 1  # saved whole before the kill


def test_an_interrupted_save_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)

    def interrupted(obj, file, *args, **kwargs):
        file.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SafeCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert _temporaries(tmp_path) == [] and int(load_checkpoint(path)["step"]) == 1


FULL_DISK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from mtl_lightning.checkpoint import SafeCheckpointIO, load_checkpoint

    folder, io, errors = Path(sys.argv[1]), SafeCheckpointIO(), []
    io.save_checkpoint({"epoch": 0, "w": torch.ones(10_000)}, folder / "epoch=0-step=1.ckpt")
    io.save_checkpoint({"epoch": 0, "w": torch.ones(10_000)}, folder / "last.ckpt")
    for name in ("epoch=1-step=2.ckpt", "last.ckpt"):  # 2 MB each, on a 1 MB filesystem
        try:
            io.save_checkpoint({"epoch": 1, "w": torch.ones(500_000)}, folder / name)
        except OSError as error:
            errors.append([error.errno, str(error)])
    print(json.dumps({"files": sorted(os.listdir(folder)), "errors": errors,
                      "last_epoch": load_checkpoint(folder / "last.ckpt")["epoch"]}))
""")


def _private_mounts() -> str | None:
    """Why a private mount namespace cannot be made here (``None``: it can)."""
    try:
        done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare cannot run here ({error})"
    return None if done.returncode == 0 else f"unshare -rm is not permitted here: {done.stderr.strip()}"


@pytest.mark.skipif(sys.platform != "linux", reason="a tmpfs in a private mount namespace needs Linux")
def test_a_full_filesystem_leaves_no_truncated_checkpoint(tmp_path):
    """A real 1 MB tmpfs, mounted in a private mount namespace (``unshare -rm``) by the subprocess only."""
    reason = _private_mounts()
    if reason is not None:
        pytest.skip(reason)
    folder = tmp_path / "small_disk"
    folder.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" "$1"',
                           "sh", str(folder), sys.executable, str(script)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["files"] == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no truncated epoch=1, no temporary file
    assert result["last_epoch"] == 0
    assert [errno for errno, _ in result["errors"]] == [28, 28]  # ENOSPC, for both
    assert all("could not be written (No space left on device); the checkpoint there before, if any, is unchanged"
               in message for _, message in result["errors"])


def test_a_torchrec_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """``save_sharded`` (TorchRecStrategy's writer; here in one process, without TorchRec) swaps the folder: a save
    that fails leaves the previous folder and no staging folder."""
    from mtl_lightning.distributed.checkpoint import consolidate, save_sharded

    meta = {"torchrec": {"format": 1, "world_size": 1, "tables": [TABLE], "embedding_optimizer": None},
            "state_dict": {}, "epoch": 0}
    path = tmp_path / "last.ckpt"

    def write(value: float, save_meta=lambda data, file: atomic_save(data, file)) -> None:
        save_sharded(path, dict(meta), {TABLE["key"]: torch.full((4, 2), value)}, None, True, save_meta)

    write(1.0)
    write(2.0)  # replaces the first
    table = "model.embedding.tables.item.weight"
    assert torch.equal(consolidate(path)["state_dict"][table], torch.full((4, 2), 2.0))

    def full_disk(data, file):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write(3.0, full_disk)
    assert torch.equal(consolidate(path)["state_dict"][table], torch.full((4, 2), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]


def test_trainer_checkpoints_resume_after_a_killed_save(tmp_path, quiet_trainer):
    """``ckpt_path="last"`` resumes from ``last.ckpt`` with another host's leftover temporary file beside it."""
    data = _data(tmp_path / "data", allow_retraining=True)  # the second fit trains the same day on
    folder = tmp_path / "checkpoints"
    saver = ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True)
    first = quiet_trainer(max_epochs=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver])
    first.fit(_small_module(), data)
    stale = folder / ".last.ckpt.tmp-host-999999999-deadbeef"  # as a killed save of another host leaves it
    stale.write_bytes(b"partial")
    saver = ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True)
    second = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0, callbacks=[saver])
    second.fit(_small_module(), data, ckpt_path="last")
    assert second.global_step == 2 * first.global_step
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == second.global_step  # the resumed run wrote it
    assert stale.exists()  # another host's (or a living process's) temporary file is never touched
