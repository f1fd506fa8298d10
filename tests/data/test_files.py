"""The file layer: Spark/pyarrow folder discovery, each file once, Hive partitions, and errors naming the file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from datamodules import DataFile, ParquetDataModule, resolve_paths
from datamodules.paths import Partition
from datamodules.store import TableConverter
from datamodules.streaming import ParquetStream, list_row_groups
from datamodules.synthetic import make_table, synthetic_features, synthetic_tasks
from mtl_lightning import SparseFeature

MODES = pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])


def part(path: Path, rows: int, first_id: int, seed: int | None = None, **kwargs) -> Path:
    """A file of the synthetic dataset with row ids ``rid = first_id ..``."""
    table = make_table(rows, seed=first_id if seed is None else seed)
    table = table.append_column("rid", pa.array(np.arange(first_id, first_id + rows), pa.int64()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return path


def datamodule(train, streaming: bool = False, **kwargs) -> ParquetDataModule:
    options = dict(tasks=synthetic_tasks(), features=synthetic_features(embedding_dim=4), batch_size=128,
                   row_id="rid", shuffle_buffer=256, read_rows=100)
    options.update(kwargs)
    return ParquetDataModule(train=train, streaming=streaming, **options)


def epoch_batches(dm: ParquetDataModule) -> list[dict]:
    dataset = dm.dataset("train")
    dataset.set_epoch(0)
    return list(dataset)


def epoch_ids(dm: ParquetDataModule) -> list[int]:
    return [int(i) for batch in epoch_batches(dm) for i in batch["row_id"]]


# ------------------------------------------------------------------ discovery
def spark_folder(root: Path) -> Path:
    """A Spark output folder: 2,000 committed rows, 1,500 uncommitted ones and bookkeeping files."""
    part(root / "part-00000-c0ffee.snappy.parquet", 700, 0)
    part(root / "part-00001-c0ffee.snappy.parquet", 1300, 700)
    part(root / "_temporary" / "0" / "_temporary" / "attempt_1" / "part-00002-c0ffee.snappy.parquet", 1000, 2000)
    part(root / ".part-00003-c0ffee.inprogress.parquet", 500, 3000)
    (root / "_SUCCESS").write_bytes(b"")
    (root / "_common_metadata").write_bytes(b"PAR1 not really")
    (root / ".part-00000-c0ffee.snappy.parquet.crc").write_bytes(b"crc")
    return root


def test_hidden_names_are_skipped_below_a_folder_or_glob_prefix(tmp_path):
    root = spark_folder(tmp_path / "out")
    committed = ["part-00000-c0ffee.snappy.parquet", "part-00001-c0ffee.snappy.parquet"]
    for spec in (root, str(root / "*"), str(root / "**" / "*.parquet"), str(tmp_path / "o*")):
        assert [f.path.name for f in resolve_paths(spec)] == committed, spec
    # a file named explicitly is read whatever its name (the rule is about discovery)
    explicit = root / ".part-00003-c0ffee.inprogress.parquet"
    assert resolve_paths(explicit) == [DataFile(explicit)]
    only_hidden = tmp_path / "only"
    part(only_hidden / "_temporary" / "part-0.parquet", 10, 0)
    with pytest.raises(ValueError, match="holds no .parquet file .1 under hidden names"):
        resolve_paths(only_hidden)


@MODES
def test_a_spark_folder_reads_exactly_the_committed_rows(tmp_path, streaming):
    dm = datamodule(spark_folder(tmp_path / "out"), streaming=streaming)
    dm.setup("fit")
    assert sorted(epoch_ids(dm)) == list(range(2000))  # was 3,500 rows: the uncommitted attempts were read too


@MODES
def test_overlapping_specs_read_each_file_once(tmp_path, streaming):
    folder = tmp_path / "d"
    a, b = part(folder / "a.parquet", 300, 0), part(folder / "b.parquet", 200, 300)
    spec = [str(folder / "*.parquet"), a, folder, str(folder / "." / "a.parquet"), b]
    assert [f.path for f in resolve_paths(spec)] == [a, b]  # first occurrence order
    dm = datamodule(spec, streaming=streaming)
    dm.setup("fit")
    assert sorted(epoch_ids(dm)) == list(range(500))  # was 800 rows: a.parquet three times


# ------------------------------------------------------------- hive partitions
LAYOUT = {("2026-11-01", 1): (300, 0), ("2026-11-01", 2): (200, 300), ("2026-11-02", 2): (250, 500)}


@pytest.fixture
def hive(tmp_path) -> Path:
    root = tmp_path / "events"
    for (day, region), (rows, first) in LAYOUT.items():
        part(root / f"day={day}" / f"region={region}" / "part-0.parquet", rows, first, row_group_size=90)
    (root / "_SUCCESS").write_bytes(b"")
    return root


def expected_partitions() -> tuple[np.ndarray, np.ndarray]:
    """Per row id: the day (as its vocabulary id: 2026-11-01 is the most frequent, id 1) and the region."""
    day, region = np.zeros(750, np.int64), np.zeros(750, np.int64)
    for (name, number), (rows, first) in LAYOUT.items():
        day[first:first + rows] = 1 if name == "2026-11-01" else 2
        region[first:first + rows] = number
    return day, region


def test_partition_keys_are_typed_like_pyarrow_discovery(hive):
    files = resolve_paths(hive)
    assert [f.partitions for f in files] == [
        (Partition("day", "2026-11-01", "string"), Partition("region", 1, "int64")),
        (Partition("day", "2026-11-01", "string"), Partition("region", 2, "int64")),
        (Partition("day", "2026-11-02", "string"), Partition("region", 2, "int64")),
    ]
    # below a glob's fixed prefix too; folders above the given folder are not partitions
    assert resolve_paths(str(hive / "day=*" / "region=2"))[0].partitions[1] == Partition("region", 2, "int64")
    assert resolve_paths(hive / "day=2026-11-02")[0].partitions == (Partition("region", 2, "int64"),)
    null = hive.parent / "nulls" / "region=__HIVE_DEFAULT_PARTITION__" / "part-0.parquet"
    part(null, 5, 0)
    part(hive.parent / "nulls" / "region=3" / "part-0.parquet", 5, 5)
    assert [f.partitions for f in resolve_paths(hive.parent / "nulls")] == [
        (Partition("region", 3, "int64"),), (Partition("region", None, "int64"),)]


@MODES
def test_partitions_are_columns_for_categorical_group_and_keys(hive, streaming):
    dm = datamodule(hive, streaming=streaming, categorical={"day": {}}, group="region", keys=["region"])
    dm.setup("fit")
    day_feature = next(f for f in dm.features if f.name == "day")
    assert isinstance(day_feature, SparseFeature) and day_feature.vocab_size == 3  # two days and the out-of-vocabulary id
    day, region = expected_partitions()
    seen = []
    for batch in epoch_batches(dm):
        rows = batch["row_id"].numpy()
        assert batch["features"]["day"].tolist() == day[rows].tolist()
        assert batch["keys"]["region"].tolist() == region[rows].tolist()
        assert dm.on_before_batch_transfer(batch, 0)["group"].tolist() == region[rows].tolist()
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(750))


@MODES
def test_partitions_in_feature_inference_and_exclude(hive, streaming):
    dm = datamodule(hive, streaming=streaming, features=None, exclude=["purchase", "day"])
    dm.setup("fit")
    by_name = {f.name: f for f in dm.features}
    assert "day" not in by_name
    assert by_name["region"] == SparseFeature("region", 3, 16)  # an integer partition key: max id 2 + 1
    day, region = expected_partitions()
    batch = epoch_batches(dm)[0]
    assert batch["features"]["region"].tolist() == region[batch["row_id"].numpy()].tolist()



@MODES
def test_a_string_partition_key_is_left_out_of_inference_with_a_log_line_unless_asked_for(hive, streaming, caplog):
    """``day=2026-11-01`` folders: a constant of each folder, not a feature (docs/object-stores.md runs as written)."""
    with caplog.at_level(logging.INFO):
        dm = datamodule(hive, streaming=streaming, features=None, exclude=["purchase"])
        dm.setup("fit")
    assert "day" not in {f.name for f in dm.features} and "region" in {f.name for f in dm.features}
    assert "Hive partition key(s) ['day'] of strings are left out of the inferred features" in caplog.text
    assert "ParquetDataModule(categorical=['day']) makes them features" in caplog.text
    asked = datamodule(hive, streaming=streaming, features=None, exclude=["purchase"], categorical=["day"])
    asked.setup("fit")
    day_feature = next(f for f in asked.features if f.name == "day")
    assert day_feature.vocab_size == len(set(expected_partitions()[0].tolist())) + 1  # the days seen + id 0


def test_a_partition_key_with_two_types_is_refused(tmp_path):
    part(tmp_path / "region=1" / "part-0.parquet", 10, 0)
    bad = part(tmp_path / "region=eu" / "part-0.parquet", 10, 10)
    with pytest.raises(ValueError, match="partition region=eu is not an integer, but .* has region=1") as error:
        resolve_paths(tmp_path)
    assert str(bad) in str(error.value)


@MODES
def test_a_column_that_is_also_a_partition_key_is_refused(tmp_path, streaming):
    bad = part(tmp_path / "city=3" / "part-0.parquet", 10, 0)  # the file has a city column
    with pytest.raises(ValueError, match="column 'city' is both in the file and a partition key") as error:
        datamodule(tmp_path, streaming=streaming).setup("fit")
    assert str(bad) in str(error.value)


# ------------------------------------------------------------ errors name the file
def scramble_column(path: Path, column: str) -> Path:
    """Overwrite the second half of a column chunk with random bytes; the footer stays valid."""
    metadata = pq.read_metadata(path)
    chunk = metadata.row_group(0).column(metadata.schema.to_arrow_schema().get_field_index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    lo, hi = start + chunk.total_compressed_size // 2, start + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    data[lo:hi] = np.random.default_rng(0).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def test_scrambled_pages_name_the_file_and_column_in_memory(tmp_path):
    good = part(tmp_path / "a.parquet", 300, 0)
    bad = scramble_column(part(tmp_path / "b.parquet", 300, 300, compression="snappy", use_dictionary=False), "item_id")
    assert pq.read_metadata(bad).num_rows == 300  # the footer alone cannot tell
    with pytest.raises(ValueError, match="column .item_id.: cannot read the data .OSError: Corrupt snappy") as error:
        datamodule([good, bad]).setup("fit")
    assert str(bad) in str(error.value)


def test_scrambled_pages_name_the_file_and_column_in_a_streaming_worker(tmp_path):
    good = part(tmp_path / "a.parquet", 300, 0)
    bad = scramble_column(part(tmp_path / "b.parquet", 300, 300, compression="snappy", use_dictionary=False), "item_id")
    dm = datamodule([good, bad], streaming=True, shuffle=False)
    dm.setup("fit")  # the footers are fine
    with pytest.raises(ValueError, match="column .item_id.: cannot read the data .OSError: Corrupt snappy") as error:
        list(DataLoader(dm.dataset("train"), batch_size=None, num_workers=1))
    assert str(bad) in str(error.value)


@MODES
def test_a_file_that_is_not_parquet_is_refused_at_setup(tmp_path, streaming):
    good = part(tmp_path / "a.parquet", 300, 0)
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="cannot read the Parquet footer .*magic bytes") as error:
        datamodule([good, bad], streaming=streaming).setup("fit")
    assert str(bad) in str(error.value)
    with pytest.raises(ValueError, match="cannot read the Parquet footer") as error:
        list_row_groups([good, bad])  # the streaming read point
    assert str(bad) in str(error.value)


def two_files(tmp_path: Path, **second_columns) -> tuple[Path, Path]:
    """A good file and a second one whose columns are replaced (``None`` drops one)."""
    first = part(tmp_path / "a.parquet", 300, 0)
    table = pq.read_table(first)
    for name, values in second_columns.items():
        index = table.schema.get_field_index(name)
        table = table.remove_column(index) if values is None else table.set_column(index, name, values(table))
    second = tmp_path / "b.parquet"
    pq.write_table(table, second)
    return first, second


@MODES
@pytest.mark.parametrize("inferred", [True, False], ids=["inferred", "given"])
def test_a_column_missing_in_the_second_file_is_refused_at_setup(tmp_path, streaming, inferred):
    first, second = two_files(tmp_path, item_id=None)
    kwargs = dict(features=None, exclude=["purchase"]) if inferred else {}
    with pytest.raises(ValueError, match="missing (feature )?column 'item_id'") as error:
        datamodule([first, second], streaming=streaming, **kwargs).setup("fit")  # was: No match for FieldRef.Name
    assert str(second) in str(error.value)


@MODES
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(features=None, exclude=["purchase"]), "column 'city' has type string, but .*a.parquet has int64"),
        ({}, "column 'city' is a SparseFeature but has type string"),
        (dict(categorical={"city": {}}), "categorical column 'city' holds string values, but the training files"),
    ],
    ids=["inferred", "given", "categorical"],
)
def test_a_column_whose_type_changes_between_files_is_refused_at_setup(tmp_path, streaming, kwargs, message):
    first, second = two_files(tmp_path, city=lambda table: table["city"].cast(pa.string()))
    with pytest.raises(ValueError, match=message) as error:  # inferred was: '>' not supported between str and int
        datamodule([first, second], streaming=streaming, **kwargs).setup("fit")
    assert str(second) in str(error.value)


@MODES
@pytest.mark.parametrize("inferred", [True, False], ids=["inferred", "given"])
def test_a_duplicated_column_name_is_refused_at_setup(tmp_path, streaming, inferred):
    first = part(tmp_path / "a.parquet", 300, 0)
    table = pq.read_table(first)
    second = tmp_path / "b.parquet"
    pq.write_table(table.append_column("user_id", table["user_id"]), second)
    kwargs = dict(features=None, exclude=["purchase"]) if inferred else {}
    with pytest.raises(ValueError, match="column 'user_id' appears 2 times in the file") as error:
        datamodule([first, second], streaming=streaming, **kwargs).setup("fit")  # was: Multiple matches for FieldRef
    assert str(second) in str(error.value)
    stream = ParquetStream(list_row_groups([second]), TableConverter(synthetic_features(), synthetic_tasks()), 128)
    with pytest.raises(ValueError, match="column 'user_id' appears 2 times") as error:
        list(stream)  # the streaming read point checks too
    assert str(second) in str(error.value)


def test_an_empty_file_is_refused_at_setup_when_streaming(tmp_path):
    first = part(tmp_path / "a.parquet", 300, 0)
    empty = tmp_path / "b.parquet"
    pq.write_table(pq.read_table(first).slice(0, 0), empty)
    with pytest.raises(ValueError, match="file is empty") as error:
        datamodule([first], streaming=True, val=[empty]).setup("fit")  # every given split is checked
    assert str(empty) in str(error.value)
