"""Raw categorical list columns, vocabularies shared between columns (``vocabulary_of``) and ``feature_overrides``:
fitted on the union, grown and evicted as one vocabulary, served with it; overrides in Python and from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules import ParquetDataModule
from datamodules.encoders import SharedVocabulary, VocabularyEncoder
from datamodules.serving import Preprocessor
from mtl_lightning import MultiTaskLightningModule, SequenceFeature, SparseFeature, Task, registry
from mtl_lightning.layers import FeatureEmbedding

STRINGS = pa.list_(pa.string())


def _write(path: Path, items: list[str], histories: list[list[str]], **extra) -> Path:
    n = len(items)
    columns = {"user_id": pa.array(np.arange(n) % 3, pa.int64()), "item_id": pa.array(items, pa.string()),
               "hist_item": pa.array(histories, STRINGS),
               "click": pa.array((np.arange(n) % 2).astype(np.float32))}
    columns.update(extra)
    pq.write_table(pa.table(columns), path)
    return path


def _data(train: Path, **kwargs) -> ParquetDataModule:
    kwargs.setdefault("categorical", {"item_id": {}, "hist_item": {"vocabulary_of": "item_id"}})
    return ParquetDataModule(train=train, tasks=[Task("click")], batch_size=64, shuffle=False, embedding_dim=4,
                             progress=False, **kwargs)


def _batch(data: ParquetDataModule, split: str = "train") -> dict[str, torch.Tensor]:
    return next(iter(data.dataset(split)))["features"]


def test_a_history_shares_the_vocabulary_of_the_candidate_fitted_on_both(tmp_path):
    # candidates: a a b c ; histories: [b d] [] [a zz b] [d c d e]  -> counts a 3, b 3, d 3, c 2, e 1, zz 1
    train = _write(tmp_path / "train.parquet", ["a", "a", "b", "c"], [["b", "d"], [], ["a", "zz", "b"], ["d", "c", "d", "e"]])
    val = _write(tmp_path / "val.parquet", ["new", "e"], [["e", None, "x", "a", "b", "c"], ["d"]])
    data = _data(train, val=val, categorical={"item_id": {"min_freq": 2}, "hist_item": {"vocabulary_of": "item_id"}})
    data.setup("fit")
    encoders = data.state_dict()["encoders"]
    # min_freq=2 on the union: d (only in histories) and c (once each) are kept, e and zz are not
    assert encoders["item_id"]["values"] == ["a", "b", "d", "c"] and encoders["item_id"]["counts"] == [3, 3, 3, 2]
    assert encoders["hist_item"] == {"kind": "shared", "vocabulary_of": "item_id"}
    assert isinstance(data.encoders["hist_item"], SharedVocabulary) and data.encoders["hist_item"].owner is data.encoders["item_id"]
    specs = {f.name: f for f in data.features}
    assert specs["item_id"] == SparseFeature("item_id", 5, 4)
    # inferred as a sequence of the longest list over every split (6, in val), reading item_id's table
    assert specs["hist_item"] == SequenceFeature("hist_item", 5, max_len=6, embedding_dim=4, shared_with="item_id")
    batch = _batch(data)
    assert batch["item_id"].tolist() == [1, 1, 2, 4]
    assert batch["hist_item"].tolist() == [[2, 3, 0, 0, 0, 0], [0] * 6, [1, 0, 2, 0, 0, 0], [3, 4, 3, 0, 0, 0]]
    # val: unseen and null values become 0 in place (padding for the sequence); a new candidate is 0 too
    val_batch = _batch(data, "val")
    assert val_batch["item_id"].tolist() == [0, 0]
    assert val_batch["hist_item"].tolist() == [[0, 0, 0, 1, 2, 4], [3, 0, 0, 0, 0, 0]]
    # the serving preprocessing maps the list column with the same vocabulary
    served = Preprocessor(data.preprocessing_state())({"user_id": [0, 1], "item_id": ["new", "e"],
                                                       "hist_item": [["e", None, "x", "a", "b", "c"], ["d"]]})
    torch.testing.assert_close(served["hist_item"], val_batch["hist_item"], rtol=0, atol=0)
    # the model reads one table for both
    model = registry.create("shared_bottom", features=data.features, tasks=data.tasks, bottom_hidden=(4,))
    layer = next(m for m in model.modules() if isinstance(m, FeatureEmbedding))
    assert layer.table_weight("hist_item").data_ptr() == layer.table_weight("item_id").data_ptr()


def test_given_specs_keep_their_own_table_and_a_list_column_can_have_its_own_vocabulary(tmp_path):
    train = _write(tmp_path / "train.parquet", ["a", "b"], [["b"], ["c", "a"]],
                   tags=pa.array([[700, 9], [9, 9, 12]], pa.list_(pa.int64())))
    given = [SparseFeature("user_id", 3, 4), SparseFeature("item_id", 2, 4),
             SequenceFeature("hist_item", 2, max_len=2, embedding_dim=8), SequenceFeature("tags", 2, max_len=2)]
    data = _data(train, features=given, categorical={"item_id": {}, "hist_item": {"vocabulary_of": "item_id"},
                                                     "tags": {}})
    specs = {f.name: f for f in data.prepare_features()}
    # a spec given for the column: the shared ids, but its own table (no shared_with) and its own embedding_dim
    assert specs["hist_item"] == SequenceFeature("hist_item", 4, max_len=2, embedding_dim=8)
    assert specs["tags"] == SequenceFeature("tags", 4, max_len=2)  # raw integers: 9 (3 times), 12, 700
    batch = _batch(data)
    assert batch["tags"].tolist() == [[3, 1], [1, 1]]  # ids by count: 9 -> 1, then by value: 12 -> 2, 700 -> 3
    assert batch["hist_item"].tolist() == [[2, 0], [3, 1]]


def test_shared_vocabulary_specs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="'hist_item': vocabulary_of='items' is not a categorical column"):
        ParquetDataModule(train="x.parquet", tasks=[Task("click")], categorical={"item_id": {}, "hist_item": {"vocabulary_of": "items"}})
    with pytest.raises(ValueError, match=r"'b': vocabulary_of='a', which itself shares the vocabulary of 'item_id'"):
        ParquetDataModule(train="x.parquet", tasks=[Task("click")], categorical={"item_id": {}, "a": {"vocabulary_of": "item_id"},
                                                          "b": {"vocabulary_of": "a"}})
    with pytest.raises(ValueError, match=r"'hist_item': vocabulary_of='item_id' shares .* got also \['min_freq'\]"):
        ParquetDataModule(train="x.parquet", tasks=[Task("click")], categorical={"item_id": {}, "hist_item": {"vocabulary_of": "item_id",
                                                                                       "min_freq": 2}})
    with pytest.raises(ValueError, match="'hist_item': vocabulary_of names the column itself"):
        ParquetDataModule(train="x.parquet", tasks=[Task("click")], categorical={"hist_item": {"vocabulary_of": "hist_item"}})
    # another type in the history than in the candidate: the error names the column and its owner
    train = _write(tmp_path / "t.parquet", ["a"], [["b"]])
    pq.write_table(pa.table({"item_id": ["a"], "hist_item": pa.array([[1]], pa.list_(pa.int64())),
                             "click": [1.0]}), train)
    with pytest.raises(ValueError, match=r"'hist_item' \(it shares the vocabulary of 'item_id'\) holds int64"):
        _data(train).setup("fit")
    # a different embedding_dim than the table it reads
    plain = _write(tmp_path / "u.parquet", ["a"], [["b"]])
    with pytest.raises(ValueError, match=r"'hist_item': embedding_dim 8 differs from that of 'item_id' \(4\)"):
        _data(plain, categorical={"item_id": {}, "hist_item": {"vocabulary_of": "item_id", "embedding_dim": 8}}
              ).setup("fit")
    # given specs without one for the list column: it cannot be read as a sparse feature, and the error says why
    with pytest.raises(ValueError, match=r"'hist_item' is a SparseFeature but has type list<.*a column of lists is a "
                                         r"SequenceFeature: give SequenceFeature\('hist_item'"):
        _data(plain, features=[SparseFeature("user_id", 3, 4)]).setup("fit")


def test_a_shared_vocabulary_grows_and_evicts_as_one(tmp_path):
    # day 1: candidates a a b, histories [c] [a] [b b]: a 3, b 3, c 1 (cap 3: all kept)
    day1 = _data(_write(tmp_path / "day1.parquet", ["a", "a", "b"], [["c"], ["a"], ["b", "b"]]),
                 categorical={"item_id": {"max_size": 3}, "hist_item": {"vocabulary_of": "item_id"}})
    day1.setup("fit")
    assert day1.encoders["item_id"].values.to_pylist() == ["a", "b", "c"]
    # day 2: "d" is never a candidate but clicked 4 times: with the counts of both columns it outranks c (1 + 0)
    day2 = _data(_write(tmp_path / "day2.parquet", ["a", "b", "b"], [["d", "d"], ["d"], ["d", "a"]]),
                 categorical={"item_id": {"max_size": 3}, "hist_item": {"vocabulary_of": "item_id"}},
                 grow_vocabulary=True)
    day2.load_state_dict(day1.state_dict())
    day2.setup("fit")
    owner = day2.encoders["item_id"]
    assert isinstance(owner, VocabularyEncoder) and owner.values.to_pylist() == ["a", "b", "d"]
    assert owner.counts.tolist() == [5, 5, 4]  # a: 3 + 2, b: 3 + 2, d: 4 (c evicted, d takes its id 3)
    assert day2.embedding_row_sources()["item_id"][1].tolist() == [0, 1, 2, -1]
    assert "hist_item" not in day2.embedding_row_sources()  # it reads item_id's table: that one grows
    batch = _batch(day2)
    assert batch["item_id"].tolist() == [1, 2, 2] and batch["hist_item"].tolist() == [[3, 3], [3, 0], [3, 1]]
    assert {f.name: f.vocab_size for f in day2.features if hasattr(f, "vocab_size")} == {
        "user_id": 3, "item_id": 4, "hist_item": 4}


def test_day_two_grows_the_shared_table_the_history_reads(tmp_path, quiet_trainer):
    """Incremental training with a shared vocabulary: the model's item table grows once, for both columns."""
    kwargs = dict(categorical={"item_id": {}, "hist_item": {"vocabulary_of": "item_id"}},
                  feature_overrides={"hist_item": {"pooling": "din", "query": "item_id",
                                                   "pooling_options": {"attention_hidden": [4]}}})
    day1 = _data(_write(tmp_path / "day1.parquet", ["a", "b"] * 8, [["b", "a"], ["a"]] * 8), **kwargs)

    def model(data: ParquetDataModule) -> MultiTaskLightningModule:
        torch.manual_seed(0)
        return MultiTaskLightningModule(registry.create("shared_bottom", features=data.prepare_features(),
                                                        tasks=data.tasks, bottom_hidden=(4,)), lr=0.05)

    first = model(day1)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(first, day1)
    checkpoint = tmp_path / "day1.ckpt"
    trainer.save_checkpoint(checkpoint)
    before = next(m for m in first.modules() if isinstance(m, FeatureEmbedding)).table_weight("item_id").detach().clone()

    day2 = _data(_write(tmp_path / "day2.parquet", ["b", "a"] * 8, [["z"], ["z", "b"]] * 8), grow_vocabulary=True,
                 continue_from=checkpoint, **kwargs)
    second = model(day2)
    assert {f.name: f.vocab_size for f in second.model.features if hasattr(f, "vocab_size")} == {
        "user_id": 3, "item_id": 4, "hist_item": 4}  # z (histories only) got id 3
    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            layer = next(m for m in pl_module.modules() if isinstance(m, FeatureEmbedding))
            seen["item_id"] = layer.table_weight("item_id").detach().clone()

    quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Probe()]).fit(second, day2, ckpt_path=checkpoint)
    torch.testing.assert_close(seen["item_id"][:3], before, rtol=0, atol=0)  # day-1 rows as trained on day 1
    assert seen["item_id"].shape[0] == 4


def test_feature_overrides_change_one_field_of_inferred_specs(tmp_path):
    train = _write(tmp_path / "train.parquet", ["a", "b", "a"], [["b"], ["a", "b"], []],
                   hist_cat=pa.array([[2], [1, 2], []], pa.list_(pa.int64())), cat=pa.array([1, 2, 1], pa.int64()))
    overrides = {"hist_item": {"pooling": "din", "query": "item_id", "group": "hist"},
                 "hist_cat": {"pooling": "din", "query": "cat", "group": "hist"}, "user_id": {"embedding_dim": 6}}
    data = _data(train, feature_overrides=overrides)
    specs = {f.name: f for f in data.prepare_features()}
    assert specs["hist_item"] == SequenceFeature("hist_item", 3, max_len=2, embedding_dim=4, pooling="din",
                                                 shared_with="item_id", query="item_id", group="hist")
    assert specs["hist_cat"] == SequenceFeature("hist_cat", 3, max_len=2, embedding_dim=4, pooling="din",
                                                query="cat", group="hist")
    assert specs["user_id"] == SparseFeature("user_id", 3, 6) and specs["cat"] == SparseFeature("cat", 3, 4)
    assert data.prepare_features() == list(specs.values())  # preparing again changes nothing
    model = registry.create("mmoe", features=data.features, tasks=data.tasks, num_experts=2, expert_hidden=(4,))
    assert list(next(m for m in model.modules() if isinstance(m, FeatureEmbedding)).encoders) == ["hist"]

    def refused(overrides, match, error=ValueError):
        with pytest.raises(error, match=match):
            _data(train, feature_overrides=overrides).prepare_features()

    refused({"hist_items": {"pooling": "din"}}, r"feature_overrides.hist_items: no such feature; the features are")
    refused({"hist_item": {"poolin": "din"}}, r"feature_overrides.hist_item.poolin: SequenceFeature has no field "
                                              r"'poolin'; its fields are \['vocab_size', 'max_len'")
    refused({"user_id": {"max_len": 3}}, r"feature_overrides.user_id.max_len: SparseFeature has no field")
    refused({"hist_item": {"pooling": "din"}}, r"feature_overrides.hist_item: SequenceFeature 'hist_item': "
                                               r"pooling='din' reads the sequence with the candidate")
    refused({"item_id": {"vocab_size": 9}}, r"feature_overrides.item_id.vocab_size: the vocabulary size of 'item_id' "
                                            r"is its categorical encoder's")
    refused({"item_id": {"name": "x"}}, r"feature_overrides.item_id.name: a feature's name cannot be overridden")
    refused({"item_id": "din"}, r"feature_overrides.item_id: expected a non-empty mapping", TypeError)
    refused(["hist_item"], "feature_overrides must map feature names", TypeError)


def test_feature_overrides_from_the_command_line(tmp_path, monkeypatch):
    from mtl_lightning.cli import build_cli

    train = _write(tmp_path / "train.parquet", ["a", "b", "a", "b"] * 5, [["b"], ["a", "b"], [], ["a"]] * 5)
    monkeypatch.chdir(tmp_path)
    cli = build_cli([
        "fit", f"--data.train={train}", "--data.tasks=[{name: click}]", "--data.embedding_dim=4",
        "--data.categorical={item_id: {}, hist_item: {vocabulary_of: item_id}}",
        "--data.feature_overrides={hist_item: {pooling: attention, query: item_id}}", "--data.batch_size=8",
        "--model.model=shared_bottom", "--model.model.init_args.bottom_hidden=[4]", "--trainer.max_steps=2",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"])
    specs = {f.name: f for f in cli.model.model.features}  # linked from data.features into the architecture
    assert specs["hist_item"] == SequenceFeature("hist_item", 3, max_len=2, embedding_dim=4, pooling="attention",
                                                 shared_with="item_id", query="item_id")
    assert cli.trainer.global_step == 2
