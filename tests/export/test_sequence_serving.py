"""Raw behaviour histories end to end: inferred specs, a shared vocabulary, overrides (a DIN group), training,
prediction, and the exports with their preprocessing giving trainer.predict's numbers on raw rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.serving import Preprocessor, open_served
from mtl_lightning import MultiTaskLightningModule, SequenceFeature, SparseFeature, Task, registry
from mtl_lightning.export import ScriptedPreprocessing, main, preprocessing_path
from mtl_lightning.layers import FeatureEmbedding

ITEMS = [f"item{i}" for i in range(30)]


def _raw_rows(n: int, seed: int, items: list[str]) -> pa.Table:
    """Impressions with raw string ids: the candidate (``item_id``, ``category``) and the user's history of both
    (aligned lists of 0 to 6 clicks, some longer than the model's max_len of 4); the click depends on whether the
    candidate's category is in the history."""
    rng = np.random.default_rng(seed)
    candidate = rng.choice(items, n)
    lengths = rng.integers(0, 7, n)
    history = [list(rng.choice(items, k)) for k in lengths]

    def category_of(item: str) -> str:
        return f"cat{int(item[4:]) % 5}"

    matched = np.array([category_of(c) in {category_of(h) for h in hist[:4]} for c, hist in zip(candidate, history)])
    click = (rng.random(n) < np.where(matched, 0.8, 0.2)).astype(np.float32)
    return pa.table({
        "user_id": pa.array(rng.integers(0, 20, n), pa.int64()),
        "item_id": pa.array(candidate.tolist(), pa.string()),
        "category": pa.array([category_of(c) for c in candidate], pa.string()),
        "hist_item": pa.array([[str(h) for h in hist] for hist in history], pa.list_(pa.string())),
        "hist_category": pa.array([[category_of(h) for h in hist] for hist in history], pa.list_(pa.string())),
        "price": pa.array(rng.normal(size=n).astype(np.float32)),
        "click": pa.array(click),
        "dwell": pa.array(rng.normal(size=n).astype(np.float32) + click),
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, quiet_trainer):
    folder = tmp_path_factory.mktemp("sequences")
    pq.write_table(_raw_rows(400, 0, ITEMS[:25]), folder / "train.parquet")
    pq.write_table(_raw_rows(120, 1, ITEMS), folder / "val.parquet")
    pq.write_table(_raw_rows(83, 2, ITEMS), folder / "predict.parquet")  # items 25-29 never trained on
    data = ParquetDataModule(
        train=folder / "train.parquet", val=folder / "val.parquet", predict=folder / "predict.parquet",
        tasks=[Task("click"), Task("dwell", kind="regression")], batch_size=64, embedding_dim=8, seed=0,
        categorical={"item_id": {}, "category": {}, "hist_item": {"vocabulary_of": "item_id"},
                     "hist_category": {"vocabulary_of": "category"}},
        feature_overrides={
            "hist_item": {"pooling": "din", "query": "item_id", "group": "hist", "max_len": 4,
                          "pooling_options": {"attention_hidden": [8]}},
            "hist_category": {"pooling": "din", "query": "category", "group": "hist", "max_len": 4,
                              "pooling_options": {"attention_hidden": [8]}},
        },
        progress=False,
    )
    torch.manual_seed(0)
    model = registry.create("mmoe", features=data.prepare_features(), tasks=data.tasks, num_experts=2,
                            expert_hidden=(16,), tower_hidden=(8,), interaction={"name": "dcn_v2", "num_layers": 1})
    module = MultiTaskLightningModule(model, lr=0.02)
    trainer = quiet_trainer(max_steps=12, num_sanity_val_steps=0)
    trainer.fit(module, data)
    predictions = trainer.predict(module, datamodule=data)
    expected = {name: torch.cat([p[name] for p in predictions]).numpy() for name in ("click", "dwell")}
    checkpoint = folder / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return folder, data, module.eval(), expected, checkpoint


def test_inferred_specs_share_the_vocabulary_and_take_the_overrides(trained):
    _, data, module, _, _ = trained
    specs = {f.name: f for f in data.features}
    vocabulary = data.state_dict()["encoders"]["item_id"]["values"]
    assert set(vocabulary) == set(ITEMS[:25])  # the union of candidates and histories of the train split
    assert specs["item_id"] == SparseFeature("item_id", len(vocabulary) + 1, 8)
    assert specs["hist_item"] == SequenceFeature(
        "hist_item", len(vocabulary) + 1, max_len=4, embedding_dim=8, pooling="din", shared_with="item_id",
        query="item_id", group="hist", pooling_options={"attention_hidden": [8]})
    assert specs["hist_category"].shared_with == "category" and specs["hist_category"].group == "hist"
    assert data.state_dict()["encoders"]["hist_item"] == {"kind": "shared", "vocabulary_of": "item_id"}
    assert module.model.features == tuple(data.features)
    layer = next(m for m in module.model.modules() if isinstance(m, FeatureEmbedding))
    assert list(layer.encoders) == ["hist"] and layer.interaction is not None


def test_raw_rows_through_the_exports_give_predict(trained, tmp_path, capsys):
    folder, data, module, expected, checkpoint = trained
    onnx_path, script_path = tmp_path / "model.onnx", tmp_path / "model.pt"
    main([str(checkpoint), "--onnx", str(onnx_path), "--torchscript", str(script_path)])  # the data state: the ckpt's
    written = json.loads(preprocessing_path(onnx_path).read_text())
    assert written["encoders"]["hist_item"] == {"kind": "shared", "vocabulary_of": "item_id"}

    rows = pq.read_table(folder / "predict.parquet")  # raw strings, unseen items, histories longer than max_len
    assert max(len(h) for h in rows.column("hist_item").to_pylist()) > 4
    assert not set(rows.column("item_id").to_pylist()) <= set(ITEMS[:25])
    session, preprocess = open_served(onnx_path)
    served = dict(zip(module.model.output_names, session.run(None, preprocess.numpy(rows))))
    scripted_model, _ = open_served(script_path)
    scripted = scripted_model(preprocess(rows))
    for name in ("click", "dwell"):
        np.testing.assert_allclose(served[name], expected[name], rtol=0, atol=1e-5)
        np.testing.assert_allclose(scripted[name].detach().numpy(), expected[name], rtol=0, atol=1e-5)
    assert expected["click"].std() > 1e-3

    # the Python preprocessing: each history value gets its item's id, unseen values 0, the first 4 values kept
    inputs = preprocess(rows)
    ids = {value: i + 1 for i, value in enumerate(written["encoders"]["item_id"]["values"])}
    for row, history in enumerate(rows.column("hist_item").to_pylist()):
        want = [ids.get(value, 0) for value in history[:4]] + [0] * (4 - len(history[:4]))
        assert inputs["hist_item"][row].tolist() == want
    assert inputs["item_id"].tolist() == [ids.get(v, 0) for v in rows.column("item_id").to_pylist()]

    # the TorchScript preprocessing gives the same inputs from ragged raw lists
    pre = torch.jit.load(str(preprocessing_path(script_path, ".pt")))
    scripted_inputs = pre({name: rows.column(name).to_pylist() for name in ("item_id", "category")},
                          {name: torch.from_numpy(rows.column(name).to_numpy().copy()) for name in ("user_id", "price")},
                          None, {name: rows.column(name).to_pylist() for name in ("hist_item", "hist_category")})
    assert set(scripted_inputs) == set(inputs)
    for name, value in inputs.items():
        torch.testing.assert_close(scripted_inputs[name], value, rtol=0, atol=0, msg=name)
    with pytest.raises(Exception, match="hist_item holds raw strings: give it in string_lists"):
        pre({name: rows.column(name).to_pylist() for name in ("item_id", "category")},
            {name: torch.from_numpy(rows.column(name).to_numpy().copy()) for name in ("user_id", "price")})
    # the preprocessing file belongs to the exported model (the fingerprint covers the shared vocabulary)
    assert Preprocessor.load(preprocessing_path(onnx_path), model=onnx_path).fingerprint == written["fingerprint"]


def test_scripted_preprocessing_pads_truncates_and_hashes_sequences():
    """Sequences of ids (padded tensors of any width, or ragged lists) and hashed integer lists come out
    (B, max_len) as the data module makes them; hashed values as pandas hashes them."""
    features = [SequenceFeature("history", 50, max_len=3), SequenceFeature("tags", 7, max_len=2)]
    state = {"features": [{"kind": "sequence", "name": f.name, "vocab_size": f.vocab_size, "max_len": f.max_len,
                           "embedding_dim": 16, "pooling": "mean", "shared_with": None} for f in features],
             "encoders": {"tags": {"kind": "hashing", "num_buckets": 7}}, "normalization": {}}
    scripted = torch.jit.script(ScriptedPreprocessing(state))
    wide = torch.tensor([[5, 6, 7, 8], [9, 0, 0, 0]])
    out = scripted({}, {"history": wide}, {"tags": [[11, 12, 13], []]}, None)
    assert out["history"].tolist() == [[5, 6, 7], [9, 0, 0]]
    narrow = scripted({}, {"history": torch.tensor([[5], [9]])}, {"tags": [[11], [3]]}, None)["history"]
    assert narrow.tolist() == [[5, 0, 0], [9, 0, 0]]
    ragged = scripted({}, {}, {"history": [[5, 6, 7, 8], [9]], "tags": [[11], [3]]}, None)["history"]
    assert ragged.tolist() == [[5, 6, 7], [9, 0, 0]]
    import pandas as pd

    hashed = 1 + pd.util.hash_array(np.array([11, 12]), categorize=False) % np.uint64(6)
    assert out["tags"].tolist() == [hashed.astype(np.int64).tolist(), [0, 0]]
    reference = Preprocessor(state)({"history": [[5, 6, 7, 8], [9]], "tags": [[11, 12, 13], []]})
    torch.testing.assert_close(reference["tags"], out["tags"], rtol=0, atol=0)
    torch.testing.assert_close(reference["history"], out["history"], rtol=0, atol=0)
    with pytest.raises(Exception, match="sequence history is missing"):
        scripted({}, {}, {"tags": [[1]]}, None)
