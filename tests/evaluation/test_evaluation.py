"""Evaluation on real-looking data: tasks without valid labels, one-class splits, learning-rate checks, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torchmetrics.functional import mean_absolute_error, mean_squared_error
from torchmetrics.functional.classification import binary_auroc

from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.features import DenseFeature, SparseFeature
from mtl_lightning.metrics import group_auc


TASKS = [Task("click"), Task("conversion"), Task("dwell", kind="regression", weight=0.5)]


def features(users: int = 20) -> list:
    return [SparseFeature("user_id", users, 4), SparseFeature("city", 7, 4), DenseFeature("x")]


def tiny_module(users: int = 20, **kwargs) -> MultiTaskLightningModule:
    torch.manual_seed(0)
    return MultiTaskLightningModule(SharedBottom(features(users), TASKS, bottom_hidden=(8,), tower_hidden=(4,)),
                                    **kwargs)


def make_batches(n: int = 3, size: int = 32, seed: int = 0, conversion: str = "mixed", click: str = "mixed",
                 group: bool = False) -> list[dict]:
    """``conversion="none"``: every conversion label is -1 (all unclicked); ``click="ones"``: all clicked."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        clicks = (torch.rand(size, generator=g) < 0.4).float() if click == "mixed" else torch.ones(size)
        labels = {
            "click": clicks,
            "conversion": torch.where(clicks > 0, (torch.rand(size, generator=g) < 0.5).float(), torch.tensor(-1.0)),
            "dwell": torch.randn(size, generator=g),
        }
        if conversion == "none":
            labels["conversion"] = torch.full((size,), -1.0)
        batch = {"features": {"user_id": torch.randint(0, 20, (size,), generator=g),
                              "city": torch.randint(0, 7, (size,), generator=g), "x": torch.randn(size, generator=g)},
                 "labels": labels}
        if group:
            batch["group"] = batch["features"]["user_id"] % 4
        batches.append(batch)
    return batches


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None)


def expected_metrics(module: MultiTaskLightningModule, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The metrics by hand (torchmetrics' functional AUROC), over every valid row of every batch."""
    module.eval()
    with torch.no_grad():
        outputs = [module.model(b["features"]) for b in batches]
    cat = lambda task, source: torch.cat([o[task] if source == "out" else b["labels"][task]  # noqa: E731
                                          for o, b in zip(outputs, batches)])
    out = {}
    for task in ("click", "conversion"):
        logits, labels = cat(task, "out"), cat(task, "labels")
        keep = labels != -1
        if labels[keep].unique().numel() == 2:
            out[f"{task}/auc"] = binary_auroc(torch.sigmoid(logits[keep]), labels[keep].long())
        if keep.any():
            out[f"{task}/logloss"] = F.binary_cross_entropy_with_logits(logits[keep].double(), labels[keep].double())
    out["dwell/mse"] = mean_squared_error(cat("dwell", "out"), cat("dwell", "labels"))
    out["dwell/mae"] = mean_absolute_error(cat("dwell", "out"), cat("dwell", "labels"))
    return out


BINARY = ("auc", "logloss", "ne", "pcoc", "ece")
REGRESSION = ("mse", "mae", "xauc")


def keys(stage: str, **tasks: tuple[str, ...]) -> set[str]:
    """The keys logged for ``tasks`` (``task=metric names``), plus ``<stage>/loss``."""
    return {f"{stage}/{task}/{m}" for task, names in tasks.items() for m in names} | {f"{stage}/loss"}


def skip_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "warned once per task and split" in str(w.message)]


def test_validation_without_labels_for_a_task_skips_its_metrics_and_warns_once(quiet_trainer):
    module = tiny_module()
    batches = make_batches(conversion="none")
    trainer = quiet_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.validate(module, loader(batches), verbose=False)[0]
        again = trainer.validate(module, loader(batches), verbose=False)[0]  # a second epoch: no second warning
    assert result == again
    assert set(result) == keys("val", click=BINARY, dwell=REGRESSION)
    expected = expected_metrics(module, batches)
    for key in ("click/auc", "click/logloss", "dwell/mse", "dwell/mae"):
        assert result[f"val/{key}"] == pytest.approx(float(expected[key]), rel=1e-5), key
    # val/loss: the weighted sum over the tasks with valid rows (conversion has none)
    assert result["val/loss"] == pytest.approx(float(expected["click/logloss"] + 0.5 * expected["dwell/mse"]), rel=1e-5)
    messages = skip_warnings(caught)
    assert len(messages) == 1, messages
    assert "val split: task 'conversion' has no row with a valid label" in messages[0]
    assert ("val/conversion/auc, val/conversion/ece, val/conversion/logloss, val/conversion/ne, val/conversion/pcoc "
            "are not logged") in messages[0]
    assert "ignore_label=-1" in messages[0]


def test_test_split_returns_the_other_metrics_and_names_the_split(quiet_trainer):
    module = tiny_module()
    batches = make_batches(conversion="none", seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quiet_trainer().test(module, loader(batches), verbose=False)[0]
    assert set(result) == keys("test", click=BINARY, dwell=REGRESSION)
    assert result["test/click/auc"] == pytest.approx(float(expected_metrics(module, batches)["click/auc"]), rel=1e-5)
    messages = skip_warnings(caught)
    assert len(messages) == 1 and messages[0].startswith("test split: task 'conversion'"), messages


def test_one_class_split_does_not_log_auc_or_gauc_as_numbers(quiet_trainer):
    module = tiny_module()
    batches = make_batches(click="ones", group=True)  # every row clicked: click AUC is undefined
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quiet_trainer().validate(module, loader(batches), verbose=False)[0]
    assert "val/click/auc" not in result and "val/click/gauc" not in result and "val/click/ne" not in result
    assert result["val/click/pcoc"] > 0  # defined: there are positives
    expected = expected_metrics(module, batches)
    assert result["val/click/logloss"] == pytest.approx(float(expected["click/logloss"]), rel=1e-5)
    assert result["val/conversion/auc"] == pytest.approx(float(expected["conversion/auc"]), rel=1e-5)
    logits = torch.cat([module.model(b["features"])["conversion"].detach() for b in batches])
    labels = torch.cat([b["labels"]["conversion"] for b in batches])
    groups = torch.cat([b["group"] for b in batches])
    assert result["val/conversion/gauc"] == pytest.approx(float(group_auc(logits, labels, groups)), rel=1e-5)
    assert result["val/loss"] == pytest.approx(
        float(expected["click/logloss"] + expected["conversion/logloss"] + 0.5 * expected["dwell/mse"]), rel=1e-5)
    messages = skip_warnings(caught)
    assert len(messages) == 1, messages
    assert "val split: task 'click' has labels of one class only (all 96 valid labels are 1)" in messages[0]
    assert "so AUC, NE are undefined; val/click/auc, val/click/ne, val/click/gauc are not logged" in messages[0]


def test_regression_task_without_valid_rows_and_no_task_at_all(quiet_trainer):
    module = tiny_module()
    batches = make_batches(conversion="none")
    for b in batches:
        b["labels"]["dwell"] = torch.full_like(b["labels"]["dwell"], float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quiet_trainer().validate(module, loader(batches), verbose=False)[0]
    assert set(result) == keys("val", click=BINARY)
    assert result["val/loss"] == pytest.approx(result["val/click/logloss"], rel=1e-6)
    assert sorted(m.split("'")[1] for m in skip_warnings(caught)) == ["conversion", "dwell"]

    for b in batches:
        b["labels"]["click"] = torch.full_like(b["labels"]["click"], -1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quiet_trainer().validate(module, loader(batches), verbose=False)[0]
    assert result == {}  # nothing is defined: nothing is logged, nothing crashes
    messages = skip_warnings(caught)
    assert len(messages) == 1 and "task 'click'" in messages[0] and "nor is val/loss" in messages[0], messages


def test_fit_with_all_unclicked_sanity_batches_and_an_unlabelled_validation_split(tmp_path, quiet_trainer):
    module = tiny_module()
    train = make_batches(n=4, seed=1)
    # the sanity check's 2 batches have no clicked row; the full validation split has some
    val = make_batches(n=2, seed=2, conversion="none") + make_batches(n=2, seed=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(train), loader(val))
    messages = skip_warnings(caught)
    assert len(messages) == 1 and messages[0].startswith("val (sanity check) split: task 'conversion'"), messages
    expected = expected_metrics(module, val)
    assert float(trainer.callback_metrics["val/conversion/auc"]) == pytest.approx(
        float(expected["conversion/auc"]), rel=1e-5)

    # a whole validation split without conversion labels: every epoch completes, val/loss is monitored
    module = tiny_module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "none", monitor="val/loss")
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, enable_checkpointing=True, callbacks=[checkpoint])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(train), loader(make_batches(n=2, seed=2, conversion="none")))
    assert trainer.current_epoch == 2 and checkpoint.best_model_path
    assert "val/conversion/auc" not in trainer.callback_metrics
    assert all(math.isfinite(float(p.detach().sum())) for p in module.parameters())
    assert len(skip_warnings(caught)) == 1  # two epochs, one warning


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adagrad"])
@pytest.mark.parametrize("name, value", [("lr", float("nan")), ("lr", float("inf")), ("lr", -1e-3),
                                         ("weight_decay", -0.1), ("weight_decay", float("nan")),
                                         ("sparse_lr", float("nan")), ("sparse_lr", -1.0)])
def test_rejects_non_finite_or_negative_rates(optimizer, name, value):
    kwargs = {name: value, **({"sparse_embeddings": True} if name == "sparse_lr" else {})}
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number >= 0, got {value!r}"):
        tiny_module(optimizer=optimizer, **kwargs)


def test_rate_checks_accept_zero_and_reject_non_numbers():
    module = tiny_module(optimizer="sgd", lr=0.0, weight_decay=0.0)
    assert [g["lr"] for g in module.configure_optimizers().param_groups] == [0.0]
    module = tiny_module(optimizer="sgd", lr=0.0, sparse_embeddings=True, sparse_lr=0.5)
    optimizer = module.configure_optimizers()
    assert [g["lr"] for part in optimizer.optimizers for g in part.param_groups] == [0.5, 0.0]
    for kwargs in (dict(lr=0.0), dict(sparse_lr=0.0)):  # SparseAdam refuses 0: said when the module is built
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be > 0 with sparse_embeddings=True"):
            tiny_module(sparse_embeddings=True, **kwargs)
    with pytest.raises(TypeError, match="lr must be a number, got str '1e-3'"):
        tiny_module(lr="1e-3")


def test_ddp_ranks_skip_the_same_metrics_on_synced_counts(tmp_path):
    """Rank 0 sees no conversion label, rank 1 some: both log the AUC of rank 1's rows; with none anywhere,
    both skip it (no rank waits in a collective the other never calls)."""
    script = Path(__file__).parents[1] / "scripts" / "ddp_eval_skip.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)  # a hang (ranks deciding differently) fails here
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {(run, rank): json.loads((tmp_path / f"{run}_rank{rank}.json").read_text())
            for run in ("partial", "none") for rank in (0, 1)}
    for run in ("partial", "none"):
        assert runs[run, 0]["metrics"] == runs[run, 1]["metrics"]
    partial = runs["partial", 0]
    assert partial["metrics"]["val/conversion/auc"] == pytest.approx(partial["expected_conversion_auc"], abs=1e-6)
    assert partial["warnings"] == []
    assert set(runs["none", 0]["metrics"]) == keys("val", click=BINARY)
    assert len(runs["none", 0]["warnings"]) == 1 and "task 'conversion'" in runs["none", 0]["warnings"][0]
    assert runs["none", 1]["warnings"] == []  # rank_zero_warn: rank 0 only


def test_resume_into_a_grown_or_shrunk_vocabulary_names_the_feature(tmp_path, quiet_trainer):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        tiny_module(users=20), loader(make_batches(n=2)))
    for users in (30, 12):
        with pytest.raises(ValueError, match=rf"feature 'user_id': the checkpoint's table has 20 rows, the model's "
                                             rf"{users} \(the vocabulary changed since the checkpoint was written"):
            quiet_trainer(max_epochs=2).fit(tiny_module(users=users), loader(make_batches(n=2)),
                                            ckpt_path=checkpoint.last_model_path)
    # load_from_checkpoint(model=...) and a bare load_state_dict have no checkpoint feature specs to compare:
    # the embedding layer names the features whose tables share the fused weight
    grown = SharedBottom(features(30), TASKS, bottom_hidden=(8,), tower_hidden=(4,))
    fused = (r"model.embedding.fused.dim4.weight has 27 rows, the model's 37: it holds the tables of the features "
             r"'user_id' \(30\), 'city' \(7\)")
    with pytest.raises(ValueError, match=fused):
        MultiTaskLightningModule.load_from_checkpoint(checkpoint.last_model_path, model=grown)
    saved = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
    with pytest.raises(ValueError, match=fused):
        tiny_module(users=30).load_state_dict(saved)
    resumed = tiny_module(users=20)  # the same vocabulary still resumes
    quiet_trainer(max_epochs=2).fit(resumed, loader(make_batches(n=2)), ckpt_path=checkpoint.last_model_path)
    assert resumed.current_epoch == 2


def test_embedding_layer_names_a_resized_sequence_table_and_an_earlier_layout_table():
    from mtl_lightning.features import SequenceFeature
    from mtl_lightning.layers import FeatureEmbedding

    def layer(items: int, users: int) -> FeatureEmbedding:
        return FeatureEmbedding([SparseFeature("user_id", users, 4), SequenceFeature("history", items, 5, 4)])

    with pytest.raises(ValueError, match="feature 'history': the checkpoint's table has 12 rows, the model's 10"):
        layer(10, 20).load_state_dict(layer(12, 20).state_dict())
    one = lambda users: FeatureEmbedding([SparseFeature("user_id", users, 4)])  # noqa: E731  (a one-table weight)
    with pytest.raises(ValueError, match="feature 'user_id': the checkpoint's table has 20 rows, the model's 30"):
        one(30).load_state_dict(one(20).state_dict())
    old_layout = {"tables.user_id.weight": torch.zeros(25, 4), "tables.history.weight": torch.zeros(10, 4)}
    with pytest.raises(ValueError, match="feature 'user_id': the checkpoint's table has 25 rows, the model's 20"):
        layer(10, 20).load_state_dict(old_layout)
    target = layer(10, 20)
    target.load_state_dict({"tables.user_id.weight": torch.ones(20, 4), "tables.history.weight": torch.ones(10, 4)})
    assert torch.equal(target.table_weight("user_id"), torch.ones(20, 4))  # the earlier layout still loads


def test_a_metric_undefined_in_a_later_epoch_leaves_no_stale_value_for_callbacks(quiet_trainer):
    import lightning as L

    val = make_batches(n=2, seed=2)

    class DropConversionLabels(L.Callback):  # the split changes after the first validation epoch
        def on_validation_end(self, trainer, pl_module):
            val[:] = make_batches(n=2, seed=2, conversion="none")

    seen = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Record(), DropConversionLabels()])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer.fit(tiny_module(), loader(make_batches(n=2, seed=1)), loader(val))
    assert "val/conversion/auc" in seen[0] and "val/conversion/logloss" in seen[0]
    assert "val/conversion/auc" not in seen[1] and "val/conversion/logloss" not in seen[1]
    assert seen[1]["val/loss"] != seen[0]["val/loss"] and "val/click/auc" in seen[1]
