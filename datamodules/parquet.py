"""``ParquetDataModule``: Parquet files to whole multi-task batches, with no per-row Python.

Batches are ``{"features": {name: Tensor}, "labels": {task: Tensor}, "row_id": Tensor}``
with int64 ids, gathered from a ``store.ColumnStore`` (in memory) or streamed
(``streaming.ParquetStream``).

The reader is split into layers with one direction of imports:
``paths`` (which files) <- ``files`` (reading, errors naming the file);
``columns`` (checks); both <- ``inference`` / ``store`` (the column store)
<- ``batches`` (in memory) / ``streaming`` <- this module (the
``LightningDataModule``). The public names are importable from ``datamodules``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from mtl_lightning.features import (
    DenseFeature, Feature, SparseFeature, feature_from_config, feature_to_config,
)
from mtl_lightning.tasks import Task, check_tasks

from .batches import EpochDataLoader, ParquetBatches, _distributed
from .columns import _dense_array
from .encoders import (
    CategoricalEncoder, DenseNormalizer, MissingFiller, VocabularyEncoder, encoder_from_state, filler_from_state,
    fit_preprocessing, grow_vocabularies, make_encoder, make_fillers,
)
from .files import check_unique, open_file, read_schema
from .inference import infer_features
from .paths import DataFile, PathSpec, resolve_paths
from .storage import RetryPolicy, uri_scheme
from .store import ColumnStore, TableConverter, read_split
from .streaming import ParquetStream, list_row_groups

SPLITS = ("train", "val", "test", "predict")


# ----------------------------------------------------------------- data module
class ParquetDataModule(L.LightningDataModule):
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
        pin_memory: pin batches in page-locked memory (for GPU training).
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
            given in ``features`` for the column keeps its other fields).
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
            ``load_state_dict``.
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
    ) -> None:
        super().__init__()
        self.paths = {"train": train, "val": val, "test": test, "predict": predict}
        self.storage_options = dict(storage_options or {})
        self.filesystem = filesystem
        self.retries = retries if isinstance(retries, RetryPolicy) else RetryPolicy(attempts=int(retries))
        self._remote_files: dict[str, list[DataFile]] = {}  # listed once per split
        self.grow_vocabulary = grow_vocabulary
        self.allow_retraining = allow_retraining
        self.continue_from = continue_from  # loaded once, by the first prepare_features
        self._grow_from: dict[str, Any] | None = None  # a restored state whose vocabularies are still to grow
        self._grown_from: dict[str, Any] | None = None  # the restored state the vocabularies grew from
        self._row_sources: dict[str, tuple[int, np.ndarray]] = {}  # column -> (ids before, sources), see grow
        self._trained_partitions: list[str] = []  # partitions the restored checkpoint had trained on
        self._train_partitions: list[str] | None = None
        self._partition_record: dict[str, list[str]] | None = None  # a restored record, kept without a train split
        if all(v is None for v in self.paths.values()):
            raise ValueError("ParquetDataModule needs at least one of train, val, test, predict")
        self.tasks = check_tasks(tasks)
        self.features: list[Feature] | None = (
            [feature_from_config(f) for f in features] if features is not None else None
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.row_id = row_id
        self.embedding_dim = embedding_dim
        self.exclude = set(exclude)
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.implied_labels = dict(implied_labels or {})
        self.ignore_label = ignore_label
        self.labels = list(labels)
        if max_inferred_vocab < 1:
            raise ValueError(f"max_inferred_vocab must be >= 1, got {max_inferred_vocab}")
        self.max_inferred_vocab = max_inferred_vocab
        self.stores: dict[str, ColumnStore] = {}
        self._checked: set[str] = set()  # splits whose footers passed _check_files
        self.streaming = streaming
        if shuffle_buffer < 1 or read_rows < 1:
            raise ValueError(f"shuffle_buffer and read_rows must be >= 1, got {shuffle_buffer} and {read_rows}")
        self.shuffle_buffer = shuffle_buffer
        self.read_rows = read_rows
        if categorical is None:
            categorical = {}
        elif isinstance(categorical, str) or not isinstance(categorical, Mapping):
            categorical = {name: {} for name in ([categorical] if isinstance(categorical, str) else categorical)}
        self.categorical = {name: dict(spec or {}) for name, spec in categorical.items()}
        self.encoders: dict[str, CategoricalEncoder] = {
            name: make_encoder(name, spec) for name, spec in self.categorical.items()
        }
        if not isinstance(normalize, bool) and (isinstance(normalize, str) or not isinstance(normalize, Sequence)):
            raise TypeError(f"normalize must be True/False or a list of dense column names, got {normalize!r}")
        self.normalize = normalize if isinstance(normalize, bool) else list(normalize)
        self.normalizers: dict[str, DenseNormalizer] = {}
        self.fillers: dict[str, MissingFiller] = make_fillers(fill_missing, missing_indicator)
        self.progress = progress
        self._split_rows: dict[str, int] = {}  # rows of each split whose footers were read
        self._described: set[str] = set()  # splits whose files, rows and row groups were logged
        self.keys = list(keys)
        self.group = group
        self.scenario = scenario

    def _progress_bar(self, split: str, what: str) -> Any:
        """A tqdm bar over the rows of ``split`` on rank 0 (``None`` elsewhere or with ``progress=False``)."""
        if not self.progress or rank_zero_only.rank != 0:
            return None
        from tqdm.auto import tqdm

        total = self._split_rows.get(split)
        files = self.files(split)
        if total is None and all(file.storage is None for file in files):  # remote footers are not read twice
            total = 0
            for file in files:
                with open_file(file) as reader:
                    total += reader.num_rows
            self._split_rows[split] = total
        return tqdm(total=total, desc=f"{what} {split} split", unit=" rows", unit_scale=True, leave=False,
                    dynamic_ncols=True)

    def _log_preprocessing(self) -> None:
        parts = []
        for name, encoder in self.encoders.items():
            if isinstance(encoder, VocabularyEncoder):
                parts.append(f"{name} (vocabulary of {encoder.num_ids - 1:,} values + id 0 for unseen/null)")
            else:
                parts.append(f"{name} (hashing into {encoder.num_ids:,} ids)")
        if parts:
            rank_zero_info("ParquetDataModule categorical encoders: " + ", ".join(parts))
        if self.normalizers:
            rank_zero_info("ParquetDataModule normalisation (mean, std): " + ", ".join(
                f"{name} ({', '.join(f'{m:.4g}' for m in z.mean)}; {', '.join(f'{v:.4g}' for v in z.std)})"
                for name, z in self.normalizers.items()))
        if self.fillers:
            rank_zero_info("ParquetDataModule missing values filled with: " + ", ".join(
                f"{name} = {f.value:.6g}" + (f" (+ {f.indicator_name})" if f.indicator else "")
                for name, f in self.fillers.items()))

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

    def infer(self) -> list[Feature]:
        """Feature specs inferred from the data (the statistics pass covers every given split)."""
        all_files = [p for s in SPLITS for p in self.files(s)]
        first = next(p for s in SPLITS for p in self.files(s))
        exclude = {t.label for t in self.tasks} | ({self.row_id} if self.row_id else set()) | self.exclude
        exclude |= set(self.categorical) | set(self.keys)
        exclude |= {column for pair in self.implied_labels.items() for column in pair} | set(self.labels)
        inferred = infer_features([first], exclude | set(self.fillers), self.embedding_dim, stat_files=all_files,
                                  max_vocab=self.max_inferred_vocab, ignore_label=self.ignore_label)
        # a column to fill is a dense feature, whatever its numeric type (an integer age with nulls is not an id)
        return inferred + [DenseFeature(name) for name in self.fillers if name not in exclude]

    def prepare_features(self) -> list[Feature]:
        if self.continue_from is not None:
            checkpoint, self.continue_from = self.continue_from, None
            self.load_checkpoint_state(checkpoint)
        if self.features is None:
            self.features = self.infer()
            rank_zero_info("ParquetDataModule inferred features: " + ", ".join(
                f"{f.name} ({type(f).__name__}" + (f", vocab_size={f.vocab_size})" if hasattr(f, "vocab_size") else ")")
                for f in self.features))
        if self.encoders or self.normalize or self.fillers:
            self._prepare_preprocessing()
        return self.features

    # ------------------------------------------------------- preprocessing
    def _dense_features(self) -> dict[str, DenseFeature]:
        return {f.name: f for f in self.features or [] if isinstance(f, DenseFeature)}

    def preprocessing_fitted(self) -> bool:
        """Whether every categorical encoder and dense normaliser has its mapping."""
        return (all(e.fitted for e in self.encoders.values()) and all(n.fitted for n in self.normalizers.values())
                and all(f.fitted for f in self.fillers.values()))

    def _indicator_names(self) -> set[str]:
        return {f.indicator_name for f in self.fillers.values() if f.indicator}

    def _prepare_fillers(self, dense: Mapping[str, DenseFeature]) -> None:
        """Check the filled columns and add their missing-indicator features."""
        names = {f.name for f in self.features or []}
        for name, filler in self.fillers.items():
            if name not in dense or dense[name].dim != 1:
                raise ValueError(
                    f"fill_missing names {name!r}, which is not a dense feature of one value per row (dense: "
                    f"{sorted(n for n, f in dense.items() if f.dim == 1)}); missing categorical values need no "
                    "filling: with categorical=... a null gets the out-of-vocabulary id 0"
                )
            if filler.indicator and filler.indicator_name not in names:
                self.features = [*(self.features or []), DenseFeature(filler.indicator_name)]

    def _prepare_preprocessing(self) -> None:
        """Create the normalisers, fit what is unfitted on the train split, then give encoded columns their vocab sizes."""
        dense = self._dense_features()
        self._prepare_fillers(dense)
        indicators = self._indicator_names()
        wanted = ([n for n in dense if n not in indicators] if self.normalize is True
                  else ([] if self.normalize is False else self.normalize))
        for name in wanted:
            if name not in dense:
                raise ValueError(f"normalize names {name!r}, which is not a dense feature (dense: {sorted(dense)})")
            if name not in self.normalizers:
                self.normalizers[name] = DenseNormalizer(name, dense[name].dim)
        if not self.preprocessing_fitted() and self.paths["train"] is not None:
            bar = self._progress_bar("train", "fitting vocabularies/statistics on the")
            try:
                fit_preprocessing(
                    self.files("train"), self.encoders, self.normalizers,
                    lambda column, name, path: _dense_array(column, dense[name], path),
                    read_rows=max(self.read_rows, 65_536), fillers=self.fillers,
                    progress=bar.update if bar is not None else None,
                )
            finally:
                if bar is not None:
                    bar.close()
            self._log_preprocessing()
        if self._grow_from is not None and self.paths["train"] is not None:
            before = {name: e.num_ids for name, e in self.encoders.items() if isinstance(e, VocabularyEncoder)}
            sources = grow_vocabularies(self.files("train"), self.encoders, read_rows=max(self.read_rows, 65_536))
            self._row_sources = {name: (before[name], rows) for name, rows in sources.items()}
            self._grown_from, self._grow_from = self._grow_from, None
            self.stores.clear()
            self._checked.clear()
        if all(e.fitted for e in self.encoders.values()):
            self._resolve_categorical_features()

    def _resolve_categorical_features(self) -> None:
        by_name = {f.name: f for f in self.features or []}
        for name, encoder in self.encoders.items():
            spec = self.categorical.get(name, {})
            given = by_name.get(name)
            if given is not None and not isinstance(given, SparseFeature):
                raise ValueError(
                    f"categorical column {name!r} is given as a {type(given).__name__}; it must be a SparseFeature"
                )
            if given is None:
                by_name[name] = SparseFeature(name, encoder.num_ids, int(spec.get("embedding_dim", self.embedding_dim)))
            elif given.vocab_size != encoder.num_ids:
                by_name[name] = dataclasses.replace(given, vocab_size=encoder.num_ids)
        self.features = list(by_name.values())

    def _require_fitted(self, split: str) -> None:
        if not self.preprocessing_fitted():
            unfitted = [n for n, e in self.encoders.items() if not e.fitted]
            unfitted += [n for n, z in self.normalizers.items() if not z.fitted]
            unfitted += [n for n, z in self.fillers.items() if not z.fitted]
            raise ValueError(
                f"cannot read the {split} split: the encoders/statistics of {unfitted} are not fitted; give train=... "
                "to fit them, or restore them from a checkpoint (trainer.predict/validate/test(..., ckpt_path=...), "
                "or dm.load_state_dict(torch.load(path)['ParquetDataModule']))"
            )

    def state_dict(self) -> dict[str, Any]:
        """Resolved feature specs, fitted encoders and normalisation statistics (plain data, saved in checkpoints).

        With a train split, also ``"partitions"``: ``{"trained": [...], "training": [...]}``, the
        partitions the checkpoint's earlier runs trained on and those of this run's train split
        (``train_partitions``: ``".../day=2026-11-02"`` folders, or files).
        """
        state: dict[str, Any] = {}
        if (self.encoders or self.normalizers or self.fillers) and self.preprocessing_fitted():
            state = {
                "features": [feature_to_config(f) for f in self.features or []],
                "encoders": {name: e.state_dict() for name, e in self.encoders.items()},
                "normalization": {name: z.state_dict() for name, z in self.normalizers.items()},
            }
            if self.fillers:
                state["fill_missing"] = {name: f.state_dict() for name, f in self.fillers.items()}
        if self.paths["train"] is not None:
            state["partitions"] = {"trained": list(self._trained_partitions), "training": self.train_partitions()}
        elif self._partition_record is not None:  # no train split: the restored record goes on unchanged
            state["partitions"] = self._partition_record
        return state

    def train_partitions(self) -> list[str]:
        """The partitions of the train split, sorted: each file's deepest ``key=value`` folder, else the file.

        E.g. ``s3://logs/impressions/day=2026-11-02`` for every file below that
        folder, however the split names it (the folder, a glob, the files); local
        paths are absolute.
        """
        if self._train_partitions is None:
            keys = set()
            for file in self.files("train"):
                path = str(file.path) if file.storage is not None else Path(file.path).resolve().as_posix()
                parts = path.split("/")
                hive = [i for i, part in enumerate(parts[:-1]) if "=" in part]
                keys.add("/".join(parts[: hive[-1] + 1]) if hive else path)
            self._train_partitions = sorted(keys)
        return self._train_partitions

    @staticmethod
    def _preprocessing(state: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in state.items() if key != "partitions"}

    def same_preprocessing(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` (a checkpoint's) maps values as this data module does: the same encoders and statistics,
        or those it grew from (``grow_vocabulary``). The partition record is not compared."""
        mine = self._preprocessing(self.state_dict())
        theirs = self._preprocessing(state)
        grown_from = self._preprocessing(self._grown_from) if self._grown_from is not None else None
        return theirs == mine or (grown_from is not None and theirs == grown_from)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's features, encoders and statistics; splits read with another mapping are re-read.

        With a train split, the checkpoint's partition record is checked first:
        a train split holding a partition the checkpoint's earlier runs trained
        on, or overlapping the partitions of the run that wrote it without being
        exactly those (resuming that run), is refused with a ``ValueError``
        naming them (``allow_retraining=True``: a warning). With
        ``grow_vocabulary`` the restored vocabularies grow on the train split at
        the next ``setup``; a state this data module already grew from is not
        loaded again (Lightning restores it on ``fit(ckpt_path=...)``).
        """
        if not state_dict:
            return
        resuming = self._check_partitions(state_dict.get("partitions"))
        preprocessing = self._preprocessing(state_dict)
        if self._grown_from is not None and preprocessing == self._preprocessing(self._grown_from):
            return  # the state these vocabularies grew from: they include it
        if not preprocessing or preprocessing == self._preprocessing(self.state_dict()):
            return
        features = [feature_from_config(dict(f)) for f in preprocessing["features"]]
        if self.features is not None and self.preprocessing_fitted() and features != self.features:
            warnings.warn("the checkpoint's feature specs differ from the data module's; using the checkpoint's")
        self.features = features
        self.encoders = {name: encoder_from_state(name, s) for name, s in preprocessing["encoders"].items()}
        self.normalizers = {}
        for name, s in preprocessing["normalization"].items():
            self.normalizers[name] = DenseNormalizer(name, int(s["dim"]))
            self.normalizers[name].load_state_dict(s)
        if "fill_missing" in preprocessing:  # a state without fills (written before them) keeps this module's own
            self.fillers = {name: filler_from_state(name, s) for name, s in preprocessing["fill_missing"].items()}
        self.stores.clear()
        self._checked.clear()
        self._row_sources, self._grown_from = {}, None
        if self.grow_vocabulary and not resuming and any(isinstance(e, VocabularyEncoder) for e in self.encoders.values()):
            self._grow_from = copy.deepcopy(dict(state_dict))

    def _check_partitions(self, record: Mapping[str, Sequence[str]] | None) -> bool:
        """Check the train split against a checkpoint's partition record; ``True`` when it resumes the run that wrote it."""
        if record and self.paths["train"] is None:
            self._partition_record = {key: list(value) for key, value in record.items()}
        if not record or self.paths["train"] is None:
            return False
        trained, training, now = set(record.get("trained", ())), set(record.get("training", ())), self.train_partitions()
        resuming = set(now) == training
        again = sorted(set(now) & (trained if resuming else trained | training))
        if again:
            message = (f"the checkpoint has already trained on the partition(s) {again} of this train split; training "
                       "on them again counts their rows twice")
            if not self.allow_retraining:
                raise ValueError(f"{message}. Give a train split of new partitions (the next day), resume the run "
                                 "that wrote the checkpoint with exactly its train split, or pass "
                                 "ParquetDataModule(allow_retraining=True) to train on them anyway")
            warnings.warn(message + " (allow_retraining=True)")
        if not resuming:
            self._trained_partitions = sorted(trained | training)
        else:
            self._trained_partitions = sorted(trained)
        return resuming

    def load_checkpoint_state(self, checkpoint: str | Path) -> None:
        """Adopt the data module state saved in a Lightning checkpoint file (a path or a URI), before ``setup``.

        For incremental training: the previous day's vocabularies, statistics and
        partition record, so that ``setup`` grows the vocabularies on this train
        split (``grow_vocabulary=True``) and ``features`` has the grown sizes to
        build the model with. The file is read with ``torch.load(weights_only=True)``
        (a URI through fsspec, credentials from the environment as for Lightning's
        own checkpoint I/O).
        """
        name = str(checkpoint)
        try:
            if uri_scheme(name) is not None:
                import fsspec

                with fsspec.open(name, "rb") as stream:
                    loaded = torch.load(stream, map_location="cpu", weights_only=True)
            else:
                loaded = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"checkpoint {name}: cannot read it ({type(err).__name__}: {err})") from err
        key = type(self).__qualname__
        if not isinstance(loaded, dict) or key not in loaded:
            raise ValueError(f"checkpoint {name} holds no {key} state (it was not written by a fit with this data "
                             "module); nothing to continue from")
        self.load_state_dict(loaded[key])

    def embedding_row_sources(self) -> dict[str, tuple[int, np.ndarray]]:
        """How the vocabularies grew since the restored state: ``{feature: (ids before, sources)}``.

        ``sources[j]`` is the id the value of new id ``j`` had in the restored
        state, or ``-1`` (a new value: its embedding row starts afresh).
        ``MultiTaskLightningModule`` reads this when it loads the checkpoint
        the state came from, to grow its tables the same way. Empty unless
        ``grow_vocabulary`` grew something.
        """
        return {name: (before, rows) for name, (before, rows) in self._row_sources.items()
                if len(rows) != before or not np.array_equal(rows, np.arange(before))}

    # ---------------------------------------------------------------- group
    def _id_columns(self) -> dict[str, str]:
        """``{batch slot: column}`` of the group and scenario columns that are given."""
        return {slot: column for slot, column in (("group", self.group), ("scenario", self.scenario)) if column}

    def _carried_keys(self) -> list[str]:
        """``keys`` plus the group and scenario columns (read like keys, moved to ``batch["group"]`` and
        ``batch["scenario"]`` by ``on_before_batch_transfer``)."""
        extra = [c for c in dict.fromkeys(self._id_columns().values()) if c not in self.keys]
        return self.keys + extra

    def _check_id_columns(self, path: DataFile, schema: pa.Schema) -> None:
        for slot, column in self._id_columns().items():
            if column not in schema.names:
                raise ValueError(f"{path}: missing {slot} column {column!r} (columns: {schema.names})")
            check_unique(schema, [column], path)
            if not pa.types.is_integer(schema.field(column).type):
                what = "user ids" if slot == "group" else "scenario ids; encode the scenarios as integers first"
                raise ValueError(f"{path}: {slot} column {column!r} has type {schema.field(column).type}; "
                                 f"it must hold integer ids ({what})")

    # ---------------------------------------------------------------- files
    def _split_tasks(self, split: str, names: Sequence[Sequence[str]]) -> list[Task]:
        """The tasks read in ``split``: all, but in the predict split only those whose label every file (``names``) has."""
        if split != "predict":
            return list(self.tasks)
        return [t for t in self.tasks if all(t.label in columns for columns in names)]

    def _check_files(self) -> None:
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

    def _converter(self, split: str, tasks: Sequence[Task]) -> TableConverter:
        """The checks and conversion of the split's tables (streaming reads, footer checks)."""
        return TableConverter(self.features, tasks, self.row_id, self._carried_keys(), self.encoders, self.normalizers,
                              implied_labels=self.implied_labels if split != "predict" else None,
                              ignore_label=self.ignore_label, fillers=self.fillers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        columns = self._id_columns()
        if columns and isinstance(batch, dict) and "keys" in batch:
            keys = batch["keys"]
            for slot, column in columns.items():
                batch[slot] = keys[column]
            for column in set(columns.values()) - set(self.keys):  # carried for the slots only
                keys.pop(column)
            if not keys:
                del batch["keys"]
        return batch

    def setup(self, stage: str | None = None) -> None:
        self.prepare_features()
        self._check_files()
        if not self.preprocessing_fitted() or self.streaming:
            # streams are opened by dataset(); unfitted encoders wait for load_state_dict (a checkpoint)
            return
        wanted = {
            "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",), None: SPLITS
        }[stage]
        for split in wanted:
            if self.paths[split] is not None and split not in self.stores:
                bar = self._progress_bar(split, "reading the")
                try:
                    self.stores[split] = read_split(
                        self.files(split), self.features, self.tasks, self.row_id, labels_required=split != "predict",
                        keys=self._carried_keys(), implied_labels=self.implied_labels, encoders=self.encoders,
                        normalizers=self.normalizers, ignore_label=self.ignore_label, fillers=self.fillers,
                        progress=bar.update if bar is not None else None,
                    )
                finally:
                    if bar is not None:
                        bar.close()

    def dataset(
        self, split: str, rank: int | None = None, world_size: int | None = None
    ) -> ParquetBatches | ParquetStream:
        """The batch stream of a split (``rank``/``world_size`` default to the DDP process group)."""
        if self.streaming:
            return self._stream(split, rank, world_size)
        if split not in self.stores:
            if self.paths.get(split) is None:
                raise ValueError(f"no {split} data was given to ParquetDataModule")
            self.prepare_features()
            self._require_fitted(split)
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        train = split == "train"
        return ParquetBatches(
            self.stores[split], self.batch_size, shuffle=train and self.shuffle, seed=self.seed,
            drop_last=train and self.drop_last, pad_to_equal=train, rank=rank, world_size=world_size,
        )

    def _stream(self, split: str, rank: int | None, world_size: int | None) -> ParquetStream:
        if self.paths.get(split) is None:
            raise ValueError(f"no {split} data was given to ParquetDataModule")
        self.prepare_features()
        self._require_fitted(split)
        self._check_files()
        files = self.files(split)
        # labels are optional in the predict split: use those every file has
        tasks = self._split_tasks(split, [read_schema(file).names for file in files] if split == "predict" else [])
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

    def _epoch(self) -> int:
        """The training epoch the train loader's next pass serves.

        Lightning's own sampler epoch, the number of training epochs already run; unlike
        ``trainer.current_epoch`` it is right when resuming from a checkpoint written at the end
        of an epoch (by ModelCheckpoint, before the epoch counts as completed).
        """
        return self.trainer.fit_loop.epoch_progress.current.processed

    def _loader(self, split: str) -> DataLoader:
        # The train loader's position is saved in checkpoints and restored: see datamodules.batches.
        return EpochDataLoader(
            self.dataset(split), epoch_fn=self._epoch if self.trainer is not None else None,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        # no val split: an empty list tells Lightning to skip validation
        return self._loader("val") if self.paths["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
