"""Metrics of multi-class tasks against hand-computed accuracy, macro one-vs-rest AUC and cross-entropy: weighted,
with ignored rows, per scenario, with an absent class, with one class only (AUC skipped and warned about)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from mtl_lightning import Task
from mtl_lightning.evaluation import SplitEvaluation
from mtl_lightning.metrics.multiclass import macro_auc

GENRE = Task("genre", kind="multiclass", num_classes=3)
LOGITS = torch.tensor([[2.0, 0.1, 0.3], [0.2, 1.5, 0.1], [0.1, 0.2, 0.9], [1.0, 1.2, 0.0], [0.3, 0.2, 0.1],
                       [0.0, 0.4, 2.0], [1.1, 0.0, 0.5], [0.2, 0.9, 0.3], [5.0, 0.0, 0.0]])
LABELS = torch.tensor([0.0, 1.0, 2.0, 0.0, 2.0, 2.0, 1.0, 1.0, -1.0])  # the last row is ignored
WEIGHTS = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 3.0, 1.0, 1.0, 9.0])
SCENARIOS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])


def auc_one_vs_rest(p: list[float], positive: list[bool]) -> float:
    """The share of (positive, negative) pairs ordered right, ties counting one half."""
    pairs = [(a, b) for a, pa in zip(p, positive) if pa for b, pb in zip(p, positive) if not pb]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def by_hand(rows: list[int], weights: bool = True) -> dict[str, float]:
    """accuracy, macro AUC (over the classes with both positive and negative rows) and log-loss of ``rows``."""
    w = [float(WEIGHTS[i]) if weights else 1.0 for i in rows]
    y = [int(LABELS[i]) for i in rows]
    p = [torch.softmax(LOGITS[i], 0).tolist() for i in rows]
    correct = [float(max(range(3), key=lambda c: p[k][c]) == y[k]) for k in range(len(rows))]
    logloss = [-math.log(p[k][y[k]]) for k in range(len(rows))]
    aucs = [auc_one_vs_rest([q[c] for q in p], [label == c for label in y]) for c in range(3)
            if 0 < sum(label == c for label in y) < len(y)]
    return {"accuracy": sum(a * b for a, b in zip(w, correct)) / sum(w),
            "logloss": sum(a * b for a, b in zip(w, logloss)) / sum(w), "auc": sum(aucs) / len(aucs)}


def evaluate(logits: torch.Tensor, labels: torch.Tensor, **batch) -> dict[str, float]:
    evaluation = SplitEvaluation("val", [GENRE])
    evaluation.update({"genre": logits}, {"features": {}, "labels": {"genre": labels}, **batch})
    return {k: float(v) for k, v in evaluation.compute().items()}


def test_split_metrics_are_the_hand_computed_weighted_accuracy_macro_auc_and_cross_entropy():
    logged = evaluate(LOGITS, LABELS, weights={"genre": WEIGHTS}, scenario=SCENARIOS)
    expected = by_hand(list(range(8)))
    for name in ("accuracy", "auc", "logloss"):
        assert logged[f"val/genre/{name}"] == pytest.approx(expected[name], rel=1e-5), name
    assert logged["val/loss"] == pytest.approx(expected["logloss"], rel=1e-5)  # Task.weight 1 x the cross-entropy
    for scenario, rows in ((0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])):  # row 8 (scenario 1) is ignored
        expected = by_hand(rows)
        for name in ("accuracy", "auc", "logloss"):
            assert logged[f"val/genre/{name}/domain={scenario}"] == pytest.approx(expected[name], rel=1e-5)
    # binary-only metrics are not computed for a multi-class task
    assert {key.split("/")[2] for key in logged if key.startswith("val/genre/")} == {"accuracy", "auc", "logloss"}


def test_without_weights_accuracy_is_torchmetrics_micro_accuracy_and_auc_is_unweighted():
    logged = evaluate(LOGITS, LABELS)
    valid = LABELS != -1
    micro = MulticlassAccuracy(num_classes=3, average="micro")(LOGITS[valid], LABELS[valid].long())
    assert logged["val/genre/accuracy"] == pytest.approx(float(micro), rel=1e-6)
    assert logged["val/genre/accuracy"] == pytest.approx(by_hand(list(range(8)), weights=False)["accuracy"])
    # AUC reads no weights: the same with and without them
    assert logged["val/genre/auc"] == pytest.approx(evaluate(LOGITS, LABELS, weights={"genre": WEIGHTS})["val/genre/auc"])


def test_a_class_absent_from_the_labels_is_left_out_of_the_macro_auc():
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # no row of class 2
    logged = evaluate(LOGITS, labels)
    p = torch.softmax(LOGITS, 1)
    expected = (auc_one_vs_rest(p[:, 0].tolist(), (labels == 0).tolist())
                + auc_one_vs_rest(p[:, 1].tolist(), (labels == 1).tolist())) / 2
    assert logged["val/genre/auc"] == pytest.approx(expected, rel=1e-5)
    ids, aucs, defined = macro_auc(p, labels, torch.zeros(9, dtype=torch.long))
    assert ids.tolist() == [0] and defined.tolist() == [True] and float(aucs[0]) == pytest.approx(expected, rel=1e-6)


def test_one_class_only_skips_the_auc_with_a_warning_and_keeps_accuracy_and_logloss():
    labels = torch.ones(9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = evaluate(LOGITS, labels, scenario=SCENARIOS)
    assert "val/genre/auc" not in logged and "val/genre/auc/domain=0" not in logged
    assert logged["val/genre/accuracy"] == pytest.approx(3 / 9)  # rows 1, 3, 7 pick class 1
    assert "val/genre/logloss/domain=1" in logged
    messages = [str(w.message) for w in caught]
    assert any("task 'genre' has labels of one class only" in m and "val/genre/auc" in m for m in messages)
    assert any("one class only in scenarios [0, 1]" in m for m in messages)


def test_a_task_without_valid_rows_logs_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = evaluate(LOGITS, torch.full((9,), -1.0))
    assert not [key for key in logged if "genre" in key]
