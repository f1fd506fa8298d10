"""Tasks that cannot learn, and clear refusals where the cause is known (issue 27: items 6, 9 and part of 10).

Task weights are checked; a task without a valid label in the train split and a loss or metric that becomes
inf/NaN are warned about, naming the task; resuming another architecture's checkpoint and
``precision="bf16-true"`` give errors that name the cause.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import MMoE, SharedBottom
from mtl_lightning.losses import masked_loss

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
FEATURES = [SparseFeature("user_id", 10, 4), DenseFeature("dense_0")]
TASKS = [Task("click"), Task("conversion"), Task("dwell", kind="regression")]


def write_table(path: Path, rows: int = 64, seed: int = 0, conversion=None, dwell=None) -> Path:
    rng = np.random.default_rng(seed)
    click = rng.integers(0, 2, rows)
    pq.write_table(pa.table({
        "user_id": rng.integers(0, 10, rows), "dense_0": rng.normal(size=rows).astype(np.float32), "click": click,
        "conversion": np.where(click == 1, rng.integers(0, 2, rows), -1) if conversion is None else conversion,
        "dwell": rng.normal(size=rows).astype(np.float32) if dwell is None else dwell,
    }), path)
    return path


def module(**kwargs) -> MultiTaskLightningModule:
    torch.manual_seed(0)
    return MultiTaskLightningModule(SharedBottom(FEATURES, TASKS, bottom_hidden=(8,), tower_hidden=()), **kwargs)


def trainer(**kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0)
    settings.update(kwargs)
    return L.Trainer(**settings)


def messages(record) -> list[str]:
    return [str(w.message) for w in record]


# ------------------------------------------------------------------ task weights
@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), -float("inf")])
def test_task_weight_must_be_finite_and_non_negative(weight):
    with pytest.raises(ValueError, match=r"Task 'conversion': weight must be a finite number >= 0, got"):
        Task("conversion", weight=weight)


@pytest.mark.parametrize("weight", ["1", True, None])
def test_task_weight_must_be_a_number(weight):
    with pytest.raises(TypeError, match=r"Task 'click': weight must be a number"):
        Task("click", weight=weight)


def test_task_weight_zero_is_one_task_left_out_but_all_zero_is_refused():
    assert Task("click", weight=0).weight == 0  # one task may be left out of the loss
    zero = [Task("click", weight=0.0), Task("conversion", weight=0), Task("dwell", kind="regression", weight=0.0)]
    with pytest.raises(ValueError, match=r"every task has weight 0 \(\['click', 'conversion', 'dwell'\]\)"):
        MultiTaskLightningModule(SharedBottom(FEATURES, zero, bottom_hidden=(8,), tower_hidden=()))
    with pytest.raises(ValueError, match="Task 'click': weight must be a finite number"):
        MultiTaskLightningModule(SharedBottom(FEATURES, TASKS, bottom_hidden=(8,), tower_hidden=()),
                                 tasks=[{"name": "click", "weight": -1.0}])


# ------------------------------------------------------------------ sample weights in the batch
def test_batch_sample_weights_give_the_weighted_mean_over_valid_rows():
    logits = torch.tensor([0.0, 1.0, -2.0, 3.0], requires_grad=True)
    labels = torch.tensor([1.0, -1.0, 0.0, float("nan")])
    weights = torch.tensor([3.0, 5.0, 1.0, 7.0])  # rows 1 (ignored) and 3 (NaN) do not count
    loss = masked_loss(logits, labels, "binary", -1, weights)
    expected = (3 * math.log(2) + 1 * math.log1p(math.exp(-2.0))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert masked_loss(logits, labels, "binary", -1, torch.tensor([0.0, 5.0, 0.0, 7.0])).item() == 0.0
    with pytest.raises(ValueError, match=r"sample weights of shape \(3,\) for labels of shape \(4,\)"):
        masked_loss(logits, labels, "binary", -1, torch.ones(3))
    m = module()
    outputs = {"click": logits, "conversion": logits, "dwell": logits}
    batch_labels = {"click": labels, "conversion": labels, "dwell": labels}
    weighted = m.compute_losses(outputs, batch_labels, {"click": weights})
    assert weighted["click"].item() == pytest.approx(expected, rel=1e-6)
    assert weighted["conversion"].item() == pytest.approx(m.compute_losses(outputs, batch_labels)["conversion"].item())


# ------------------------------------------------------------------ no valid label in the train split
@pytest.mark.parametrize("streaming", [False, True])
def test_warns_per_task_without_a_valid_label_in_the_train_split(tmp_path, streaming):
    train = write_table(tmp_path / "train.parquet", conversion=np.full(64, -1))  # nobody has a conversion label
    dm = ParquetDataModule(train=train, tasks=TASKS, features=FEATURES, batch_size=16, streaming=streaming,
                           read_rows=16, shuffle_buffer=32, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_epochs=2).fit(module(), dm)
    found = [m for m in messages(record) if "no row with a valid label in the" in m]
    assert len(found) == 1, found  # once, for conversion only, at the end of the first epoch
    assert found[0].startswith("train split: task 'conversion' has no row with a valid label in the 64 rows "
                               "trained on in epoch 0")
    assert "label column 'conversion'" in found[0] and "ignore_label=-1" in found[0]


def test_no_warning_when_every_task_has_labels(tmp_path):
    dm = ParquetDataModule(train=write_table(tmp_path / "train.parquet"), tasks=TASKS, features=FEATURES,
                           batch_size=16, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(max_epochs=1).fit(module(), dm)
    assert not [m for m in messages(record) if "valid label" in m or "inf or NaN" in m]


# ------------------------------------------------------------------ non-finite losses and metrics
def test_warns_when_regression_labels_overflow_the_loss_and_the_metric(tmp_path):
    huge = np.full(64, 3e19, dtype=np.float32)  # finite as float32, but its square is not
    train = write_table(tmp_path / "train.parquet", dwell=huge)
    val = write_table(tmp_path / "val.parquet", seed=1, dwell=huge)
    dm = ParquetDataModule(train=train, val=val, tasks=TASKS, features=FEATURES, batch_size=16, progress=False)
    fit = trainer(max_epochs=1, limit_val_batches=None, num_sanity_val_steps=0, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit.fit(module(), dm)
    found = messages(record)
    train_warning = [m for m in found if m.startswith("train split: train/dwell/loss was inf or NaN in 4 of the 4 "
                                                      "logged steps of epoch 0")]
    assert len(train_warning) == 1 and "overflows float32" in train_warning[0]
    assert [m for m in found if m.startswith("val split: val/dwell/mse of task 'dwell' (regression) is inf: its "
                                             "labels or predictions are so large")]
    assert [m for m in found if m.startswith("val split: val/loss of the weighted sum over the tasks is inf")]
    assert not [m for m in found if "train/click/loss was" in m or "val/click" in m]
    assert math.isinf(fit.callback_metrics["val/dwell/mse"])  # logged as it is
    assert math.isfinite(fit.callback_metrics["val/click/logloss"])


# ------------------------------------------------------------------ clear errors where the cause is known
def test_resuming_another_architectures_checkpoint_names_both_classes(tmp_path):
    checkpoint = FIXTURES / "shared_bottom_sparse.ckpt"  # SharedBottom over user_id, item_id, dense_0, dense_1
    features = [SparseFeature("user_id", 20, 4), SparseFeature("item_id", 30, 4), DenseFeature("dense_0"),
                DenseFeature("dense_1")]
    tasks = [Task("click"), Task("conversion", weight=2.0), Task("dwell", kind="regression")]
    mmoe = MultiTaskLightningModule(MMoE(features, tasks, num_experts=2, expert_hidden=(8,), tower_hidden=(4,)))
    train = shutil.copy(FIXTURES / "train.parquet", tmp_path / "train.parquet")
    dm = ParquetDataModule(train=train, val=train, tasks=tasks, features=features, batch_size=16, progress=False)
    expected = (r"the checkpoint holds a SharedBottom model \(mtl_lightning\.architectures\.shared_bottom\.SharedBottom"
                r"\), but this module's model is a MMoE \(mtl_lightning\.architectures\.mmoe\.MMoE\)")
    with pytest.raises(ValueError, match=expected):
        trainer(max_steps=4).fit(mmoe, dm, ckpt_path=checkpoint)
    with pytest.raises(ValueError, match=expected):
        trainer().validate(mmoe, dm, ckpt_path=checkpoint, verbose=False)
    # the same architecture loads (and other sizes of it are named by feature, as before)
    same = SharedBottom(features, tasks, bottom_hidden=(8,), tower_hidden=(4,))
    assert isinstance(MultiTaskLightningModule.load_from_checkpoint(checkpoint, model=same).model, SharedBottom)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_true_precision_is_refused_with_the_mixed_alternative(tmp_path, precision):
    dm = ParquetDataModule(train=write_table(tmp_path / "train.parquet"), tasks=TASKS, features=FEATURES,
                           batch_size=16, progress=False)
    mixed = precision.replace("-true", "-mixed")
    with pytest.raises(ValueError, match=rf"Trainer\(precision='{precision}'\) casts every parameter and input to "
                                         rf"half precision.*Use precision='{mixed}'"):
        trainer(max_steps=1, precision=precision).fit(module(), dm)


def test_bf16_mixed_trains_on_the_cpu(tmp_path):
    dm = ParquetDataModule(train=write_table(tmp_path / "train.parquet"), tasks=TASKS, features=FEATURES,
                           batch_size=16, progress=False)
    m = module()
    before = [p.detach().clone() for p in m.parameters()]
    fit = trainer(max_steps=2, precision="bf16-mixed")
    fit.fit(m, dm)
    assert fit.global_step == 2 and any(not torch.equal(b, p) for b, p in zip(before, m.parameters()))
