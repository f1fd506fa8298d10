"""Labels are checked like features; inference keeps labels out and refuses absurd vocabularies."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules import ParquetDataModule
from datamodules.synthetic import make_table, synthetic_tasks
from mtl_lightning import Task
from mtl_lightning.features import DenseFeature, SparseFeature

FEATURES = [SparseFeature("user", 10), DenseFeature("x")]


def _write(tmp_path, name: str, label: pa.Array, kind_label: str = "y") -> str:
    n = len(label)
    table = pa.table({"user": pa.array(np.arange(n) % 10, pa.int64()), "x": pa.array(np.ones(n, np.float32)),
                      kind_label: label})
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def _read(path: str, task: Task, streaming: bool = False, **kwargs) -> list:
    dm = ParquetDataModule(train=path, tasks=[task], features=FEATURES, batch_size=4, streaming=streaming,
                           shuffle=False, **kwargs)
    dm.setup("fit")
    return list(dm.dataset("train"))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "values, kind, bad, example",
    [
        ([0.0, 1.0, float("inf"), 1.0], "binary", 1, "inf"),
        ([0.0, -2.0, -2.0, 1.0], "binary", 2, "-2.0"),
        ([0.0, 0.5, 1.0, 1.0], "binary", 1, "0.5"),
        ([0.5, float("inf"), 1.0, float("-inf")], "regression", 2, "inf"),
        ([0.5, 1e39, 1.0, 2.0], "regression", 1, "1e+39"),  # finite as float64, inf as float32
    ],
)
def test_bad_labels_are_refused_with_file_column_count_and_example(tmp_path, values, kind, bad, example, streaming):
    path = _write(tmp_path, "bad.parquet", pa.array(values, pa.float64()))
    with pytest.raises(ValueError) as info:
        _read(path, Task("y", kind=kind), streaming=streaming)
    message = str(info.value)
    assert "bad.parquet" in message and "'y'" in message and kind in message
    assert f"has {bad} rows" in message
    assert example in message


@pytest.mark.parametrize("streaming", [False, True])
def test_valid_labels_pass_and_missing_ones_become_nan_or_stay_ignored(tmp_path, streaming):
    binary = _write(tmp_path, "b.parquet", pa.array([0.0, 1.0, -1.0, None, float("nan"), 1.0], pa.float32()))
    batches = _read(binary, Task("y"), streaming=streaming)
    labels = np.concatenate([b["labels"]["y"].numpy() for b in batches])
    np.testing.assert_array_equal(labels[[0, 1, 2, 5]], [0, 1, -1, 1])
    assert np.isnan(labels[[3, 4]]).all()
    for name, array in (("bool", pa.array([True, False, True])), ("int", pa.array([0, 1, -1], pa.int8()))):
        path = _write(tmp_path, f"{name}.parquet", array)
        labels = np.concatenate([b["labels"]["y"].numpy() for b in _read(path, Task("y"), streaming=streaming)])
        np.testing.assert_array_equal(labels, np.asarray(array.to_pylist(), np.float32))
    regression = _write(tmp_path, "r.parquet", pa.array([-3.5, 1e30, None, -1.0], pa.float64()))
    labels = np.concatenate([b["labels"]["y"].numpy() for b in _read(regression, Task("y", kind="regression"))])
    assert labels[0] == -3.5 and labels[1] == np.float32(1e30) and np.isnan(labels[2])


def test_ignore_label_of_the_data_module_is_the_one_accepted(tmp_path):
    path = _write(tmp_path, "m.parquet", pa.array([0.0, 1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match="ignore label -1"):
        _read(path, Task("y"))
    labels = np.concatenate([b["labels"]["y"].numpy() for b in _read(path, Task("y"), ignore_label=-2)])
    np.testing.assert_array_equal(labels, [0, 1, -2, 1])


def _demo_like(tmp_path) -> str:
    path = tmp_path / "demo.parquet"
    pq.write_table(make_table(2_000, seed=0), path)
    return str(path)


def test_inference_warns_about_label_like_columns_and_labels_keeps_them_out(tmp_path, caplog):
    path = _demo_like(tmp_path)
    with pytest.warns(UserWarning, match="'purchase' holds only 0/1 values"):
        inferred = ParquetDataModule(train=path, tasks=synthetic_tasks()).prepare_features()
    assert "purchase" in [f.name for f in inferred]  # inferred, but loudly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no label-like column left: no warning
        with caplog.at_level(logging.INFO):
            dm = ParquetDataModule(train=path, tasks=synthetic_tasks(), labels=["purchase"])
            names = [f.name for f in dm.prepare_features()]
    assert "purchase" not in names and {"click", "conversion", "dwell"}.isdisjoint(names)
    assert names == ["user_id", "item_id", "category", "city", "dense_0", "dense_1", "dense_2", "history"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "inferred features: user_id (SparseFeature, vocab_size=" in logged and "dense_0 (DenseFeature)" in logged


def test_inference_refuses_a_mostly_empty_or_huge_id_table(tmp_path):
    users = np.arange(60) % 50
    users[7] = 9_999_999
    path = tmp_path / "sparse_ids.parquet"
    pq.write_table(pa.table({"user": pa.array(users, pa.int64()), "y": pa.array(np.zeros(60, np.float32))}), path)
    with pytest.raises(ValueError, match=r"(?s)feature 'user'.*9999999.*at most 51 distinct.*num_buckets"):
        ParquetDataModule(train=str(path), tasks=[Task("y")]).prepare_features()
    users[7] = 2**40
    pq.write_table(pa.table({"user": pa.array(users, pa.int64()), "y": pa.array(np.zeros(60, np.float32))}), path)
    with pytest.raises(ValueError, match=r"(?s)feature 'user'.*max_inferred_vocab=16,777,216.*num_buckets"):
        ParquetDataModule(train=str(path), tasks=[Task("y")]).prepare_features()
    # a dense id range of the same size is fine, and the limit is a parameter
    dense_ids = np.arange(20_000)
    pq.write_table(pa.table({"user": pa.array(dense_ids, pa.int64()), "y": pa.array(np.zeros(20_000, np.float32))}),
                   path)
    assert ParquetDataModule(train=str(path), tasks=[Task("y")]).prepare_features()[0].vocab_size == 20_000
    with pytest.raises(ValueError, match="max_inferred_vocab=1,000"):
        ParquetDataModule(train=str(path), tasks=[Task("y")], max_inferred_vocab=1_000).prepare_features()
