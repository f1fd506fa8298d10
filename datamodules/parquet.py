"""``ParquetDataModule``: Parquet files to whole multi-task batches, with no per-row Python.

Batches are ``{"features": {name: Tensor}, "labels": {task: Tensor}, "row_id": Tensor}``
with int64 ids, gathered from a ``store.ColumnStore`` (in memory) or streamed
(``streaming.ParquetStream``).

The reader is split into layers with one direction of imports:
``paths`` (which files) <- ``files`` (reading, errors naming the file);
``columns`` (checks); both <- ``inference`` / ``store`` (the column store)
<- ``batches`` (in memory) / ``streaming`` <- this module. What does not
depend on Parquet -- tasks, features, preprocessing (``preprocessing``), the
partition record (``partitions``), the checkpoint state, the loaders -- is
``base.MultiTaskDataModule``, which this class extends with Parquet's files,
footer checks, schema inference, preallocated in-memory reads and streaming.
The public names are importable from ``datamodules``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
from lightning.pytorch.utilities import rank_zero_info

from mtl_lightning.features import DenseFeature, Feature
from mtl_lightning.tasks import Task

from .base import SPLITS, MultiTaskDataModule
from .batches import ParquetBatches, _distributed
from .files import check_unique, open_file, read_schema
from .fitting import iter_chunks
from .inference import infer_features
from .paths import DataFile, PathSpec, resolve_paths
from .placement import check_device_resident
from .storage import RetryPolicy
from .store import ColumnStore, read_split
from .streaming import ParquetStream, list_row_groups

__all__ = ["ParquetDataModule", "ParquetBatches", "ParquetStream", "infer_features", "read_split", "resolve_paths"]


# ----------------------------------------------------------------- data module
class ParquetDataModule(MultiTaskDataModule):
    """Parquet splits to multi-task batches.

    Args:
        train: a file, a folder, a glob, or a list of them;
            each may be a local path or a URI (``s3://bucket/logs/day=2026-11-*/``,
            ``gs://``, ``hdfs://``, ``abfs://``...), see ``datamodules.storage``.
        val: the validation split, given like ``train``.
        test: the test split, given like ``train``.
        predict: the prediction split, given like ``train``.
        tasks: the tasks; each task's label is read from column ``Task.label``
            (labels are optional in the predict split).
        features: feature specs; ``None`` infers them (``infer_features``) from
            the train split's schema and a statistics pass over every split.
        batch_size: rows per batch.
        shuffle: reshuffle the train split every epoch.
        num_workers: DataLoader worker processes.
        seed: base seed of the train order (epoch ``e`` uses ``seed + e``).
        row_id: an integer column carried through as ``batch["row_id"]``; by
            default the row's position in its split.
        embedding_dim: embedding size of inferred sparse and sequence features.
        exclude: columns that are neither features nor labels of these tasks
            (other labels, keys, truth columns); only used when inferring features.
        drop_last: drop the last incomplete train batch.
        pin_memory: pin batches in page-locked memory (for GPU training), when they
            are built on the host (see ``device_resident``).
        device_resident: where the batches of an in-memory split are built:
            ``"auto"`` (default) on the training device when it is a GPU, the
            split takes at most a quarter of its free memory and
            ``num_workers=0`` (the split's blocks are copied there once; no
            copy per step), else on the host; ``True`` on the device
            whatever the size; ``False`` on the host. The batches are the same
            either way; see ``datamodules.placement``.
        streaming: read every split incrementally (row group by row group)
            through a shuffle buffer instead of loading it; see
            ``datamodules.streaming`` for the order, sharding and memory bound.
        shuffle_buffer: rows held by each worker's shuffle buffer (streaming).
        read_rows: rows read from Parquet at a time (streaming and fitting).
        categorical: raw categorical columns (strings or integers) to encode,
            as a list of column names (vocabulary, ``min_freq=1``) or a mapping
            ``{column: {"min_freq": 2, "max_size": None}}`` (vocabulary with an
            out-of-vocabulary id 0) or ``{column: {"num_buckets": 1000}}``
            (hashing); ``"embedding_dim"`` may be added to either. Fitted on the
            train split; each column becomes a ``SparseFeature`` whose
            ``vocab_size`` is the encoder's number of ids (a ``SparseFeature``
            given in ``features`` for the column keeps its other fields). A
            column of lists (a behaviour history of raw item ids) is encoded
            value by value into a ``SequenceFeature`` (``max_len``: the longest
            list, when inferred). ``{column: {"vocabulary_of": "item_id"}}``
            encodes a column with ``item_id``'s encoder, fitted on the union
            of both columns' values, so the ids agree and, unless the
            column's spec is given in ``features``, it reads ``item_id``'s
            table (``shared_with``); see ``datamodules.encoders``.
        normalize: ``True`` standardises every dense feature, a list of names
            only those, with mean and standard deviation from the train split.
        fill_missing: ``{column: value}`` for dense features (one value per
            row) that may hold missing values (null or NaN): ``value`` is a
            number, or ``"mean"`` for the mean of the values present in the
            train split. Without it a missing value is refused. A normalised
            column's statistics are those of the values present.
        missing_indicator: ``True`` (every column of ``fill_missing``) or a
            list of them: each gets a dense 0/1 feature ``<column>_missing``
            (1.0 where the value was missing), added to the features.
        progress: show a progress bar for the long passes (see below).
        keys: numeric columns carried as ``batch["keys"]`` (written next to the
            predictions by ``ParquetPredictionWriter``).
        group: an integer column (e.g. ``user_id``, which may also be a
            feature) put in every batch the Trainer sees as ``batch["group"]``;
            the training module then logs group AUC (``val/<task>/gauc``).
        scenario: an integer column holding the scenario (domain) id of each
            row (it may also be a feature) put in every batch as
            ``batch["scenario"]``; the training module then logs AUC (and, with
            ``group``, GAUC) per scenario: ``val/<task>/auc/domain=<id>``. A
            multi-scenario architecture needs no ``scenario``: its domain
            feature's ids are used unless this is given.
        implied_labels: label columns that imply another label column, e.g.
            ``{"purchase": "click", "conversion": "click"}``; a file with a
            positive label on a row where the implied label is 0 is rejected
            (the error names the file and the number of rows; when streaming,
            the rows of the chunk being read). Checked in every labelled split.
        ignore_label: the label value that means "no label" (default ``-1``, as
            ``MultiTaskLightningModule(ignore_label=...)``, which must agree).
            Labels are checked like features: a binary label must be 0/1
            (bool and integer columns accepted), the ignore label or null/NaN;
            a regression label finite (as float32), the ignore label or
            null/NaN; otherwise the split is refused with the file, the column,
            the number of bad rows and an example value.
        labels: label columns of the data that are not tasks of this model
            (e.g. ``purchase`` when training ``click`` and ``conversion``):
            never inferred as features. Inference also warns about any float
            column holding only 0/1 values, the mark of a label.
        max_inferred_vocab: the largest embedding table (rows) inference may
            make for an integer id column; a column with a larger max id, or
            whose max id is more than 100 times its number of distinct ids, is
            refused with a message suggesting ``categorical=`` (vocabulary or
            ``num_buckets`` hashing). Given ``features`` are not limited.
        storage_options: options of the fsspec filesystem that reads URIs
            (as in pandas: s3fs's ``key``, ``secret``, ``endpoint_url``,
            ``client_kwargs``...; gcsfs's ``token``; adlfs's ``account_name``...).
        filesystem: a ready ``pyarrow.fs.FileSystem`` (e.g.
            ``pyarrow.fs.S3FileSystem(endpoint_override=...)``) or fsspec
            filesystem that reads every URI instead (then no ``storage_options``).
        retries: how remote listings and reads are retried on transient errors
            (a ``RetryPolicy``, or just its number of attempts); a file that
            keeps failing is named in a ``ValueError``. Local reads are not retried.
        grow_vocabulary: incremental training. The vocabularies restored from
            a checkpoint (``load_checkpoint_state``) grow on this train split:
            existing values keep their ids, new ones get new ids (with
            ``max_size``, the rarest are evicted and their ids reused); see
            ``datamodules.encoders``. ``MultiTaskLightningModule`` then grows
            its tables when ``trainer.fit(..., ckpt_path=...)`` loads that
            checkpoint. Without it a restored vocabulary is used as it is.
        allow_retraining: train on partitions the checkpoint has already
            trained on (with a warning) instead of refusing; see
            ``datamodules.partitions``.
        feature_overrides: ``{feature: {field: value}}``: fields of inferred
            (or given) specs to change, e.g. ``{"hist_item": {"pooling":
            "din", "query": "item_id", "group": "hist"}}``; an unknown feature
            or field is refused naming the key (``datamodules.feature_specs``).
        continue_from: a checkpoint (path or URI) whose data module state is
            loaded before the features are prepared, as ``load_checkpoint_state``
            does; the way to continue from yesterday's checkpoint from a config
            (``mtl-lightning fit --data.continue_from ... --ckpt_path ...``).

    Normalisation statistics restored from a checkpoint are kept as they are
    (the first day's): a model's inputs keep the scale it learnt on.

    What the data module finds is logged at INFO on rank 0 (``rank_zero_info``,
    shown by the CLI and by any Python program that configures logging): each
    split's files, rows and row groups, the inferred features, the fitted
    vocabularies with their sizes, normalisation and fill values. Its long
    passes -- reading a split into memory, fitting vocabularies and statistics
    over the train split -- show a progress bar (tqdm, on stderr) on rank 0;
    ``progress=False`` turns them off.

    The fitted encoders and statistics (and the resolved feature specs) are the
    data module's ``state_dict``, saved in every Lightning checkpoint and restored
    with ``ckpt_path=`` (they then replace the data module's own), so
    validation, test and prediction use the mapping the model was trained with.
    """

    def __init__(
        self,
        train: PathSpec | None = None,
        val: PathSpec | None = None,
        test: PathSpec | None = None,
        predict: PathSpec | None = None,
        tasks: Sequence[Task | dict] = (),
        features: Sequence[Feature | dict] | None = None,
        batch_size: int = 1024,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        row_id: str | None = None,
        embedding_dim: int = 16,
        exclude: Sequence[str] = (),
        drop_last: bool = False,
        pin_memory: bool = False,
        streaming: bool = False,
        shuffle_buffer: int = 65_536,
        read_rows: int = 65_536,
        categorical: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
        normalize: bool | Sequence[str] = False,
        keys: Sequence[str] = (),
        group: str | None = None,
        scenario: str | None = None,
        implied_labels: Mapping[str, str] | None = None,
        ignore_label: float | None = -1,
        labels: Sequence[str] = (),
        max_inferred_vocab: int = 1 << 24,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: Any = None,
        retries: RetryPolicy | int = RetryPolicy(),
        grow_vocabulary: bool = False,
        allow_retraining: bool = False,
        continue_from: str | Path | None = None,
        fill_missing: Mapping[str, float | str] | None = None,
        missing_indicator: bool | Sequence[str] = False,
        progress: bool = True,
        feature_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        device_resident: bool | str = "auto",
    ) -> None:
        super().__init__(
            {"train": train, "val": val, "test": test, "predict": predict}, tasks=tasks, features=features,
            batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, seed=seed, row_id=row_id,
            embedding_dim=embedding_dim, exclude=exclude, drop_last=drop_last, pin_memory=pin_memory,
            read_rows=read_rows, categorical=categorical, normalize=normalize, keys=keys, group=group,
            scenario=scenario, implied_labels=implied_labels, ignore_label=ignore_label, labels=labels,
            grow_vocabulary=grow_vocabulary, allow_retraining=allow_retraining, continue_from=continue_from,
            fill_missing=fill_missing, missing_indicator=missing_indicator, progress=progress,
            feature_overrides=feature_overrides, device_resident=device_resident,
        )
        self.storage_options = dict(storage_options or {})
        self.filesystem = filesystem
        self.retries = retries if isinstance(retries, RetryPolicy) else RetryPolicy(attempts=int(retries))
        if max_inferred_vocab < 1:
            raise ValueError(f"max_inferred_vocab must be >= 1, got {max_inferred_vocab}")
        self.max_inferred_vocab = max_inferred_vocab
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.streaming = streaming
        self.device_resident = check_device_resident(device_resident, streaming, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self._remote_files: dict[str, list[DataFile]] = {}  # listed once per split
        self._checked: set[str] = set()  # splits whose footers passed check_splits
        self._split_rows: dict[str, int] = {}  # rows of each split whose footers were read
        self._described: set[str] = set()  # splits whose files, rows and row groups were logged

    # -------------------------------------------------------------- files
    def files(self, split: str) -> list[DataFile]:
        """The data files of a split (``resolve_paths``: hidden names skipped, each file once, with its partitions).

        A split with URIs is listed once (the first call) and keeps that list:
        every pass over it reads the same files, and the store is not listed again.
        """
        spec = self.paths[split]
        if spec is None:
            return []
        if split in self._remote_files:
            return self._remote_files[split]
        files = resolve_paths(spec, self.storage_options, self.filesystem, self.retries)
        if any(file.storage is not None for file in files):
            self._remote_files[split] = files
        return files

    def read_tables(self, split: str, columns: Sequence[str], read_rows: int | None = None) -> Iterator[tuple[Any, pa.Table]]:
        """``(path, table)`` chunks of at most ``read_rows`` rows of ``columns`` (partition columns too), file by file."""
        return iter_chunks(self.files(split), columns, read_rows or self.read_rows)

    def count_rows(self, split: str) -> int | None:
        """The rows of ``split`` from its footers (read once; a remote split's only when already read)."""
        total = self._split_rows.get(split)
        files = self.files(split)
        if total is None and all(file.storage is None for file in files):  # remote footers are not read twice
            total = 0
            for file in files:
                with open_file(file) as reader:
                    total += reader.num_rows
            self._split_rows[split] = total
        return total

    def infer(self) -> list[Feature]:
        """Feature specs inferred from the data (the statistics pass covers every given split)."""
        all_files = [p for s in SPLITS for p in self.files(s)]
        first = next(p for s in SPLITS for p in self.files(s))
        exclude = self._not_features()
        inferred = infer_features([first], exclude | set(self.fillers), self.embedding_dim, stat_files=all_files,
                                  max_vocab=self.max_inferred_vocab, ignore_label=self.ignore_label,
                                  encoded=set(self.categorical))
        # a column to fill is a dense feature, whatever its numeric type (an integer age with nulls is not an id)
        return inferred + [DenseFeature(name) for name in self.fillers if name not in exclude]

    # ------------------------------------------------------------- checks
    def check_splits(self) -> None:
        """Check the footer of every file of every given split, in one pass, before any batch is read.

        Every file must open as Parquet and hold rows, and the group and scenario
        columns be integer columns. Once the features are known and the preprocessing
        fitted, each file's schema (with its partition columns) must also pass
        the split's converter, run on an empty table of that schema: the checks
        (a missing column, a wrong type, a key's type changing between files,
        a needed name twice in a file) are exactly those of reading, and no data
        page is read. A split is checked once; without fitted encoders (a
        checkpoint still to be loaded) only the footers are, and it is checked
        again later.
        """
        ready = self.features is not None and self.preprocessing_fitted()
        for split in SPLITS:
            if self.paths[split] is None or split in self._checked:
                continue
            files = self.files(split)
            schemas = []
            rows = groups = 0
            for file in files:
                with open_file(file) as reader:
                    if reader.num_rows == 0:
                        raise ValueError(f"{file}: file is empty (0 rows)")
                    schemas.append(reader.schema)
                    rows, groups = rows + reader.num_rows, groups + reader.num_row_groups
                self._check_id_columns(file, schemas[-1])
            if split not in self._described:
                self._described.add(split)
                rank_zero_info(f"ParquetDataModule {split} split: {len(files):,} file{'s' * (len(files) != 1)}, "
                               f"{rows:,} rows, {groups:,} row groups")
            self._split_rows[split] = rows
            if not ready:
                continue
            convert = self._converter(split, self._split_tasks(split, [schema.names for schema in schemas]))
            store = ColumnStore(convert.slots(schemas[0], files[0].path), 0)
            for file, schema in zip(files, schemas):
                present = [c for c in convert.columns if c in schema.names]  # the converter reports a missing one
                check_unique(schema, present, file)
                convert(schema.empty_table().select(present), file.path, 0, store=store)
            self._checked.add(split)

    _check_files = check_splits  # the name it had before the base class existed

    def _forget_reads(self) -> None:
        super()._forget_reads()
        self._checked.clear()

    # ------------------------------------------------------------ reading
    def read_store(self, split: str, progress: Any = None) -> ColumnStore:
        """Every row group of every file of ``split`` into one store allocated from the footers (``store.read_split``)."""
        return read_split(
            self.files(split), self.features, self.tasks, self.row_id, labels_required=split != "predict",
            keys=self._carried_keys(), implied_labels=self.implied_labels, encoders=self.encoders,
            normalizers=self.normalizers, ignore_label=self.ignore_label, fillers=self.fillers, progress=progress,
        )

    def _read_stores(self, stage: str | None) -> None:
        if not self.streaming:  # streams are opened by dataset()
            super()._read_stores(stage)

    def dataset(
        self, split: str, rank: int | None = None, world_size: int | None = None
    ) -> ParquetBatches | ParquetStream:
        """The batch stream of a split (``rank``/``world_size`` default to the DDP process group)."""
        if self.streaming:
            return self._stream(split, rank, world_size)
        return super().dataset(split, rank, world_size)

    def _stream(self, split: str, rank: int | None, world_size: int | None) -> ParquetStream:
        if self.paths.get(split) is None:
            raise ValueError(f"no {split} data was given to ParquetDataModule")
        self.prepare_features()
        self._require_fitted(split)
        self.check_splits()
        files = self.files(split)
        # labels are optional in the predict split: use those every file has
        tasks: list[Task] = self._split_tasks(
            split, [read_schema(file).names for file in files] if split == "predict" else [])
        process_rank, process_world = _distributed()
        train = split == "train"
        return ParquetStream(
            list_row_groups(files),
            self._converter(split, tasks),
            self.batch_size, shuffle=train and self.shuffle, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            drop_last=train and self.drop_last, pad_to_equal=train,
            rank=process_rank if rank is None else rank,
            world_size=process_world if world_size is None else world_size, read_rows=self.read_rows,
        )
