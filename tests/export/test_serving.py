"""Serving with preprocessing: raw Parquet rows (strings, nulls, NaN) through the exported files give trainer.predict."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.serving import Preprocessor
from mtl_lightning import MultiTaskLightningModule, Task, registry
from mtl_lightning.features import feature_to_config
from mtl_lightning.export import export_onnx, export_torchscript, main, preprocessing_path


def _raw_rows(n: int, seed: int, cities: list) -> pa.Table:
    """Raw columns: a string category (with nulls), a hashed string, integer ids, a dense column with NaN and nulls."""
    rng = np.random.default_rng(seed)
    city = pa.array(rng.choice(np.array(cities, dtype=object), n).tolist(), pa.string())
    price = rng.normal(5.0, 2.0, n)
    price[rng.random(n) < 0.2] = np.nan
    price_mask = rng.random(n) < 0.1  # nulls as well as NaN
    user = rng.integers(0, 40, n)
    signal = (np.nan_to_num(price, nan=5.0) - 5.0) / 2.0 + (user % 3 == 0) + (city.to_numpy(zero_copy_only=False) == "rome")
    return pa.table({
        "city": city,
        "device": pa.array(rng.choice(["ios", "android", "web", "tv"], n).tolist(), pa.string()),
        "user": pa.array(user, pa.int64()),
        "price": pa.array(price, mask=price_mask),
        "age": pa.array(rng.normal(40.0, 10.0, n).astype(np.float32)),
        "click": pa.array((rng.random(n) < 1 / (1 + np.exp(-signal))).astype(np.float32)),
        "dwell": pa.array(rng.normal(size=n).astype(np.float32) + signal.astype(np.float32)),
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, quiet_trainer):
    """A small MMoE trained on raw rows with every kind of fitted preprocessing, and its predictions on raw rows."""
    folder = tmp_path_factory.mktemp("serving")
    pq.write_table(_raw_rows(600, 0, ["paris", "rome", "oslo", None]), folder / "train.parquet")
    # predict rows: a city never seen in training ("lima") and nulls
    pq.write_table(_raw_rows(97, 1, ["paris", "rome", "lima", None]), folder / "predict.parquet")
    data = ParquetDataModule(
        train=folder / "train.parquet", predict=folder / "predict.parquet",
        tasks=[Task("click"), Task("dwell", kind="regression")], batch_size=64, embedding_dim=4, seed=0,
        categorical={"city": {}, "device": {"num_buckets": 7}}, normalize=["age", "price"],
        fill_missing={"price": "mean"}, missing_indicator=True,
    )
    torch.manual_seed(0)
    model = registry.create("mmoe", features=data.prepare_features(), tasks=data.tasks, num_experts=2,
                            expert_hidden=(8,), tower_hidden=(4,))
    module = MultiTaskLightningModule(model, lr=0.02)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, data)
    predictions = trainer.predict(module, datamodule=data)
    expected = {name: torch.cat([p[name] for p in predictions]).numpy() for name in ("click", "dwell")}
    checkpoint = folder / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return folder, data, module.eval(), expected, checkpoint


def test_raw_rows_through_exported_files_match_predict(trained, tmp_path):
    folder, data, module, expected, _ = trained
    assert {f.name for f in data.features} == {"city", "device", "user", "price", "price_missing", "age"}
    onnx_path = export_onnx(module, tmp_path / "model.onnx", datamodule=data)
    script_path = export_torchscript(module, tmp_path / "model.pt", datamodule=data)
    written = json.loads(preprocessing_path(onnx_path).read_text())
    assert written["encoders"]["device"] == {"kind": "hashing", "num_buckets": 7}
    assert written["encoders"]["city"]["values"] == data.state_dict()["encoders"]["city"]["values"]
    assert written["fill_missing"]["price"]["indicator"] is True
    assert [f["name"] for f in written["features"]] == [f.name for f in module.model.features]

    rows = pq.read_table(folder / "predict.parquet")  # raw: strings, an unseen city, nulls, NaN
    assert rows.column("city").null_count > 0 and "lima" in rows.column("city").to_pylist()
    preprocess = Preprocessor.load(preprocessing_path(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    served = dict(zip(module.model.output_names, session.run(None, preprocess.numpy(rows))))
    scripted = torch.jit.load(str(script_path))(preprocess(rows))  # outside no_grad: plain tensors
    assert not any(value.requires_grad for value in scripted.values())
    for name in ("click", "dwell"):
        np.testing.assert_allclose(served[name], expected[name], rtol=0, atol=1e-5)
        np.testing.assert_allclose(scripted[name].numpy(), expected[name], rtol=0, atol=1e-5)
    assert expected["click"].std() > 1e-3  # the rows are told apart: the match is not vacuous

    # a pandas frame and a list of row dicts give the same inputs as the Arrow table
    reference = preprocess(rows)
    for other in (rows.to_pandas(), rows.slice(0, 5).to_pylist()):
        got = preprocess(other)
        for name, value in got.items():
            torch.testing.assert_close(value, reference[name][: len(value)], rtol=0, atol=0)


def test_scripted_preprocessing_matches_python(trained, tmp_path):
    folder, data, module, expected, _ = trained
    state = dict(data.state_dict())
    # the TorchScript module applies vocabularies and integer hashing: user ids hashed into 13 buckets here
    state["encoders"] = {"city": state["encoders"]["city"], "user": {"kind": "hashing", "num_buckets": 13}}
    features = [f if f.name != "user" else dataclasses.replace(f, vocab_size=13)
                for f in module.model.features if f.name != "device"]
    model = registry.create("shared_bottom", features=features, tasks=data.tasks, bottom_hidden=(8,), tower_hidden=(4,))
    state["features"] = [feature_to_config(f) for f in features]
    export_torchscript(model, tmp_path / "sb.pt", datamodule=state)
    scripted = torch.jit.load(str(preprocessing_path(tmp_path / "sb.pt", ".pt")))
    rows = pq.read_table(folder / "predict.parquet")
    inputs = scripted({"city": rows.column("city").to_pylist()},
                      {name: torch.from_numpy(rows.column(name).to_numpy(zero_copy_only=False).copy())
                       for name in ("user", "price", "age")})
    reference = Preprocessor.load(preprocessing_path(tmp_path / "sb.pt"))(rows)
    assert set(inputs) == set(reference) == {"city", "user", "price", "price_missing", "age"}
    for name, value in reference.items():
        torch.testing.assert_close(inputs[name], value, rtol=0, atol=0, msg=name)
    assert reference["city"].min() == 0 and reference["price_missing"].sum() > 0  # unseen/null cities, filled prices
    assert len(reference["user"].unique()) > 5 and reference["user"].max() < 13  # hashed, not the raw ids (< 40)
    assert not torch.equal(reference["user"], torch.from_numpy(rows.column("user").to_numpy()) % 13)

    # a column hashed from strings: pandas' SipHash, not in TorchScript; the module says what to use instead
    export_torchscript(module, tmp_path / "hashed.pt", datamodule=data)
    scripted = torch.jit.load(str(preprocessing_path(tmp_path / "hashed.pt", ".pt")))
    with pytest.raises(Exception, match="device is hashed from strings .* datamodules.serving.Preprocessor"):
        scripted({"city": rows.column("city").to_pylist(), "device": rows.column("device").to_pylist()},
                 {name: torch.zeros(rows.num_rows) for name in ("user", "price", "age")})


def test_command_line_export_takes_the_checkpoint_preprocessing(trained, tmp_path, capsys):
    folder, data, _, expected, checkpoint = trained
    main([str(checkpoint), "--onnx", str(tmp_path / "m.onnx")])
    assert "m.preprocessing.json" in capsys.readouterr().out
    preprocess = Preprocessor.load(tmp_path / "m.preprocessing.json")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    click = session.run(["click"], preprocess.numpy(pq.read_table(folder / "predict.parquet")))[0]
    np.testing.assert_allclose(click, expected["click"], rtol=0, atol=1e-5)


def test_serving_errors_name_the_column(trained, tmp_path):
    folder, data, module, _, _ = trained
    export_onnx(module, tmp_path / "m.onnx", datamodule=data)
    preprocess = Preprocessor.load(tmp_path / "m.preprocessing.json")
    rows = pq.read_table(folder / "predict.parquet")
    with pytest.raises(ValueError, match="missing feature column 'age'"):
        preprocess(rows.drop(["age"]))
    with pytest.raises(ValueError, match="column 'age' has NaN"):  # age was not filled in training
        preprocess(rows.set_column(rows.column_names.index("age"), "age", pa.array([float("nan")] * rows.num_rows)))
    with pytest.raises(TypeError, match="categorical column 'city' holds int64"):
        preprocess(rows.set_column(0, "city", pa.array(range(rows.num_rows), pa.int64())))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a preprocessing file"):
        Preprocessor.load(tmp_path / "bad.json")
    other = registry.create("mmoe", features=[f for f in module.model.features if f.name != "age"], tasks=data.tasks)
    with pytest.raises(ValueError, match=r"normalization name columns \['age'\]"):
        export_onnx(other, tmp_path / "other.onnx", datamodule=data)
