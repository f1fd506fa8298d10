"""fill_missing: constants and train-split means (hand values), indicators, normalisation, state, streaming and in memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, SparseFeature, Task


@pytest.fixture()
def files(tmp_path):
    # train: price has a null and a NaN (present: 1, 3, 8 -> mean 4); age (integers) a null (present: 10, 30, 50, 70)
    pq.write_table(pa.table({
        "price": pa.array([1.0, None, 3.0, float("nan"), 8.0], pa.float64()),
        "age": pa.array([10, None, 30, 50, 70], pa.int64()),
        "click": pa.array([0.0, 1.0, 0.0, 1.0, 1.0], pa.float32()),
    }), tmp_path / "train.parquet", row_group_size=2)
    pq.write_table(pa.table({
        "price": pa.array([None, 2.0, float("nan")], pa.float64()),
        "age": pa.array([None, 20, 40], pa.int64()),
        "click": pa.array([0.0, 1.0, 0.0], pa.float32()),
    }), tmp_path / "val.parquet")
    return tmp_path


def _module(files, **kwargs) -> ParquetDataModule:
    return ParquetDataModule(train=files / "train.parquet", val=files / "val.parquet", tasks=[Task("click")],
                             batch_size=16, shuffle=False, **kwargs)


def _split(data: ParquetDataModule, split: str) -> dict[str, torch.Tensor]:
    batches = list(data.dataset(split))
    return {name: torch.cat([b["features"][name] for b in batches]) for name in batches[0]["features"]}


@pytest.mark.parametrize("streaming", [False, True])
def test_constant_and_mean_fill_with_indicator(files, streaming):
    data = _module(files, fill_missing={"price": -1.5, "age": "mean"}, missing_indicator=["age"], streaming=streaming,
                   read_rows=2)
    data.setup("fit")
    assert [f.name for f in data.features] == ["price", "age", "age_missing"]  # the integer age is dense, not an id
    val = _split(data, "val")
    assert val["price"].tolist() == [-1.5, 2.0, -1.5]
    assert val["age"].tolist() == [40.0, 20.0, 40.0]  # (10 + 30 + 50 + 70) / 4
    assert val["age_missing"].tolist() == [1.0, 0.0, 0.0]
    assert "price_missing" not in val
    train = _split(data, "train")
    assert sorted(train["price"].tolist()) == [-1.5, -1.5, 1.0, 3.0, 8.0]
    assert data.state_dict()["fill_missing"] == {
        "price": {"fill": -1.5, "value": -1.5, "indicator": False},
        "age": {"fill": "mean", "value": 40.0, "indicator": True},
    }


@pytest.mark.parametrize("streaming", [False, True])
def test_mean_fill_then_normalise_with_statistics_of_present_values(files, streaming):
    data = _module(files, fill_missing={"price": "mean"}, missing_indicator=True, normalize=True, streaming=streaming,
                   exclude=["age"])
    data.setup("fit")
    mean, std = 4.0, float(np.std([1.0, 3.0, 8.0]))  # present values only
    assert data.fillers["price"].value == pytest.approx(4.0)
    assert data.normalizers["price"].mean.tolist() == pytest.approx([mean])
    assert data.normalizers["price"].std.tolist() == pytest.approx([std])
    assert "price_missing" not in data.normalizers  # an indicator stays 0/1
    val = _split(data, "val")
    np.testing.assert_allclose(val["price"].numpy(), [0.0, (2.0 - mean) / std, 0.0], atol=1e-6)
    assert val["price_missing"].tolist() == [1.0, 0.0, 1.0]


def test_state_is_restored_into_a_data_module_without_train(files):
    fitted = _module(files, fill_missing={"price": "mean"}, missing_indicator=True, exclude=["age"])
    fitted.setup("fit")
    serving = ParquetDataModule(val=files / "val.parquet", tasks=[Task("click")], batch_size=16, shuffle=False,
                                exclude=["age"])
    serving.load_state_dict(fitted.state_dict())
    assert [f.name for f in serving.features] == ["price", "price_missing"]
    assert _split(serving, "val")["price"].tolist() == [4.0, 2.0, 4.0]


def test_missing_value_errors_say_how_to_fill(files):
    # inferred features: every column with missing values is named at once (price: 2 + 2 over the splits; age: 1 + 1)
    with pytest.raises(ValueError) as error:
        _module(files).setup("fit")
    message = str(error.value)
    assert "train.parquet: cannot infer the features of 2 column(s)" in message
    assert "column 'price' holds numbers and 4 missing values (null or NaN)" in message
    assert "column 'age' holds integer ids and 2 nulls" in message
    assert "ParquetDataModule(categorical={'age': {}})" in message
    assert "ParquetDataModule(fill_missing={'price': 'mean'}, missing_indicator=True)" in message
    pq.write_table(pa.table({"price": pa.array([1.0, float("nan")]), "click": pa.array([0.0, 1.0])}),
                   files / "nan.parquet")
    with pytest.raises(ValueError, match=r"(?s)nan.parquet: cannot infer .*'price' holds numbers and 1 missing values.*"
                                         r"fill_missing=\{'price': 'mean'\}, missing_indicator=True"):
        ParquetDataModule(train=files / "nan.parquet", tasks=[Task("click")]).setup("fit")
    # given features: the reader names every feature column with missing values of the file at once
    given = [DenseFeature("price"), SparseFeature("age", 100, 4)]
    with pytest.raises(ValueError) as error:
        _module(files, features=given).setup("fit")
    assert str(error.value).startswith(f"{files / 'train.parquet'}: 2 feature column(s) have missing values (null or "
                                       "NaN): 'price' (1 in the 2 rows read, a DenseFeature), 'age' (1 in the 2 rows "
                                       "read, a SparseFeature); fill the numbers: ParquetDataModule(fill_missing={'price': "
                                       "'mean'}, missing_indicator=True)")
    assert "encode the ids: ParquetDataModule(categorical={'age': {}}) (nulls get id 0)" in str(error.value)
    with pytest.raises(ValueError, match="expected a number or 'mean', got 'median'"):
        _module(files, fill_missing={"price": "median"})
    with pytest.raises(ValueError, match=r"missing_indicator names \['age'\], which are not in fill_missing"):
        _module(files, fill_missing={"price": 0.0}, missing_indicator=["age"])
    with pytest.raises(ValueError, match="train.parquet: missing feature column 'click_rate'"):
        _module(files, fill_missing={"price": 0.0, "age": 0.0, "click_rate": 0.0}).setup("fit")
    with pytest.raises(ValueError, match="fill_missing names 'age', which is not a dense feature"):
        _module(files, features=[DenseFeature("price"), SparseFeature("age", 71, 4)],
                fill_missing={"price": 0.0, "age": 0.0}).setup("fit")
    pq.write_table(pa.table({"price": pa.array([None, None], pa.float64()), "click": pa.array([0.0, 1.0])}),
                   files / "empty.parquet")
    with pytest.raises(ValueError, match=r"fill_missing\['price'\] = 'mean': the training split holds no value"):
        ParquetDataModule(train=files / "empty.parquet", tasks=[Task("click")], fill_missing={"price": "mean"}).setup()
