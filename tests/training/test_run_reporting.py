"""The run tells you what happened: RunSummary from Python, the data module's logs and progress bars."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import MultiTaskLightningModule, Task, registry
from mtl_lightning.callbacks import RunSummary, metrics_table


def test_metrics_table_has_one_row_per_task_and_a_dash_for_what_a_task_lacks():
    metrics = {"val/click/auc": torch.tensor(0.71234), "val/click/logloss": 0.5, "val/dwell/mse": 1.25,
               "val/loss": 0.9, "train/loss": 3.0, "val/click/gauc": 0.6}
    assert metrics_table(metrics).splitlines() == [
        "task         auc       gauc    logloss        mse",
        "click     0.7123     0.6000     0.5000          -",
        "dwell          -          -          -     1.2500",
        "val/loss: 0.9000",
    ]
    assert metrics_table({"train/loss": 1.0}) == ""


def _write(path, n: int, seed: int, row_group_size: int) -> None:
    rng = np.random.default_rng(seed)
    city = rng.choice(["paris", "rome", "oslo"], n)
    price = rng.normal(size=n)
    pq.write_table(pa.table({
        "city": city.tolist(), "price": price,
        "click": ((price + (city == "rome")) > 0.5).astype(np.float32),
    }), path, row_group_size=row_group_size)


def test_fit_from_python_reports_the_best_checkpoint_and_final_metrics(tmp_path, capsys, caplog, quiet_trainer):
    _write(tmp_path / "a.parquet", 300, 0, 100)
    _write(tmp_path / "b.parquet", 200, 1, 50)
    _write(tmp_path / "val.parquet", 150, 2, 150)
    data = ParquetDataModule(train=[tmp_path / "a.parquet", tmp_path / "b.parquet"], val=tmp_path / "val.parquet",
                             tasks=[Task("click")], categorical=["city"], normalize=True, batch_size=100,
                             embedding_dim=4)
    with caplog.at_level(logging.INFO):
        features = data.prepare_features()
        model = registry.create("shared_bottom", features=features, tasks=data.tasks, bottom_hidden=(8,),
                                tower_hidden=(4,))
        summary = RunSummary()
        trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path,
                                callbacks=[summary])
        trainer.fit(MultiTaskLightningModule(model, lr=0.05), data)
    out, err = capsys.readouterr()
    best = trainer.checkpoint_callback.best_model_path
    assert best.endswith(".ckpt") and f"best checkpoint: {best}" in out
    lines = summary.text.splitlines()
    table = lines[lines.index("final validation metrics:") + 1:]
    assert table[0].split() == ["task", "auc", "logloss", "ne", "pcoc", "ece"]
    assert float(table[1].split()[1]) == pytest.approx(float(trainer.callback_metrics["val/click/auc"]), abs=1e-4)

    logs = "\n".join(record.getMessage() for record in caplog.records)
    assert "ParquetDataModule train split: 2 files, 500 rows, 7 row groups" in logs
    assert "ParquetDataModule val split: 1 file, 150 rows, 1 row groups" in logs
    assert "city (vocabulary of 3 values + id 0 for unseen/null)" in logs
    assert "inferred features: price (DenseFeature)" in logs
    # the long passes showed their progress bars (tqdm, stderr) with the split's rows
    assert "fitting vocabularies/statistics on the train split" in err and "reading the train split" in err
    assert "/500" in err and "/150" in err


def test_progress_bars_can_be_turned_off(tmp_path, capsys):
    _write(tmp_path / "a.parquet", 100, 0, 100)
    data = ParquetDataModule(train=tmp_path / "a.parquet", tasks=[Task("click")], categorical=["city"],
                             progress=False)
    data.setup("fit")
    assert "split" not in capsys.readouterr().err


def test_the_progress_bar_shows_the_training_loss_and_each_tasks_latest_validation_metric(tmp_path, quiet_trainer):
    from lightning.pytorch.callbacks import TQDMProgressBar

    _write(tmp_path / "train.parquet", 400, 0, 100)
    _write(tmp_path / "val.parquet", 150, 2, 150)
    for path in ("train.parquet", "val.parquet"):  # a regression task too: its headline metric is the MSE
        table = pq.read_table(tmp_path / path)
        pq.write_table(table.append_column("spend", pa.array(table.column("price").to_numpy() * 2.0)), tmp_path / path)
    tasks = [Task("click"), Task("spend", kind="regression")]
    data = ParquetDataModule(train=tmp_path / "train.parquet", val=tmp_path / "val.parquet", tasks=tasks,
                             categorical=["city"], batch_size=100, embedding_dim=4, progress=False)
    model = registry.create("shared_bottom", features=data.prepare_features(), tasks=tasks, bottom_hidden=(8,),
                            tower_hidden=(4,))
    bar = TQDMProgressBar()
    trainer = quiet_trainer(max_epochs=2, enable_progress_bar=True, callbacks=[bar], log_every_n_steps=1)
    module = MultiTaskLightningModule(model, lr=0.05)
    trainer.fit(module, data)
    shown = bar.get_metrics(trainer, module)
    assert {"train/loss", "val/click/auc", "val/spend/mse"} <= set(shown), shown
    assert not {"val/click/logloss", "val/spend/mae", "train/click/loss"} & set(shown)  # the headline only
    assert shown["val/click/auc"] == pytest.approx(float(trainer.callback_metrics["val/click/auc"]), abs=1e-3)
