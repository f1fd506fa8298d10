"""Splits in an object store: ``s3://`` URIs served by a real S3 endpoint on 127.0.0.1 (moto's server).

Nothing is mocked in Python: the data module lists and reads the bucket over
HTTP through fsspec/s3fs (``storage_options=``) or pyarrow's own
``S3FileSystem`` (``filesystem=``), Lightning writes and reads its checkpoints
there through fsspec, and the prediction writer uploads its files. Transient
errors come from an HTTP proxy that answers chosen requests with S3's
``500 InternalError``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from datamodules import ParquetDataModule, resolve_paths
from datamodules.files import open_file
from datamodules.storage import RetryPolicy, Storage
from datamodules.synthetic import make_table, synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.callbacks import ParquetPredictionWriter

from tests.s3_server import CREDENTIALS, FlakyProxy, storage_options

_BUCKETS = itertools.count()
FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
NOVEMBER = ("day=2026-11-01", "day=2026-11-02")


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket on the session's server."""
    name = f"bucket-{next(_BUCKETS)}"
    s3_server.filesystem().mkdir(name)
    return name


def write(path: Path, rows: int, first_id: int, **kwargs) -> Path:
    """A file of the synthetic dataset with row ids ``rid = first_id ..``."""
    table = make_table(rows, seed=first_id)
    table = table.append_column("rid", pa.array(np.arange(first_id, first_id + rows), pa.int64()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return path


def spark_days(root: Path, rows: int = 60, row_group_size: int = 25) -> Path:
    """Three days of Spark output (two in November), each with bookkeeping and uncommitted files to skip."""
    first = 0
    for day in (*NOVEMBER, "day=2026-12-01"):
        for name in ("part-00000-c0ffee.snappy.parquet", "part-00001-c0ffee.snappy.parquet"):
            write(root / day / name, rows, first, row_group_size=row_group_size)
            first += rows
        write(root / day / "_temporary" / "0" / "part-00002-c0ffee.snappy.parquet", 7, 10_000)
        write(root / day / ".part-00003-c0ffee.inprogress.parquet", 7, 20_000)
        (root / day / "_SUCCESS").write_bytes(b"")
    return root


def upload(s3_server, local: Path, prefix: str) -> str:
    """Every file below ``local`` to ``s3://<prefix>/...`` (same relative names); returns that URI."""
    s3_server.filesystem().pipe({f"{prefix}/{path.relative_to(local).as_posix()}": path.read_bytes()
                                 for path in sorted(local.rglob("*")) if path.is_file()})
    return f"s3://{prefix}"


def relative(files, root: Path | str) -> list[tuple[str, tuple]]:
    """``(name below root, partitions)`` of resolved files, local or remote."""
    root = str(root).rstrip("/")
    return [(str(f.path)[len(root) + 1:], f.partitions) for f in files]


def datamodule(train, **kwargs) -> ParquetDataModule:
    options = dict(tasks=synthetic_tasks(), features=synthetic_features(embedding_dim=4), batch_size=32,
                   row_id="rid", shuffle_buffer=64, read_rows=20, seed=5)
    options.update(kwargs)
    return ParquetDataModule(train=train, **options)


def epoch(dm: ParquetDataModule, split: str = "train", **kwargs) -> list[dict]:
    dataset = dm.dataset(split, **kwargs)
    dataset.set_epoch(0)
    return list(dataset)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for section in x:
            if isinstance(x[section], dict):
                assert x[section].keys() == y[section].keys()
                for name in x[section]:
                    torch.testing.assert_close(x[section][name], y[section][name], rtol=0, atol=0)
            else:
                torch.testing.assert_close(x[section], y[section], rtol=0, atol=0)


# ------------------------------------------------------------------ listing
def test_uris_resolve_like_local_folders(s3_server, bucket, tmp_path):
    local = spark_days(tmp_path / "logs")
    uri = upload(s3_server, local, f"{bucket}/logs")
    options = s3_server.storage_options
    november = [(f"{day}/part-0000{i}-c0ffee.snappy.parquet", (day,)) for day in NOVEMBER for i in (0, 1)]
    for pattern in ("", "/", "/day=2026-11-*", "/day=2026-11-*/", "/**/*.parquet", "/day=*/part-00001*"):
        remote = resolve_paths(uri + pattern, options)
        assert relative(remote, uri) == relative(resolve_paths(str(local) + pattern), local), pattern
        assert all(f.storage is not None and str(f).startswith(f"s3://{bucket}/logs/day=") for f in remote)
    # the hidden names are skipped, the Hive folders are string partitions
    found = resolve_paths(f"{uri}/day=2026-11-*/", options)
    assert [(name, tuple(f"day={p.value}" for p in parts)) for name, parts in relative(found, uri)] == november
    assert {p.dtype for f in found for p in f.partitions} == {"string"}
    # a file named explicitly is read whatever its name; each file once across items
    explicit = f"{uri}/day=2026-11-01/.part-00003-c0ffee.inprogress.parquet"
    assert [str(f) for f in resolve_paths(explicit, options)] == [explicit]
    assert len(resolve_paths([f"{uri}/day=2026-11-01", f"{uri}/day=2026-11-*"], options)) == 4
    # the same errors as for local paths, naming the URI
    with pytest.raises(ValueError, match=rf"s3://{bucket}/logs/day=1999-\*: no file or folder matches the glob"):
        resolve_paths(f"{uri}/day=1999-*", options)
    s3_server.filesystem().pipe(f"{bucket}/only/_temporary/part-0.parquet", (local / NOVEMBER[0] / "_temporary" / "0" /
                                                                         "part-00002-c0ffee.snappy.parquet").read_bytes())
    with pytest.raises(ValueError, match=rf"s3://{bucket}/only: folder holds no .parquet file \(1 under hidden names"):
        resolve_paths(f"s3://{bucket}/only", options)


def test_footer_checks_name_the_uri(s3_server, bucket, tmp_path):
    good = write(tmp_path / "good.parquet", 40, 0)
    empty = tmp_path / "empty.parquet"
    pq.write_table(make_table(40).slice(0, 0), empty)
    s3 = s3_server.filesystem()
    s3.pipe({f"{bucket}/a/good.parquet": good.read_bytes(), f"{bucket}/a/zz-not-parquet.parquet": b"PAR1 not really",
             f"{bucket}/b/good.parquet": good.read_bytes(), f"{bucket}/b/zz-empty.parquet": empty.read_bytes()})
    with pytest.raises(ValueError, match=rf"s3://{bucket}/a/zz-not-parquet.parquet: cannot read the Parquet footer"):
        datamodule(f"s3://{bucket}/a", storage_options=s3_server.storage_options).setup("fit")
    with pytest.raises(ValueError, match=rf"s3://{bucket}/b/zz-empty.parquet: file is empty \(0 rows\)"):
        datamodule(f"s3://{bucket}/b", storage_options=s3_server.storage_options).setup("fit")
    with pytest.raises(ValueError, match="either filesystem= .* or storage_options="):
        resolve_paths(f"s3://{bucket}/a", {"key": "x"}, pafs.S3FileSystem(anonymous=True))


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_a_bucket_gives_the_batches_of_the_same_local_files(s3_server, bucket, tmp_path, streaming):
    local = spark_days(tmp_path / "logs")
    uri = upload(s3_server, local, f"{bucket}/logs")
    # the partition column `day` is read as a raw categorical: fitted on the train split, read in every batch
    kwargs = dict(streaming=streaming, categorical=["day"], features=synthetic_features(embedding_dim=4),
                  normalize=["dense_0"])
    here = datamodule(f"{local}/day=2026-11-*", **kwargs)
    there = datamodule(f"{uri}/day=2026-11-*", storage_options=s3_server.storage_options, **kwargs)
    for dm in (here, there):
        dm.setup("fit")
    assert there.same_preprocessing(here.state_dict())  # the same vocabulary and statistics
    assert there.encoders["day"].num_ids == 3  # two November days and the out-of-vocabulary id
    batches = epoch(there)
    assert_same_batches(batches, epoch(here))
    assert sorted(int(i) for b in batches for i in b["row_id"]) == list(range(240))  # the 4 committed November files
    assert sorted({int(i) for b in batches for i in b["features"]["day"]}) == [1, 2]


def test_ranks_times_workers_read_every_row_once_from_a_bucket(s3_server, bucket, tmp_path):
    uri = upload(s3_server, spark_days(tmp_path / "logs", rows=50, row_group_size=20), f"{bucket}/logs")
    dm = datamodule(uri, val=uri, streaming=True, storage_options=s3_server.storage_options, batch_size=16)
    dm.setup("fit")
    seen = {"train": [], "val": []}
    batches = {}
    for split, rank in itertools.product(seen, (0, 1)):
        dataset = dm.dataset(split, rank=rank, world_size=2)
        dataset.set_epoch(1)
        # forked DataLoader workers make their own S3 clients (fsspec's are not fork-safe)
        loaded = list(DataLoader(dataset, batch_size=None, num_workers=2 if split == "val" else 0))
        batches[split, rank] = len(loaded)
        seen[split] += [int(i) for batch in loaded for i in batch["row_id"]]
    assert sorted(seen["val"]) == list(range(300))  # evaluation: every row exactly once
    assert sorted(set(seen["train"])) == list(range(300)) and len(seen["train"]) == 300
    assert batches["train", 0] == batches["train", 1]  # training: the same number of steps on every rank


def test_pyarrow_s3_filesystem_reads_the_same_rows(s3_server, bucket, tmp_path):
    uri = upload(s3_server, spark_days(tmp_path / "logs"), f"{bucket}/logs")
    native = pafs.S3FileSystem(endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http",
                               access_key=CREDENTIALS["key"], secret_key=CREDENTIALS["secret"], region="us-east-1")
    through_fsspec = datamodule(f"{uri}/day=2026-11-*/", streaming=True, storage_options=s3_server.storage_options)
    through_pyarrow = datamodule(f"{uri}/day=2026-11-*/", streaming=True, filesystem=native)
    assert [str(f) for f in through_pyarrow.files("train")] == [str(f) for f in through_fsspec.files("train")]
    assert_same_batches(epoch(through_pyarrow), epoch(through_fsspec))


# ------------------------------------------------------------------ retries
def test_transient_errors_are_retried_and_a_failing_file_is_named(s3_server, bucket, tmp_path):
    uri = upload(s3_server, spark_days(tmp_path / "logs"), f"{bucket}/logs")
    proxy = FlakyProxy(s3_server.port)
    try:
        # botocore's own retries off, so that the data module's are the ones at work
        options = storage_options(proxy.endpoint, config_kwargs={"retries": {"max_attempts": 1}})
        files = resolve_paths(f"{uri}/day=2026-11-01/", options, retry=FAST_RETRY)
        target = "day%3D2026-11-01/part-00001"  # as the URL of the object's requests spells it
        proxy.fail(target, 2)  # the footer read fails twice, then succeeds
        with open_file(files[1]) as reader:
            assert proxy.failed[target] == 2
            proxy.fail(target, 1)  # a row group read fails once: done again on a new file object
            table = reader.read_row_group(1, ["rid"])
            assert proxy.failed[target] == 1
            proxy.fail(target, 1)  # a batch in the middle of a pass: the pass goes on after the batches it yielded
            batches = reader.iter_batches(10, ["rid", "dense_0"])
            ids = [next(batches)["rid"]]
            ids += [b["rid"] for b in batches]
            assert proxy.failed[target] == 1
        assert table["rid"].to_pylist() == list(range(85, 110))
        assert pa.chunked_array(ids).to_pylist() == list(range(60, 120))
        # a file that keeps failing is named, with the number of tries
        proxy.fail(target, 1_000)
        dm = datamodule(f"{uri}/day=2026-11-01/", storage_options=options, retries=FAST_RETRY)
        with pytest.raises(ValueError, match=rf"s3://{bucket}/logs/day=2026-11-01/part-00001-c0ffee.snappy.parquet: "
                                             r"reading the Parquet footer failed 3 time\(s\).*InternalError|internal "
                                             r"error"):
            dm.setup("fit")
        proxy.fail("list-type=2", 1_000)  # listings too
        with pytest.raises(ValueError, match=rf"s3://{bucket}/logs.*: listing the folder failed 3 time\(s\)"):
            resolve_paths(f"{uri}/day=*/", options, retry=FAST_RETRY)
    finally:
        proxy.stop()


# ------------------------------------------------------------------ training
class Interrupt(Exception):
    pass


class StopAfter(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.steps:
            raise Interrupt  # a job killed after step `steps`, whose checkpoint is written by then


class RecordInto(L.Callback):
    """Appends the row ids of every batch the Trainer takes to ``rows``."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows += batch["row_id"].tolist()


def test_train_resume_mid_epoch_and_predict_entirely_through_s3(s3_server, bucket, tmp_path, monkeypatch, quiet_trainer):
    """Data, checkpoints and predictions in the bucket; streaming with 2 workers; resumed after 6 of 15 steps."""
    # Lightning's checkpoint I/O goes through fsspec with no options: s3fs takes the endpoint from the environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret"])
    uri = upload(s3_server, spark_days(tmp_path / "logs"), f"{bucket}/logs")
    train, val = f"{uri}/day=2026-11-*/", f"{uri}/day=2026-12-01/"

    def run(ckpt_path: str | None = None, *callbacks: L.Callback) -> tuple[MultiTaskLightningModule, list[int]]:
        torch.manual_seed(0)
        dm = datamodule(train, val=val, predict=val, streaming=True, num_workers=2, batch_size=16,
                        storage_options=s3_server.storage_options)
        dm.setup("fit")
        module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                               tower_hidden=(4,)), lr=1e-2)
        rows: list[int] = []
        trainer = quiet_trainer(max_epochs=1, callbacks=[RecordInto(rows), *callbacks],
                                enable_checkpointing=bool(callbacks), num_sanity_val_steps=0)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module, rows

    straight, straight_rows = run()
    checkpoints = ModelCheckpoint(dirpath=f"s3://{bucket}/checkpoints", every_n_train_steps=6, save_last=True)
    first_rows: list[int] = []
    with pytest.raises(Interrupt):
        run(None, checkpoints, StopAfter(6), RecordInto(first_rows))
    assert len(first_rows) == 6 * 16  # StopAfter raised before this recorder saw the 7th batch
    assert s3_server.filesystem().exists(f"{bucket}/checkpoints/last.ckpt")
    resumed, resumed_rows = run(f"s3://{bucket}/checkpoints/last.ckpt")
    # every row of the epoch exactly once across both runs, in the uninterrupted order, and the same weights
    assert first_rows[:96] + resumed_rows == straight_rows
    assert sorted(straight_rows) == list(range(240))
    for (name, x), y in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)

    dm = datamodule(train, predict=val, streaming=True, storage_options=s3_server.storage_options)
    writer = ParquetPredictionWriter(f"s3://{bucket}/predictions/day=2026-12-01", prefix="scores",
                                     storage_options=s3_server.storage_options)
    quiet_trainer(callbacks=[writer]).predict(resumed, datamodule=dm, return_predictions=False)
    assert writer.paths == [f"s3://{bucket}/predictions/day=2026-12-01/scores-rank00000.parquet"]
    [written] = resolve_paths(f"s3://{bucket}/predictions/", s3_server.storage_options)
    with open_file(written) as reader:
        scores = reader.read(["row_id", "click", "day"])
    assert sorted(scores["row_id"].to_pylist()) == list(range(240, 360))  # every row of the predict split once
    assert set(scores["day"].to_pylist()) == {"2026-12-01"}  # the writer's folder is a partition like any other
    assert 0 < min(scores["click"].to_pylist()) <= max(scores["click"].to_pylist()) < 1


# ------------------------------------------------------------------ errors that name the URI and what to check
@pytest.fixture(scope="module")
def locked_s3_server():
    """A second moto server that checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT=0``): unknown keys get 403."""
    from tests.s3_server import S3Server

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # the child process inherits the environment
        server = S3Server()
    yield server
    server.stop()


def test_wrong_credentials_name_the_uri_and_say_to_check_the_credentials(locked_s3_server, tmp_path,
                                                                         quiet_trainer):
    from datamodules.storage import StorageError

    wrong = storage_options(locked_s3_server.endpoint, key="not-a-key", secret="not-a-secret",
                            config_kwargs={"retries": {"max_attempts": 1}})
    credentials = r"the store refused the credentials or the permission: check the key and secret"
    # refused at once (no retries: a PermissionError cannot heal), for a folder, a glob and a data module
    for spec, action in (("s3://logs/day=2026-11-01/", "reading its file information"),
                         ("s3://logs/day=*/", "listing the folder")):
        with pytest.raises(StorageError, match=rf"s3://logs\S*: {action} failed with "
                                               rf"PermissionError: .*; {credentials}.*bucket 'logs'") as caught:
            resolve_paths(spec, wrong, retry=FAST_RETRY)
        assert isinstance(caught.value, ValueError) and caught.value.uri.startswith("s3://logs")
    with pytest.raises(ValueError, match=rf"s3://logs/day=2026-11-01/: .*failed with PermissionError.*{credentials}"):
        datamodule("s3://logs/day=2026-11-01/", storage_options=wrong, retries=FAST_RETRY).setup("fit")
    # pyarrow's own S3 client reports it as a plain OSError with the AWS error code: the same refusal, not retried
    native = pafs.S3FileSystem(endpoint_override=locked_s3_server.endpoint.removeprefix("http://"), scheme="http",
                               access_key="not-a-key", secret_key="not-a-secret", region="us-east-1")
    with pytest.raises(StorageError, match=rf"s3://logs: listing the folder failed with OSError: .*"
                                           rf"INVALID_ACCESS_KEY_ID.*; {credentials}"):
        resolve_paths("s3://logs/day=*/", filesystem=native, retry=FAST_RETRY)
    # a prediction writer with credentials refused: the upload (on close) names the file
    writer = ParquetPredictionWriter("s3://scores/day=2026-12-01", storage_options=wrong)
    dm = datamodule(write(tmp_path / "rows.parquet", 40, 0), predict=tmp_path / "rows.parquet")
    dm.setup("predict")
    module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(4,),
                                           tower_hidden=(4,)))
    with pytest.raises(StorageError, match=r"s3://scores/day=2026-12-01/predictions-rank00000.parquet: uploading the "
                                           rf"file \(on close\) failed with PermissionError.*{credentials}"):
        quiet_trainer(callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)


def test_a_refused_connection_is_retried_then_names_the_uri_and_the_endpoint(tmp_path):
    from botocore.exceptions import EndpointConnectionError

    from datamodules.storage import StorageError, transient
    from tests.s3_server import free_port

    assert transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))  # botocore's, outside OSError
    assert not transient(PermissionError("Forbidden")) and not transient(FileNotFoundError("gone"))
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    options = storage_options(closed, config_kwargs={"retries": {"max_attempts": 1}})
    unreachable = r"the store cannot be reached: check the endpoint \(storage_options endpoint_url"
    with pytest.raises(StorageError, match=rf"s3://logs/day=2026-11-01/: reading its file information failed 3 "
                                           rf"time\(s\), the last with EndpointConnectionError: .*{unreachable}"):
        resolve_paths("s3://logs/day=2026-11-01/", options, retry=FAST_RETRY)
    with pytest.raises(ValueError, match=rf"s3://logs: listing the folder failed 3 time\(s\).*{unreachable}"):
        datamodule("s3://logs/day=*/", storage_options=options, retries=FAST_RETRY).setup("fit")
    native = pafs.S3FileSystem(endpoint_override=closed.removeprefix("http://"), scheme="http", access_key="k",
                               secret_key="s", region="us-east-1",
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    with pytest.raises(StorageError, match=rf"s3://logs/x.parquet: reading its file information failed 3 time\(s\)"
                                           rf".*NETWORK_CONNECTION.*{unreachable}"):
        resolve_paths("s3://logs/x.parquet", filesystem=native, retry=FAST_RETRY)


def test_a_connection_error_that_heals_is_retried_until_it_succeeds(s3_server, bucket, tmp_path):
    from botocore.exceptions import EndpointConnectionError

    from datamodules.storage import Storage

    uri = upload(s3_server, spark_days(tmp_path / "logs"), f"{bucket}/logs")
    storage = Storage(uri, s3_server.storage_options, retry=FAST_RETRY)
    failures = iter([EndpointConnectionError(endpoint_url=s3_server.endpoint)] * 2)

    def list_after_two_refusals():
        error = next(failures, None)
        if error is not None:
            raise error
        return storage.filesystem.get_file_info(pafs.FileSelector(storage.path(uri), recursive=True))

    entries = storage.call(uri, "listing the folder", list_after_two_refusals)  # the third try lists the bucket
    assert sum(e.path.endswith(".parquet") for e in entries) == 12


def test_a_writer_into_a_missing_bucket_names_the_uri_before_predicting(s3_server, tmp_path, quiet_trainer):
    from datamodules.storage import StorageError

    dm = datamodule(write(tmp_path / "rows.parquet", 40, 0), predict=tmp_path / "rows.parquet")
    dm.setup("predict")
    module = MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(4,),
                                           tower_hidden=(4,)))
    writer = ParquetPredictionWriter("s3://no-such-bucket/scores", storage_options=s3_server.storage_options)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/scores/predictions-rank00000.parquet: writing the "
                                           r"file: the bucket 'no-such-bucket' does not exist; check the bucket name "
                                           r"and the endpoint"):
        quiet_trainer(callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)
    # opening a file of a missing bucket: the URI and the bucket are named too
    storage = Storage("s3://no-such-bucket", s3_server.storage_options, retry=FAST_RETRY)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/logs/part-0.parquet: opening the file failed with "
                                           r"FileNotFoundError: .*the bucket 'no-such-bucket' does not exist"):
        storage.open_input("s3://no-such-bucket/logs/part-0.parquet")
