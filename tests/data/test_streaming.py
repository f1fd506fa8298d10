"""Streaming mode, rank x worker sharding, raw categorical encoders, normalisation, resume, prediction files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import ParquetDataModule
from datamodules.encoders import HashingEncoder, VocabularyEncoder
from datamodules.synthetic import make_table, synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import MMoE
from mtl_lightning.callbacks import ParquetPredictionWriter


import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def write_parts(directory, sizes, seed=0, row_group_size=300, **extra_columns):
    """One split as files of the given sizes (small row groups), optionally with extra columns."""
    table = make_table(sum(sizes), seed=seed)
    for name, values in extra_columns.items():
        table = table.append_column(name, values(table))
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        pq.write_table(table.slice(start, size), directory / f"part-{i}.parquet", row_group_size=row_group_size)
        start += size
    return directory


def module_kwargs(**kwargs):
    base = dict(tasks=synthetic_tasks(), features=synthetic_features(embedding_dim=4), batch_size=256)
    base.update(kwargs)
    return base


def ids_of(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["row_id"]]


def epoch(dataset, number, workers=0) -> list[dict]:
    dataset.set_epoch(number)
    if workers == 0:
        return list(dataset)
    return list(DataLoader(dataset, batch_size=None, num_workers=workers))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    return {"train": write_parts(root / "train", (2300, 170, 1530)), "val": write_parts(root / "val", (900, 101), 1)}


# ----------------------------------------------------------------------------- streaming
def test_streaming_and_in_memory_see_the_same_rows(uneven):
    memory = ParquetDataModule(train=uneven["train"], **module_kwargs())
    stream = ParquetDataModule(train=uneven["train"], streaming=True, shuffle_buffer=1000, read_rows=128,
                               **module_kwargs())
    for dm in (memory, stream):
        dm.setup("fit")
    a, b = epoch(memory.dataset("train"), 0), epoch(stream.dataset("train"), 0)
    assert sorted(ids_of(a)) == sorted(ids_of(b)) == list(range(4000))
    # whole batches of batch_size (never chunk-sized: read_rows=128 < 256 < row groups of 300), last one partial
    assert [len(x["row_id"]) for x in b] == [256] * 15 + [160]

    def by_row(batches):
        order = torch.argsort(torch.cat([x["row_id"] for x in batches]))
        columns = {k: torch.cat([x["features"][k] for x in batches])[order] for k in batches[0]["features"]}
        columns.update({k: torch.cat([x["labels"][k] for x in batches])[order] for k in batches[0]["labels"]})
        return columns

    rows_a, rows_b = by_row(a), by_row(b)
    for name in rows_a:
        torch.testing.assert_close(rows_a[name], rows_b[name], equal_nan=True)


def test_streaming_shuffles_across_row_groups_and_reshuffles_each_epoch(uneven):
    dm = ParquetDataModule(train=uneven["train"], streaming=True, shuffle_buffer=1000, read_rows=128,
                           **module_kwargs())
    train = dm.dataset("train")
    first, again, second = ids_of(epoch(train, 0)), ids_of(epoch(train, 0)), ids_of(epoch(train, 1))
    assert first == again  # the order is a function of (seed, epoch): resuming replays it
    assert first != second and sorted(first) == sorted(second)
    groups = {i // 300 for i in first[:256]}  # row groups hold 300 rows (files are cut at 2300/2470)
    assert len(groups) >= 3  # the buffer mixes several row groups into one batch
    val = ParquetDataModule(val=uneven["val"], streaming=True, **module_kwargs()).dataset("val")
    assert ids_of(epoch(val, 0)) == list(range(1001))  # evaluation keeps file order


@pytest.mark.parametrize("rows", [4000, 4001])
def test_two_ranks_times_two_workers_cover_every_row(tmp_path, rows):
    train = write_parts(tmp_path / "train", (rows - 1700, 1300, 400), row_group_size=250)
    dm = ParquetDataModule(train=train, val=train, streaming=True, shuffle_buffer=600, read_rows=100,
                           **module_kwargs(batch_size=128))
    shards = [epoch(dm.dataset("train", rank=r, world_size=2), 2, workers=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(dm.dataset("train", rank=0, world_size=2))  # equal steps
    ids = [ids_of(s) for s in shards]
    assert len(ids[0]) == len(ids[1]) == -(-rows // 2)
    assert set(ids[0]) | set(ids[1]) == set(range(rows))
    seen_twice = len(ids[0]) + len(ids[1]) - rows
    assert seen_twice == rows % 2 and len(set(ids[0] + ids[1])) == rows  # padding only for an odd count
    val = [ids_of(epoch(dm.dataset("val", rank=r, world_size=2), 0, workers=2)) for r in range(2)]
    assert sorted(val[0] + val[1]) == list(range(rows))  # evaluation: exactly once, no padding


def test_resume_continues_with_the_next_epochs_order(uneven, tmp_path, quiet_trainer):
    class Record(L.Callback):
        def __init__(self):
            self.ids: dict[int, list[int]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.ids.setdefault(trainer.current_epoch, []).extend(batch["row_id"].tolist())

    def run(max_epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        dm = ParquetDataModule(train=uneven["train"], streaming=True, shuffle_buffer=800, read_rows=256,
                               num_workers=0, **module_kwargs(batch_size=512))
        dm.setup("fit")
        module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                               tower_hidden=(4,)), lr=1e-2)
        record = Record()
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[record, *callbacks],
                                enable_checkpointing=bool(callbacks))
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return record.ids, module

    # the checkpoint of epoch 0 of the 2-epoch run (a fit that ran to its end is not resumed: datamodules.partitions)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    straight, straight_module = run(2, callbacks=[saver])
    resumed, resumed_module = run(2, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert list(resumed) == [1] and resumed[1] == straight[1] != straight[0]
    for a, b in zip(straight_module.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # exact resume


# ---------------------------------------------------------------------------- encoders
def test_vocabulary_min_freq_and_out_of_vocabulary():
    encoder = VocabularyEncoder("c", min_freq=2)
    encoder.partial_fit(pa.array(["a", "b", "a", "c"]), "train")
    encoder.partial_fit(pa.array(["a", "b", None, "d"]), "train")
    encoder.finish_fit()
    assert encoder.num_ids == 3  # a (3 times) -> 1, b (2) -> 2, rare c/d and nulls -> 0
    ids = encoder.transform(pa.array(["a", "b", "c", "unseen", None]), "test")
    assert ids.tolist() == [1, 2, 0, 0, 0]
    capped = VocabularyEncoder("c", max_size=1)
    capped.partial_fit(pa.array(["b", "a", "a"]), "train")
    capped.finish_fit()
    assert capped.transform(pa.array(["a", "b"]), "test").tolist() == [1, 0]
    with pytest.raises(TypeError, match="holds int64 but its vocabulary was fitted on string"):
        encoder.transform(pa.array([1, 2]), "test.parquet")


def test_hashing_is_stable_across_processes():
    encoder = HashingEncoder("c", num_buckets=1000)
    ids = encoder.transform(pa.array(["a", "b", "a", None, "zzz"]), "x").tolist()
    assert ids == [478, 512, 478, 0, 895]  # pinned: another process, run or machine gives the same ids
    assert encoder.transform(pa.array([7, 10**12, None], pa.int64()), "x").tolist() == [371, 798, 0]
    code = ("import pyarrow as pa; from datamodules.encoders import HashingEncoder; "
            "print(HashingEncoder('c', 1000).transform(pa.array(['a', 'b']), 'x').tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.strip() == "[478, 512]"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Splits with a raw string column (a city name, rare on purpose for city 29) and a raw 64-bit id column."""
    root = tmp_path_factory.mktemp("raw")

    def city_name(table):
        names = [f"city-{c}" for c in table["city"].to_pylist()]
        return pa.array([n if n != "city-29" else f"once-{i}" for i, n in enumerate(names)])

    def big_id(table):
        return pa.array((table["user_id"].to_numpy() * 1_000_003 + 10**12).astype(np.int64))

    train = write_parts(root / "train", (1500, 500), city_name=city_name, big_id=big_id)
    test = write_parts(root / "test", (600,), seed=2, city_name=lambda t: pa.array(
        ["never-seen" if i % 3 == 0 else f"city-{c}" for i, c in enumerate(t["city"].to_pylist())]), big_id=big_id)
    return {"train": train, "test": test}


def raw_datamodule(paths, **kwargs):
    features = [f for f in synthetic_features(embedding_dim=4) if f.name not in ("city", "history")]
    return ParquetDataModule(
        tasks=synthetic_tasks(), features=features, batch_size=256, embedding_dim=4,
        categorical={"city_name": {"min_freq": 2}, "big_id": {"num_buckets": 64, "embedding_dim": 3}}, **paths,
        **kwargs,
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_raw_categoricals_fitted_on_train_and_unseen_values_map_to_oov(raw, streaming):
    dm = raw_datamodule({"train": raw["train"], "test": raw["test"]}, streaming=streaming, shuffle=False)
    dm.setup("fit")
    specs = {f.name: f for f in dm.features}
    assert specs["city_name"] == SparseFeature("city_name", 30, 4)  # 29 frequent cities + OOV (the once-* values)
    assert specs["big_id"] == SparseFeature("big_id", 64, 3)
    vocabulary = dm.encoders["city_name"].values.to_pylist()
    assert "city-29" not in vocabulary and not any(v.startswith("once") for v in vocabulary)
    test = pa.concat_tables([pq.read_table(p) for p in sorted(raw["test"].iterdir())])
    batches = list(dm.dataset("test"))
    ids = torch.cat([b["features"]["city_name"] for b in batches]).numpy()
    names = np.array(test["city_name"].to_pylist())
    assert (ids[names == "never-seen"] == 0).all()  # unseen at fit time -> OOV id
    known = names != "never-seen"
    expected = np.array([vocabulary.index(n) + 1 if n in vocabulary else 0 for n in names[known]])
    np.testing.assert_array_equal(ids[known], expected)
    hashed = torch.cat([b["features"]["big_id"] for b in batches]).numpy()
    assert hashed.min() >= 1 and hashed.max() < 64


def test_encoders_and_statistics_travel_in_the_checkpoint(raw, tmp_path, quiet_trainer):
    torch.manual_seed(0)
    dm = raw_datamodule({"train": raw["train"], "val": raw["train"]}, normalize=["dense_0", "dense_1"])
    dm.setup("fit")
    module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                           tower_hidden=(4,)))
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)["ParquetDataModule"]  # plain data only
    assert state == dm.state_dict() and set(state["encoders"]) == {"city_name", "big_id"}

    # predict-only: no train split, so nothing can be fitted; the checkpoint brings the mapping
    fresh = raw_datamodule({"predict": raw["test"]}, normalize=["dense_0", "dense_1"])
    with pytest.raises(ValueError, match=r"encoders/statistics of \['city_name', 'dense_0', 'dense_1'\] are not fitted"):
        fresh.setup("predict")
        fresh.dataset("predict")
    restored = MultiTaskLightningModule.load_from_checkpoint(tmp_path / "model.ckpt")
    writer = ParquetPredictionWriter(tmp_path / "out")
    quiet_trainer(callbacks=[writer]).predict(restored, datamodule=fresh, ckpt_path=tmp_path / "model.ckpt",
                                              return_predictions=False)
    assert fresh.state_dict() == state and fresh.features == dm.features
    written = pq.read_table(tmp_path / "out" / "predictions-rank00000.parquet")
    assert written["row_id"].to_pylist() == list(range(600))
    expected = MultiTaskLightningModule.load_from_checkpoint(tmp_path / "model.ckpt")
    expected.eval()
    reference = raw_datamodule({"train": raw["train"], "predict": raw["test"]}, normalize=["dense_0", "dense_1"])
    reference.setup("predict")
    with torch.no_grad():
        batch = next(iter(reference.dataset("predict")))
        click = torch.sigmoid(expected(batch["features"])["click"])
    np.testing.assert_allclose(written["click"].to_numpy()[:256], click.numpy(), rtol=1e-5)


def test_dense_normalisation_uses_train_statistics(raw):
    dm = raw_datamodule({"train": raw["train"], "test": raw["test"]}, normalize=True, shuffle=False,
                        streaming=True)
    dm.setup("fit")
    train = pa.concat_tables([pq.read_table(p) for p in sorted(raw["train"].iterdir())])
    test = pq.read_table(next(raw["test"].iterdir()))
    for name in ("dense_0", "dense_2"):
        mean, std = train[name].to_numpy().mean(), train[name].to_numpy().std()
        got = torch.cat([b["features"][name] for b in dm.dataset("test")]).numpy()
        np.testing.assert_allclose(got, (test[name].to_numpy() - mean) / std, rtol=1e-4, atol=1e-5)
        seen = torch.cat([b["features"][name] for b in dm.dataset("train")]).numpy()
        assert abs(seen.mean()) < 1e-5 and abs(seen.std() - 1) < 1e-4


def test_bad_raw_input_is_rejected(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"u": pa.array([0.5, 1.5]), "y": pa.array([1.0, 0.0])}), path)
    with pytest.raises(TypeError, match=r"bad.parquet: categorical column 'u' has type double"):
        ParquetDataModule(train=path, tasks=[Task("y")], categorical=["u"]).setup("fit")
    with pytest.raises(ValueError, match="unknown options"):
        ParquetDataModule(train=path, tasks=[Task("y")], categorical={"u": {"buckets": 3}})
    stream = ParquetDataModule(train=path, tasks=[Task("y")], features=[SparseFeature("v", 3)], streaming=True)
    with pytest.raises(ValueError, match=r"bad.parquet: missing feature column 'v'"):
        list(stream.dataset("train"))


def test_prediction_writer_writes_keys_and_every_row(tmp_path, uneven, quiet_trainer):
    torch.manual_seed(0)
    dm = ParquetDataModule(train=uneven["train"], predict=uneven["val"], keys=["user_id", "item_id"],
                           **module_kwargs())
    dm.setup("fit")
    module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                           tower_hidden=(4,)))
    writer = ParquetPredictionWriter(tmp_path, prefix="scores")
    quiet_trainer(callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)
    table = pq.read_table(tmp_path / "scores-rank00000.parquet")
    assert table.column_names == ["row_id", "user_id", "item_id", "click", "conversion", "dwell"]
    assert table["row_id"].to_pylist() == list(range(1001))
    source = pa.concat_tables([pq.read_table(p) for p in sorted(uneven["val"].iterdir())])
    assert table["item_id"].to_pylist() == source["item_id"].to_pylist()
    assert table.schema.field("item_id").type == pa.int64()


def test_streaming_rejects_a_key_column_whose_type_changes_between_files(tmp_path):
    rows = 600
    for i, values in enumerate((pa.array(np.arange(rows), pa.int64()), pa.array(np.arange(rows) + 0.5, pa.float64()))):
        table = make_table(rows, seed=i).append_column("k", values)
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=300)
    dm = ParquetDataModule(predict=str(tmp_path), keys=["k"], streaming=True, shuffle_buffer=2000, read_rows=300,
                           **module_kwargs())
    with pytest.raises(ValueError, match="key column 'k' has type double, but earlier files hold integers") as error:
        dm.setup("predict")  # the footers tell: caught before any batch is read
    assert "part-1.parquet" in str(error.value)
    from datamodules.store import TableConverter
    from datamodules.streaming import ParquetStream, list_row_groups

    stream = ParquetStream(list_row_groups(dm.files("predict")), TableConverter(dm.features, [], keys=["k"]), 256,
                           read_rows=300)  # no footer check: the stream's own check while reading
    with pytest.raises(ValueError, match=r"\('k', 'float64'\)\] differ from the files read before") as error:
        list(stream)
    assert "part-1.parquet" in str(error.value)
