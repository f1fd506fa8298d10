"""Multi-class tasks: the Task, the softmax cross-entropy, every weighting strategy, learning a known 3-class signal
through the Trainer, predictions (and their Parquet file), checkpoints, the data module's label checks, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from datamodules import ParquetDataModule
from datamodules.predictions import ParquetPredictionWriter
from mtl_lightning import MultiTaskLightningModule, Task, registry
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.features import DenseFeature, SparseFeature
from mtl_lightning.losses import masked_loss

FEATURES = [SparseFeature("user", 30, 4), DenseFeature("d0"), DenseFeature("d1"), DenseFeature("d2")]
TASKS = [Task("click"), Task("genre", kind="multiclass", num_classes=3)]


def table(rows: int, seed: int) -> pa.Table:
    """A 3-class label with a known signal (class 0 follows d0, class 1 follows d1, class 2 neither), 10% of its
    rows ignored (-1), and a binary click that follows d2."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 1, (rows, 3)).astype(np.float32)
    scores = np.stack([2 * d[:, 0], 2 * d[:, 1], np.zeros(rows)], 1) + 0.5 * rng.gumbel(size=(rows, 3))
    genre = np.where(rng.random(rows) < 0.1, -1, scores.argmax(1))
    click = (rng.random(rows) < 1 / (1 + np.exp(-2 * d[:, 2]))).astype(np.float32)
    return pa.table({"user": rng.integers(0, 30, rows), "d0": d[:, 0], "d1": d[:, 1], "d2": d[:, 2],
                     "genre": pa.array(genre, pa.int64()), "click": click})


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiclass")
    out = {"train": root / "train.parquet", "val": root / "val.parquet"}
    pq.write_table(table(3000, 0), out["train"])
    pq.write_table(table(1000, 1), out["val"])
    return out


def datamodule(paths, **kwargs) -> ParquetDataModule:
    return ParquetDataModule(train=paths["train"], val=paths["val"], features=FEATURES, tasks=TASKS, batch_size=256,
                             **kwargs)


# ------------------------------------------------------------------------------------------------------ the Task
def test_task_requires_num_classes_for_multiclass_and_refuses_it_elsewhere():
    task = Task("genre", kind="multiclass", num_classes=4)
    assert task.loss == "cross_entropy" and task.output_dim == 4 and Task("click").output_dim == 1
    with pytest.raises(ValueError, match="'genre': a multiclass task needs num_classes"):
        Task("genre", kind="multiclass")
    for bad in (1, 0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="'genre': num_classes must be an integer >= 2"):
            Task("genre", kind="multiclass", num_classes=bad)
    for kind in ("binary", "regression"):
        with pytest.raises(ValueError, match=f"'x': num_classes applies to multiclass tasks, not {kind}"):
            Task("x", kind=kind, num_classes=3)
    with pytest.raises(ValueError, match="'genre': loss 'focal' is not a loss of multiclass tasks"):
        Task("genre", kind="multiclass", num_classes=3, loss="focal")
    with pytest.raises(ValueError, match="'genre': negative_sampling_rate applies to binary tasks, not multiclass"):
        Task("genre", kind="multiclass", num_classes=3, negative_sampling_rate=0.5)
    with pytest.raises(ValueError, match="'label_smoothing' must be a number in"):
        Task("genre", kind="multiclass", num_classes=3, loss_options={"label_smoothing": 1.0})


def test_task_config_round_trip_keeps_num_classes_and_binary_configs_unchanged():
    task = Task("genre", kind="multiclass", num_classes=5, loss_options={"label_smoothing": 0.1}, weight=0.5)
    config = task.to_config()
    assert config["num_classes"] == 5 and Task.from_config(config) == task
    assert Task.from_config(yaml.safe_load(yaml.safe_dump(config))) == task
    assert "num_classes" not in Task("click").to_config()  # binary / regression configs as earlier versions wrote


# ------------------------------------------------------------------------------------------------------ the loss
def test_cross_entropy_against_hand_computed_values_with_weights_ignore_label_and_smoothing():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [5.0, 5.0, 5.0], [0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([2.0, 0.0, -1.0, float("nan")])  # the last two rows carry no label
    weights = torch.tensor([1.0, 3.0, 7.0, 7.0])
    z = logits.detach()
    row0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)) - 0.5
    row1 = math.log(math.exp(0.3) + math.exp(-1.0) + math.exp(2.0)) - 0.3
    loss = masked_loss(logits, labels, "multiclass", weights=weights, loss="cross_entropy")
    assert float(loss.detach()) == pytest.approx((1 * row0 + 3 * row1) / 4, rel=1e-6)
    assert float(masked_loss(z, labels, "multiclass")) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss.backward()  # d/dz of w_i CE_i / sum w = w_i (softmax(z_i) - onehot(y_i)) / sum w; ignored rows get 0
    expected = torch.zeros(4, 3)
    expected[0] = 1 / 4 * (torch.softmax(z[0], 0) - torch.tensor([0.0, 0.0, 1.0]))
    expected[1] = 3 / 4 * (torch.softmax(z[1], 0) - torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(logits.grad, expected)
    # label smoothing eps: target (1 - eps) onehot + eps / K, so the row loss is (1 - eps) CE + eps mean_c(-log p_c)
    eps = 0.2
    smoothed = [(1 - eps) * ce + eps * float(-torch.log_softmax(z[i], 0).mean()) for i, ce in enumerate((row0, row1))]
    value = masked_loss(z, labels, "multiclass", options={"label_smoothing": eps})
    assert float(value) == pytest.approx(sum(smoothed) / 2, rel=1e-6)
    # no valid row: an exact 0 that keeps the graph
    empty = masked_loss(logits, torch.full((4,), -1.0), "multiclass")
    assert float(empty.detach()) == 0.0 and empty.requires_grad


@pytest.mark.parametrize("bad", [3.0, 1.5, -2.0])
def test_cross_entropy_refuses_labels_that_are_not_class_ids(bad):
    with pytest.raises(ValueError, match=r"multiclass labels must be class ids 0\.\.2"):
        masked_loss(torch.zeros(2, 3), torch.tensor([0.0, bad]), "multiclass")
    with pytest.raises(ValueError, match=r"takes \(B, K\) logits"):
        masked_loss(torch.zeros(2), torch.tensor([0.0, 1.0]), "multiclass")


def _batches(count: int = 4, rows: int = 64) -> list[dict]:
    frame = table(count * rows, seed=3).to_pydict()
    out = []
    for b in range(count):
        part = slice(b * rows, (b + 1) * rows)
        out.append({"features": {"user": torch.tensor(frame["user"][part]),
                                 **{f"d{i}": torch.tensor(frame[f"d{i}"][part]) for i in range(3)}},
                    "labels": {"genre": torch.tensor(frame["genre"][part], dtype=torch.float32),
                               "click": torch.tensor(frame["click"][part])},
                    "weights": {"genre": torch.rand(rows, generator=torch.Generator().manual_seed(b)) * 2}})
    return out


@pytest.mark.parametrize("weighting", ["static", "uncertainty", "gradnorm", "pcgrad"])
def test_every_weighting_strategy_trains_a_multiclass_task(weighting, quiet_trainer):
    torch.manual_seed(0)
    model = SharedBottom(FEATURES, TASKS, bottom_hidden=(16,), tower_hidden=(8,))
    module = MultiTaskLightningModule(model, weighting=weighting, lr=0.01)
    before = [p.detach().clone() for p in model.towers["genre"].parameters()]
    batches = _batches()
    with torch.no_grad():
        first = float(module.compute_losses(model(batches[0]["features"]), batches[0]["labels"],
                                            batches[0]["weights"])["genre"])
    quiet_trainer(max_epochs=5, log_every_n_steps=1).fit(module, DataLoader(batches, batch_size=None))
    assert model.towers["genre"][-1].out_features == 3
    assert all(not torch.equal(b, p) for b, p in zip(before, model.towers["genre"].parameters()))
    with torch.no_grad():
        last = float(module.compute_losses(model(batches[0]["features"]), batches[0]["labels"],
                                           batches[0]["weights"])["genre"])
    assert math.isfinite(last) and last < first  # 20 steps on 256 rows of a strong signal lower the loss


# ------------------------------------------------------------------------------------- learning, prediction, files
def test_learns_a_known_three_class_signal_and_predicts_probabilities(paths, quiet_trainer, tmp_path):
    torch.manual_seed(0)
    model = registry.create("mmoe", features=FEATURES, tasks=TASKS, num_experts=2, expert_hidden=(16,),
                            tower_hidden=(8,))
    module = MultiTaskLightningModule(model, lr=0.01)
    dm = datamodule(paths, predict=paths["val"])
    writer = ParquetPredictionWriter(tmp_path / "predictions")
    trainer = quiet_trainer(max_epochs=3, callbacks=[writer], enable_checkpointing=True,
                            default_root_dir=tmp_path)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    # the Bayes accuracy of this signal is about 0.85; chance is 1/3 and 0.5 for AUC
    assert float(metrics["val/genre/accuracy"]) > 0.7
    assert float(metrics["val/genre/auc"]) > 0.85
    assert float(metrics["val/genre/logloss"]) < math.log(3) - 0.3
    assert not {"val/genre/ne", "val/genre/pcoc", "val/genre/ece", "val/genre/gauc"} & set(metrics)
    predictions = trainer.predict(module, dm)
    genre = torch.cat([p["genre"] for p in predictions])
    assert genre.shape == (1000, 3) and (genre > 0).all()
    torch.testing.assert_close(genre.sum(1), torch.ones(1000))
    assert torch.cat([p["click"] for p in predictions]).shape == (1000,)
    # the prediction file: one fixed-size list column of the K probabilities, row for row what predict returned
    trainer.predict(module, dm, return_predictions=False)
    written = pq.read_table(writer.paths[0])
    assert written.schema.field("genre").type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(np.stack(written.to_pandas()["genre"].to_numpy()), genre.numpy())
    # the checkpoint rebuilds the multi-class task and its 3-logit tower: the same predictions
    restored = MultiTaskLightningModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert restored.tasks == module.tasks and restored.model.tasks[1].num_classes == 3
    batch = next(iter(dm.predict_dataloader()))
    module.eval()
    before = module.predict_step(batch, 0)
    torch.testing.assert_close(restored.predict_step(batch, 0)["genre"], before["genre"])
    # post-hoc calibration is for binary tasks: the multi-class task is left as it is, and refused when named
    from mtl_lightning.calibration import calibrate

    with pytest.raises(ValueError, match=r"\['genre'\] are not binary tasks"):
        calibrate(module, dm, tasks=["genre"])
    calibrate(module, dm)
    assert list(module.calibration.tasks) == ["click"]
    torch.testing.assert_close(module.predict_step(batch, 0)["genre"], before["genre"])


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("value, example", [(3, "3.0"), (-2, "-2.0"), (1.5, "1.5")])
def test_data_module_refuses_labels_that_are_not_class_ids_naming_file_and_column(tmp_path, value, example, streaming):
    bad = table(20, 0).set_column(4, "genre", pa.array([0, 1, 2, 1] * 4 + [value, value, 0, 2], pa.float64()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    dm = ParquetDataModule(train=tmp_path / "bad.parquet", features=FEATURES, tasks=TASKS, batch_size=8,
                           streaming=streaming, shuffle=False)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
        list(dm.dataset("train"))
    message = str(info.value)
    assert "bad.parquet" in message and "label column 'genre' of multiclass task 'genre'" in message
    assert "has 2 rows" in message and "class id 0..2 (num_classes=3)" in message and example in message


def test_cli_fits_predicts_and_checkpoints_a_multiclass_task(paths, tmp_path, monkeypatch):
    from pathlib import Path

    from mtl_lightning.cli import build_cli

    configs = Path(__file__).resolve().parents[2] / "configs"
    data = {"data": {"train": str(paths["train"]), "val": str(paths["val"]), "labels": ["click", "genre"],
                     "tasks": [{"name": "click"}, {"name": "genre", "kind": "multiclass", "num_classes": 3}]}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(configs / "base.yaml"), "--config", str(tmp_path / "data.yaml"), "--config",
            str(configs / "shared_bottom.yaml"), "--data.batch_size=500", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--data.embedding_dim=4"]
    cli = build_cli(["fit", *args, "--trainer.max_epochs=1"])
    assert cli.model.tasks[1] == Task("genre", kind="multiclass", num_classes=3)
    assert "val/genre/accuracy" in cli.trainer.callback_metrics
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    build_cli(["predict", *args, f"--ckpt_path={checkpoint}", f"--data.predict={paths['val']}",
               "--trainer.logger=false", f"--prediction_writer.output_dir={tmp_path / 'out'}"])
    written = pq.read_table(tmp_path / "out" / "predictions-rank00000.parquet")
    assert written.column_names == ["row_id", "click", "genre"] and written.num_rows == 1000
    np.testing.assert_allclose(np.stack(written.column("genre").to_numpy(zero_copy_only=False)).sum(1), 1, rtol=1e-5)
