"""Serving with preprocessing: raw Parquet rows (strings, nulls, NaN) through the exported files give trainer.predict."""

from __future__ import annotations

import dataclasses
import json
import re

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
from mtl_lightning.export import export_onnx, export_torchscript, main, preprocessing_path, write_preprocessing


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
    with pytest.raises(ValueError, match=r"missing values \(null or NaN\): 'age' \("):  # age was not filled in training
        preprocess(rows.set_column(rows.column_names.index("age"), "age", pa.array([float("nan")] * rows.num_rows)))
    with pytest.raises(TypeError, match="categorical column 'city' holds int64"):
        preprocess(rows.set_column(0, "city", pa.array(range(rows.num_rows), pa.int64())))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a preprocessing file"):
        Preprocessor.load(tmp_path / "bad.json")
    other = registry.create("mmoe", features=[f for f in module.model.features if f.name != "age"], tasks=data.tasks)
    with pytest.raises(ValueError, match=r"normalization name columns \['age'\]"):
        export_onnx(other, tmp_path / "other.onnx", datamodule=data)


# ------------------------------------------------------------------ a preprocessing file belongs to its model
def _day(folder, shops: list[str], seed: int):
    """A day folder of synthetic rows with a raw string column ``shop`` taking the given values."""
    from datamodules.synthetic import make_table

    table = make_table(len(shops), seed=seed).append_column("shop", pa.array(shops, pa.string()))
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


def test_yesterdays_preprocessing_is_refused_with_todays_model_after_an_eviction(tmp_path, quiet_trainer):
    from datamodules.serving import model_fingerprint, open_served
    from datamodules.synthetic import synthetic_features, synthetic_tasks
    from mtl_lightning import SparseFeature
    from mtl_lightning.architectures import MMoE

    # day 1: s0 40 times, s1 30, s2 20, s3 10. Day 2: the newcomer s4 50 times, s0 20, s1 20, s2 10. With
    # max_size=4 the cumulative counts rank s0 60, s1 50, s4 50 (existing first on ties), s2 30, s3 10: s3 is
    # evicted and s4 takes its id 4 -- the same vocabulary size, another shop behind id 4
    day1 = _day(tmp_path / "logs" / "day=1", ["s0"] * 40 + ["s1"] * 30 + ["s2"] * 20 + ["s3"] * 10, seed=1)
    day2 = _day(tmp_path / "logs" / "day=2", ["s4"] * 50 + ["s0"] * 20 + ["s1"] * 20 + ["s2"] * 10, seed=2)

    def data(train):
        return ParquetDataModule(train=train, tasks=synthetic_tasks(), batch_size=50, grow_vocabulary=True,
                                 features=[SparseFeature("shop", 2, 4), *synthetic_features(embedding_dim=4)],
                                 categorical={"shop": {"max_size": 4}}, normalize=["dense_0"])

    def module(dm):
        torch.manual_seed(0)
        return MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                             tower_hidden=(4,)))

    yesterday = data(day1)
    yesterday.setup("fit")
    day1_module = module(yesterday)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(day1_module, yesterday)
    trainer.save_checkpoint(tmp_path / "day1.ckpt")
    export_onnx(day1_module, tmp_path / "day1" / "model.onnx", datamodule=yesterday)
    export_torchscript(day1_module, tmp_path / "day1" / "model.pt", datamodule=yesterday)

    today = data(day2)
    today.load_checkpoint_state(tmp_path / "day1.ckpt")
    today.setup("fit")
    day2_module = module(today)
    quiet_trainer(max_epochs=2, num_sanity_val_steps=0).fit(day2_module, today, ckpt_path=tmp_path / "day1.ckpt")
    onnx_path = export_onnx(day2_module, tmp_path / "day2" / "model.onnx", datamodule=today)
    script_path = export_torchscript(day2_module, tmp_path / "day2" / "model.pt", datamodule=today)

    assert yesterday.encoders["shop"].values.to_pylist() == ["s0", "s1", "s2", "s3"]
    assert today.encoders["shop"].values.to_pylist() == ["s0", "s1", "s2", "s4"]
    assert [f.vocab_size for f in yesterday.features if f.name == "shop"] == [5] == \
        [f.vocab_size for f in day2_module.model.features if f.name == "shop"]  # the sizes cannot tell them apart
    old_file = tmp_path / "day1" / "model.preprocessing.json"
    # what the check prevents: yesterday's file gives the evicted s3 the id that today's model learnt for s4
    rows = pq.read_table(day2 / "part-00000.parquet").slice(0, 1)
    rows = rows.set_column(rows.column_names.index("shop"), "shop", pa.array(["s3"]))
    assert Preprocessor.load(old_file)(rows)["shop"].tolist() == [4]
    assert Preprocessor.load(preprocessing_path(onnx_path))(rows)["shop"].tolist() == [0]

    refusal = rf"{re.escape(str(old_file))} does not belong to the model {re.escape(str(onnx_path))}.*vocabularies"
    with pytest.raises(ValueError, match=refusal):
        open_served(onnx_path, preprocessing=old_file)
    with pytest.raises(ValueError, match=refusal):
        Preprocessor.load(old_file, model=onnx_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(old_file))} does not belong to the model "
                                         rf"{re.escape(str(script_path))}"):
        open_served(script_path, preprocessing=old_file)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="does not belong to the model <InferenceSession>"):
        Preprocessor.load(old_file).check_model(session)

    # each model with its own file: accepted, and the fingerprint is where the docs say
    fingerprint = json.loads(preprocessing_path(onnx_path).read_text())["fingerprint"]
    assert session.get_modelmeta().custom_metadata_map["mtl_lightning.preprocessing_fingerprint"] == fingerprint
    for path in (script_path, preprocessing_path(script_path, ".pt")):
        extra = {"preprocessing_fingerprint": ""}
        torch.jit.load(str(path), _extra_files=extra)
        assert extra["preprocessing_fingerprint"] == fingerprint.encode()
    assert model_fingerprint(tmp_path / "day1" / "model.onnx") == json.loads(old_file.read_text())["fingerprint"]
    assert model_fingerprint(tmp_path / "day1" / "model.onnx") != fingerprint
    served, preprocess = open_served(onnx_path)
    expected = day2_module.eval()(preprocess(rows))
    click = served.run(["click"], preprocess.numpy(rows))[0]
    np.testing.assert_allclose(click, torch.sigmoid(expected["click"]).detach().numpy(), rtol=0, atol=1e-5)
    scripted, preprocess = open_served(script_path)
    np.testing.assert_allclose(scripted(preprocess(rows))["click"].numpy(), click, rtol=0, atol=1e-5)


def test_a_vocabulary_from_another_export_or_an_edited_file_is_refused(trained, tmp_path):
    from datamodules.serving import open_served

    folder, data, module, _, _ = trained
    onnx_path = export_onnx(module, tmp_path / "a" / "model.onnx", datamodule=data)
    # another export: a data module fitted on other rows, with vocabularies of the same sizes
    pq.write_table(_raw_rows(600, 5, ["lima", "kyiv", "nice", None]), tmp_path / "other.parquet")
    other = ParquetDataModule(
        train=tmp_path / "other.parquet", tasks=data.tasks, batch_size=64, embedding_dim=4, seed=0,
        categorical={"city": {}, "device": {"num_buckets": 7}}, normalize=["age", "price"],
        fill_missing={"price": "mean"}, missing_indicator=True,
    )
    other.setup("fit")
    assert other.features == data.features and other.state_dict()["encoders"] != data.state_dict()["encoders"]
    other_path = export_onnx(module, tmp_path / "b" / "model.onnx", datamodule=other)
    with pytest.raises(ValueError, match=rf"{re.escape(str(preprocessing_path(other_path)))} does not belong to the "
                                         rf"model {re.escape(str(onnx_path))}"):
        open_served(onnx_path, preprocessing=preprocessing_path(other_path))
    open_served(onnx_path)  # its own file
    # only the statistics differ: refused too
    state = json.loads(preprocessing_path(onnx_path).read_text())
    state["normalization"]["age"]["mean"] = [state["normalization"]["age"]["mean"][0] + 1.0]
    del state["fingerprint"]
    (tmp_path / "shifted.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="shifted.json does not belong to the model"):
        open_served(onnx_path, preprocessing=tmp_path / "shifted.json")
    # a file edited after export: its fingerprint no longer matches its content
    state["fingerprint"] = json.loads(preprocessing_path(onnx_path).read_text())["fingerprint"]
    (tmp_path / "edited.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"edited.json: fingerprint: .* it was edited after export"):
        Preprocessor.load(tmp_path / "edited.json")
    # a vocabulary's counts are bookkeeping for growth, not part of the mapping: the same fingerprint
    state = json.loads(preprocessing_path(onnx_path).read_text())
    state["encoders"]["city"]["counts"] = [1] * len(state["encoders"]["city"]["values"])
    (tmp_path / "counts.json").write_text(json.dumps(state))
    assert Preprocessor.load(tmp_path / "counts.json", model=onnx_path).fingerprint == state["fingerprint"]


def test_a_model_exported_without_a_fingerprint_is_refused_by_open_served(trained, tmp_path):
    import onnx

    from datamodules.serving import open_served

    folder, data, module, _, _ = trained
    onnx_path = export_onnx(module, tmp_path / "model.onnx", datamodule=data)
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]  # as the exports wrote it before fingerprints
    onnx.save(proto, str(onnx_path))
    with pytest.raises(ValueError, match=rf"{re.escape(str(onnx_path))}: the model carries no preprocessing "
                                         r"fingerprint .* export it again"):
        open_served(onnx_path)
    # a preprocessing file written before fingerprints still loads (its fingerprint is computed from its content)
    state = json.loads(preprocessing_path(onnx_path).read_text())
    fingerprint = state.pop("fingerprint")
    (tmp_path / "old.json").write_text(json.dumps(state))
    assert Preprocessor.load(tmp_path / "old.json").fingerprint == fingerprint
    with pytest.raises(ValueError, match=r"no such preprocessing file .* give preprocessing="):
        open_served(export_onnx(module, tmp_path / "m.onnx"), preprocessing=tmp_path / "absent.json")


def test_open_served_opens_an_exported_program_with_its_preprocessing(trained, tmp_path):
    from datamodules.serving import model_fingerprint, open_served
    from mtl_lightning.export import export_program

    folder, data, module, _, _ = trained
    program_path = export_program(module, tmp_path / "model.pt2", datamodule=data, compile=False,
                                  verification={"latency_batch_sizes": ()})
    onnx_path = export_onnx(module, tmp_path / "model.onnx", datamodule=data)
    fingerprint = json.loads(preprocessing_path(program_path).read_text())["fingerprint"]
    assert model_fingerprint(program_path) == fingerprint == model_fingerprint(onnx_path)
    served, preprocess = open_served(program_path)
    rows = pq.read_table(folder / "train.parquet").slice(0, 9)
    session, onnx_preprocess = open_served(onnx_path)
    click = session.run(["click"], onnx_preprocess.numpy(rows))[0]
    np.testing.assert_allclose(served(preprocess(rows))["click"].detach().numpy(), click, rtol=0, atol=1e-5)
    # another export's preprocessing is refused as for the other formats
    state = json.loads(preprocessing_path(program_path).read_text())
    state["normalization"]["age"]["mean"] = [state["normalization"]["age"]["mean"][0] + 1.0]
    del state["fingerprint"]
    (tmp_path / "shifted.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"shifted.json does not belong to the model {re.escape(str(program_path))}"):
        open_served(program_path, preprocessing=tmp_path / "shifted.json")
    # a .pt2 that is no exported program: a clear error, not a TorchScript or ONNX one
    (tmp_path / "broken.pt2").write_bytes(b"not a program")
    (tmp_path / "broken.preprocessing.json").write_text(preprocessing_path(program_path).read_text())
    with pytest.raises(ValueError, match=r"broken.pt2: not an exported program or AOTInductor package"):
        open_served(tmp_path / "broken.pt2")


# ------------------------------------------------------------------ Preprocessor.load validates the whole state
def _set(state: dict, key: str, value) -> None:
    """``state[...] = value`` at a dotted path (``normalization.age.std``); ``value=KeyError`` deletes it."""
    *parents, last = key.split(".")
    for part in parents:
        state = state[int(part)] if isinstance(state, list) else state[part]
    if value is KeyError:
        del state[last]
    elif isinstance(state, list):
        state[int(last)] = value
    else:
        state[last] = value


BAD_STATES = [  # (JSON path, value, the key named in the error, what the error says)
    ("normalization.age.std", [0.0], "normalization.age.std[0]", "must be > 0, got 0.0: .* divides by zero"),
    ("normalization.age.std", [-2.0], "normalization.age.std[0]", "must be > 0, got -2.0: .* flips the sign"),
    ("normalization.age.mean", [float("nan")], "normalization.age.mean[0]", "nan is not finite"),
    ("normalization.price.mean", [float("inf")], "normalization.price.mean[0]", "inf is not finite"),
    ("normalization.age.mean", [1.0, 2.0], "normalization.age.mean", "expected a list of 1 number.* of 2"),
    ("normalization.age.dim", "1", "normalization.age.dim", "expected 1 .* got a string"),
    ("normalization.city", {"dim": 1, "mean": [0.0], "std": [1.0]}, "normalization.city",
     "normalises column 'city', which is not a dense feature"),
    ("encoders.city.values", "paris", "encoders.city.values", "expected a list of string values .* got a string"),
    ("encoders.city.values", ["paris", "rome"], "encoders.city.values",
     "2 values give 3 ids .* feature 'city' has vocab_size 4"),
    ("encoders.city.values", ["paris", "rome", "paris"], "encoders.city.values", "value 'paris' appears more than once"),
    ("encoders.city.values", ["paris", 3, "oslo"], "encoders.city.values[1]", "expected a string value, got a number"),
    ("encoders.city.value_type", KeyError, "encoders.city.value_type", "missing"),
    ("encoders.city.kind", "lookup", "encoders.city.kind", "expected 'vocabulary', 'hashing' or 'shared'"),
    ("encoders.city.colour", "red", "encoders.city.colour", "unknown key"),
    ("encoders.city.counts", [3, 2], "encoders.city.counts", "expected a list of 3 counts .* of 2"),
    ("encoders.city.max_size", 2, "encoders.city.values", "3 values, more than max_size 2"),
    ("encoders.device.num_buckets", 9, "encoders.device.num_buckets", "9 buckets, but feature 'device' has "
                                                                      "vocab_size 7"),
    ("encoders.device.num_buckets", "7", "encoders.device.num_buckets", "expected an integer >= 2"),
    ("encoders.age", {"kind": "hashing", "num_buckets": 7}, "encoders.age", "encodes column 'age', which is not a sparse or sequence feature"),
    ("fill_missing.price.indicator", "yes", "fill_missing.price.indicator", "expected true or false"),
    ("fill_missing.price.value", None, "fill_missing.price.value", "expected a finite number"),
    ("fill_missing.price.fill", "median", "fill_missing.price.fill", "expected a finite number or 'mean'"),
    ("features.CITY.vocab_size", "4", "features[CITY].vocab_size", "expected int, got a string"),
    ("features.CITY.kind", "categorical", "features[CITY]", "feature config needs 'kind'"),
    ("features.CITY.colour", "red", "features[CITY]", "SparseFeature got an unexpected keyword argument 'colour'"),
    ("features", "city,device", "features", "expected a list of feature specs"),
    ("features", KeyError, "features", "missing"),
    ("encoders", ["city"], "encoders", "expected an object of column -> state, got a list"),
    ("extra", 1, "extra", "unknown key"),
    ("fingerprint", "abc", "fingerprint", "expected 64 lowercase hex digits"),
]


@pytest.mark.parametrize("key, value, named, problem", BAD_STATES, ids=[f"{k}={v!r}"[:40] for k, v, *_ in BAD_STATES])
def test_a_bad_preprocessing_file_is_refused_naming_the_file_and_the_key(trained, tmp_path, key, value, named,
                                                                          problem):
    folder, data, module, _, _ = trained
    state = json.loads(write_preprocessing(module, tmp_path / "model.onnx", datamodule=data).read_text())
    assert len(state["encoders"]["city"]["values"]) == 3
    city = str([f["name"] for f in state["features"]].index("city"))  # features.CITY: the spec of city
    key, named = key.replace("CITY", city), named.replace("CITY", city)
    _set(state, key, value)
    path = tmp_path / "bad.preprocessing.json"
    path.write_text(json.dumps(state))  # NaN and Infinity are written as JSON's extensions, as Python reads them
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {re.escape(named)}: {problem}"):
        Preprocessor.load(path)
    # the same state given in memory (a data module's state_dict, say) is refused the same way
    if "format" in state and key not in ("extra", "fingerprint"):
        with pytest.raises(ValueError, match=rf"^the preprocessing state: {re.escape(named)}: {problem}"):
            Preprocessor({k: v for k, v in state.items() if k != "format"})
