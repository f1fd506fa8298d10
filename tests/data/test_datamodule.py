"""ParquetDataModule: coverage, sharding, inference and bad input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic
from mtl_lightning import DenseFeature, SequenceFeature, SparseFeature, Task



def row_ids(dataset, epoch=0) -> list[int]:
    dataset.set_epoch(epoch)
    return [int(i) for batch in dataset for i in batch["row_id"]]


def test_every_row_once_per_epoch_and_reshuffled(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, batch_size=700)
    dm.setup("fit")
    train = dm.dataset("train")
    first, second = row_ids(train, 0), row_ids(train, 1)
    assert sorted(first) == list(range(20_000)) == sorted(second)
    assert first != second  # a new permutation every epoch
    assert first == row_ids(train, 0)  # and the same one for the same epoch (exact resume)
    sizes = [len(b["row_id"]) for b in train]
    assert sizes[:-1] == [700] * (len(sizes) - 1) and sum(sizes) == 20_000
    assert row_ids(dm.dataset("val")) == list(range(5_000))  # evaluation keeps file order


def test_batches_carry_the_right_rows(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, batch_size=256)
    dm.setup("fit")
    table = pq.read_table(synthetic_paths["train"])
    batch = next(iter(dm.dataset("train")))
    ids = batch["row_id"].numpy()
    np.testing.assert_array_equal(batch["features"]["user_id"].numpy(), table["user_id"].to_numpy()[ids])
    np.testing.assert_allclose(batch["labels"]["conversion"].numpy(), table["conversion"].to_numpy()[ids])
    assert batch["features"]["history"].shape == (256, 10) and batch["features"]["history"].dtype == torch.int64
    assert batch["features"]["dense_0"].dtype == torch.float32


@pytest.mark.parametrize("rows", [20_000, 20_001])
def test_two_ranks_get_disjoint_shards_covering_all_rows(tmp_path, rows, synthetic_datamodule):
    paths = write_synthetic(tmp_path, (rows, 999, 10))
    dm = synthetic_datamodule(paths, batch_size=512)
    dm.setup("fit")
    shards = [row_ids(dm.dataset("train", rank=r, world_size=2), epoch=3) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(rows / 2)  # same number of steps on every rank
    assert set(shards[0]) | set(shards[1]) == set(range(rows))
    duplicated = len(shards[0]) + len(shards[1]) - rows
    assert len(set(shards[0]) & set(shards[1])) == duplicated == rows % 2  # padding only for an odd count
    val = [row_ids(dm.dataset("val", rank=r, world_size=2)) for r in range(2)]
    assert sorted(val[0] + val[1]) == list(range(999)) and not set(val[0]) & set(val[1])


def test_workers_yield_the_same_batches(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, batch_size=1000, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    with_workers = [int(i) for batch in loader for i in batch["row_id"]]
    assert with_workers == row_ids(dm.dataset("train"), 0)


def test_paths_folder_glob_and_list(tmp_path):
    paths = write_synthetic(tmp_path / "parts", (3_000, 10, 10), files_per_split=3)
    folder = ParquetDataModule(train=paths["train"], tasks=synthetic_tasks(), features=synthetic_features())
    glob = ParquetDataModule(train=str(paths["train"] / "part-*.parquet"), tasks=synthetic_tasks(),
                             features=synthetic_features())
    listed = ParquetDataModule(train=sorted(paths["train"].iterdir()), tasks=synthetic_tasks(),
                               features=synthetic_features())
    for dm in (folder, glob, listed):
        dm.setup("fit")
        assert dm.stores["train"].num_rows == 3_000
    with pytest.raises(ValueError, match="no such file"):
        ParquetDataModule(train=tmp_path / "nothing*.parquet", tasks=synthetic_tasks()).setup("fit")


def test_feature_inference(synthetic_paths):
    dm = ParquetDataModule(train=synthetic_paths["train"], val=synthetic_paths["val"], tasks=synthetic_tasks(),
                           exclude=["purchase"], embedding_dim=8)
    dm.setup("fit")
    by_name = {f.name: f for f in dm.features}
    assert set(by_name) == {"user_id", "item_id", "category", "city", "dense_0", "dense_1", "dense_2", "history"}
    assert isinstance(by_name["user_id"], SparseFeature) and by_name["user_id"].vocab_size == 500
    assert by_name["user_id"].embedding_dim == 8
    assert isinstance(by_name["dense_0"], DenseFeature)
    assert isinstance(by_name["history"], SequenceFeature) and by_name["history"].max_len == 10


def write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


GOOD = dict(u=pa.array([0, 1, 2], pa.int64()), x=pa.array([0.1, 0.2, 0.3], pa.float32()),
            s=pa.array([[1, 2], [], [3]], pa.list_(pa.int64())), y=pa.array([1.0, 0.0, -1.0], pa.float32()))
SPECS = [SparseFeature("u", 3), DenseFeature("x"), SequenceFeature("s", 4, max_len=2)]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(u=None), "missing feature column 'u'"),
        (dict(y=None), "missing label column 'y'"),
        (dict(u=pa.array(["a", "b", "c"])), "column 'u' is a SparseFeature but has type string"),
        (dict(u=pa.array([0, -2, 1], pa.int64())), "column 'u' has a negative id"),
        (dict(u=pa.array([0, 3, 1], pa.int64())), "column 'u' has id 3 >= vocab_size 3"),
        (dict(x=pa.array([0.1, float("nan"), 0.3], pa.float32())), r"feature column\(s\) have missing values \(null or NaN\): 'x' \(1 in the 3 rows read"),
        (dict(x=pa.array(["a", "b", "c"])), "column 'x' is a DenseFeature but has type string"),
        (dict(s=pa.array([[1], [9], []], pa.list_(pa.int64()))), "column 's' has id 9 >= vocab_size 4"),
        (dict(s=pa.array([1, 2, 3], pa.int64())), "column 's' is a SequenceFeature"),
        (dict(y=pa.array(["1", "0", "1"])), "label column 'y' of task 'y' has type string"),
    ],
)
def test_bad_input_names_file_and_column(tmp_path, change, message):
    columns = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = write(tmp_path / "bad.parquet", **columns)
    dm = ParquetDataModule(train=path, tasks=[Task("y")], features=SPECS)
    with pytest.raises(ValueError, match=message) as error:
        dm.setup("fit")
    assert str(path) in str(error.value)


def test_empty_file_rejected(tmp_path):
    path = write(tmp_path / "empty.parquet", **{k: v.slice(0, 0) for k, v in GOOD.items()})
    with pytest.raises(ValueError, match="empty") as error:
        ParquetDataModule(train=path, tasks=[Task("y")], features=SPECS).setup("fit")
    assert str(path) in str(error.value)


def test_null_labels_become_ignored_and_sequences_pad(tmp_path):
    path = write(tmp_path / "ok.parquet", **{**GOOD, "y": pa.array([1.0, None, 0.0], pa.float32()),
                                             "s": pa.array([[1, 2, 3], [], [3]], pa.list_(pa.int64()))})
    dm = ParquetDataModule(train=path, tasks=[Task("y")], features=SPECS, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.dataset("train")))
    assert torch.isnan(batch["labels"]["y"][1])
    assert batch["features"]["s"].tolist() == [[1, 2], [0, 0], [3, 0]]  # truncated to max_len, right-padded


def _padded_reference(column, max_len: int) -> np.ndarray:
    rows = column.to_pylist()
    return np.array([r[:max_len] + [0] * (max_len - len(r[:max_len])) for r in rows], dtype=np.int64).reshape(-1, max_len)


def test_pad_lists_matches_a_per_row_reference():
    from datamodules.columns import pad_lists

    rng = np.random.default_rng(0)
    lists = [[int(v) for v in rng.integers(1, 100, rng.integers(0, 9))] for _ in range(400)]
    for kind in (pa.list_(pa.int64()), pa.large_list(pa.int32()), pa.list_(pa.int16())):
        full = pa.array(lists, kind)
        # a slice (offsets do not start at 0) and a chunked column with an empty chunk
        columns = [full, full.slice(37, 200), pa.chunked_array([full.slice(0, 10), full.slice(10, 0), full.slice(300, 90)])]
        for column in columns:
            for max_len in (1, 4, 8, 12):  # truncating, mixed, exactly the longest, all padded
                np.testing.assert_array_equal(pad_lists(column, max_len), _padded_reference(column, max_len))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(60), pa.int64()), 6)
    for column in (fixed, fixed.slice(2, 5)):
        for max_len in (3, 6, 9):
            np.testing.assert_array_equal(pad_lists(column, max_len), _padded_reference(column, max_len))
    same = pa.array([[1, 2, 3]] * 5).slice(1, 3)  # every list exactly max_len: the reshape path
    np.testing.assert_array_equal(pad_lists(same, 3), [[1, 2, 3]] * 3)


def test_column_store_batches_equal_per_column_gathers(tmp_path):
    from datamodules.store import read_split

    rng = np.random.default_rng(3)
    n = 700
    columns = dict(
        u=pa.array(rng.integers(0, 50, n), pa.int32()),
        x=pa.array(rng.normal(size=n), pa.float64()),
        v=pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=3 * n), pa.float32()), 3),
        s=pa.array([[int(i) for i in rng.integers(1, 9, rng.integers(0, 6))] for _ in range(n)], pa.list_(pa.int64())),
        y=pa.array(rng.integers(0, 2, n), pa.float32()),
        user=pa.array(rng.integers(0, 10**12, n), pa.int64()), score=pa.array(rng.normal(size=n), pa.float64()),
    )
    table = pa.table(columns)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(table.slice(0, 300), paths[0], row_group_size=128)  # several row groups and files
    pq.write_table(table.slice(300), paths[1], row_group_size=1000)
    specs = [SparseFeature("u", 50), DenseFeature("x"), DenseFeature("v", dim=3), SequenceFeature("s", 9, max_len=4)]
    store = read_split(paths, specs, [Task("y")], keys=["user", "score"])
    assert store.num_rows == n and sorted(store.blocks) == ["float32", "float64", "int32", "int64"]
    expected = {
        "u": torch.tensor(columns["u"].to_numpy(), dtype=torch.int64),
        "x": torch.tensor(columns["x"].to_numpy(), dtype=torch.float32),
        "v": torch.tensor(columns["v"].flatten().to_numpy().reshape(n, 3)),
        "s": torch.tensor(_padded_reference(columns["s"], 4)),
    }
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:257]
    for rows in (index, slice(100, 400)):
        batch = store.batch(rows)
        for name, column in expected.items():
            got = batch["features"][name]
            assert got.dtype == column.dtype and got.is_contiguous()
            torch.testing.assert_close(got, column[rows], rtol=0, atol=0)
        torch.testing.assert_close(batch["labels"]["y"], torch.tensor(columns["y"].to_numpy())[rows], rtol=0, atol=0)
        assert batch["row_id"].tolist() == torch.arange(n)[rows].tolist()
        assert batch["keys"]["user"].dtype == torch.int64 and batch["keys"]["score"].dtype == torch.float64
        assert batch["keys"]["user"].tolist() == torch.tensor(columns["user"].to_numpy())[rows].tolist()
        torch.testing.assert_close(batch["keys"]["score"], torch.tensor(columns["score"].to_numpy())[rows], rtol=0, atol=0)


def test_a_key_column_must_keep_one_type_across_files(tmp_path):
    from datamodules.store import read_split

    first = write(tmp_path / "a.parquet", **GOOD, k=pa.array([1, 2, 3], pa.int64()))
    second = write(tmp_path / "b.parquet", **GOOD, k=pa.array([1.5, 2.5, 3.5], pa.float64()))
    with pytest.raises(ValueError, match="key column 'k' has type double, but earlier files hold integers") as error:
        read_split([first, second], SPECS, [Task("y")], keys=["k"])
    assert str(second) in str(error.value)


def test_large_store_blocks_are_zeroed_writable_and_picklable():
    import pickle

    from datamodules.store import ColumnStore, Slot, _zeros

    block = _zeros(1 << 20, 5, "int32")  # 20 MiB: the pre-populated mapping where the OS has one
    assert block.shape == (1 << 20, 5) and block.dtype == np.int32 and block.flags.writeable
    assert not block.any()
    store = ColumnStore([Slot("features", "s", "int32", (4,)), Slot("row_id", "row_id", "int64")], 1 << 20)
    store.array("features", "s")[7] = [1, 2, 3, 4]
    store.array("row_id", "row_id")[:] = np.arange(1 << 20)
    batch = store.batch(torch.tensor([7, 8]))
    assert batch["features"]["s"].tolist() == [[1, 2, 3, 4], [0, 0, 0, 0]] and batch["row_id"].tolist() == [7, 8]
    copy = pickle.loads(pickle.dumps(store.blocks["int32"]))  # what DataLoader workers started by spawn receive
    assert copy[7].tolist() == [1, 2, 3, 4]
