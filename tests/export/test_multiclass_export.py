"""A multi-class task in the ONNX, TorchScript and torch.export (.pt2) exports: each returns the task's K softmax
probabilities, ``(batch, K)``, equal to ``predict_step``'s (float32 tables) and to the quantized model's (int8
tables), and the verification report compares them with its multi-class metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtl_lightning import MultiTaskLightningModule, Task, registry
from mtl_lightning.export import ServingModel, example_features, export_onnx, export_program, export_torchscript
from mtl_lightning.features import DenseFeature, SparseFeature
from mtl_lightning.quantized import serving_copy
from mtl_lightning.verification import open_runtime

FEATURES = [SparseFeature("user", 50, 8), SparseFeature("item", 40, 8), DenseFeature("price")]
TASKS = [Task("click"), Task("genre", kind="multiclass", num_classes=4), Task("dwell", kind="regression")]
EXPORTS = {"onnx": (export_onnx, "model.onnx"), "torchscript": (export_torchscript, "model.pt"),
           "program": (export_program, "model.pt2")}


@pytest.fixture(scope="module")
def module() -> MultiTaskLightningModule:
    torch.manual_seed(0)
    model = registry.create("mmoe", features=FEATURES, tasks=TASKS, num_experts=2, expert_hidden=(16,),
                            tower_hidden=(8,))
    with torch.no_grad():  # spread the outputs, so the probabilities differ from row to row
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return MultiTaskLightningModule(model).eval()


def labelled_batches(rows: int = 200) -> list[dict]:
    features = example_features(tuple(FEATURES), batch_size=rows, seed=1)
    g = torch.Generator().manual_seed(2)
    labels = {"genre": torch.randint(0, 4, (rows,), generator=g).float(),
              "click": torch.randint(0, 2, (rows,), generator=g).float()}
    labels["genre"][:5] = -1  # ignored rows
    return [{"features": features, "labels": labels}]


@pytest.mark.parametrize("table_dtype", ["float32", "int8"])
@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_exports_return_the_k_probabilities_of_a_multiclass_task(module, kind, table_dtype, tmp_path):
    export, name = EXPORTS[kind]
    options = {"compile": False} if kind == "program" else {}
    path = export(module, tmp_path / name, table_dtype=table_dtype,
                  verification={"split": labelled_batches(), "latency_batch_sizes": ()}, **options)
    features = example_features(tuple(FEATURES), batch_size=37, seed=5)
    served = open_runtime(path, kind, [f.name for f in FEATURES])(features)
    genre = np.asarray(served["genre"])
    assert genre.shape == (37, 4)
    np.testing.assert_allclose(genre.sum(1), 1.0, rtol=1e-5)
    # what the served model computes in PyTorch: predict_step's outputs, with the tables the export stores
    reference = serving_copy(ServingModel(module), table_dtype)
    with torch.no_grad():
        expected = reference(features)
        if table_dtype == "float32":
            torch.testing.assert_close(expected["genre"], module.predict_step({"features": features}, 0)["genre"])
    for output in ("click", "genre", "dwell"):
        np.testing.assert_allclose(np.asarray(served[output]), expected[output].numpy(), rtol=0, atol=1e-5)
    report = json.loads((tmp_path / f"{name}.verification.json").read_text())
    entry = report["outputs"]["genre"]
    assert entry["kind"] == "multiclass" and entry["labelled_rows"] == 195
    assert set(entry["exported"]) == {"auc", "log_loss", "accuracy"} and 0 < entry["reference"]["auc"] < 1
    if table_dtype == "float32":
        assert entry["max_abs_difference"] <= 1e-5 and abs(entry["auc_drop"]) <= 1e-6
    assert report["max_probability_difference"] >= entry["max_abs_difference"]


def test_verification_metrics_of_a_multiclass_output_by_hand():
    from mtl_lightning.verification import compare

    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]], dtype=np.float32)
    y = np.array([0.0, 1.0, 0.0, -1.0], dtype=np.float32)  # the last row is ignored; class 2 has no row
    out = compare({"genre": p}, {"genre": p + 0.01}, {"genre": "multiclass"}, {"genre": y}, -1)["genre"]
    assert out["labelled_rows"] == 3 and out["max_abs_difference"] == pytest.approx(0.01, abs=1e-6)
    reference = out["reference"]
    assert reference["accuracy"] == pytest.approx(2 / 3)  # row 2 picks class 2
    assert reference["log_loss"] == pytest.approx(-(np.log(0.7) + np.log(0.8) + np.log(0.3)) / 3, rel=1e-6)
    # class 0 (rows 0, 2) against row 1: 0.7, 0.3 > 0.1 -> 1; class 1 (row 1) against rows 0, 2: 0.8 > 0.2, 0.3 -> 1
    assert reference["auc"] == pytest.approx(1.0)
