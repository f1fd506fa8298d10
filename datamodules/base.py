"""``MultiTaskDataModule``: the part of a data module that does not depend on the file format.

It owns the tasks, the feature specs, the preprocessing
(``datamodules.preprocessing``), the partition record
(``datamodules.partitions``), the data module's checkpoint state, the batch
slots of the group and scenario columns, and the loaders. A file format plugs
in by subclassing it and giving, for a split, its files and its rows as Arrow
tables:

* ``files(split)``: the split's files (``DataFile``; ``resolve_paths`` lists
  files, folders and globs) -- what the partition record names;
* ``read_tables(split, columns)``: ``(where, pyarrow.Table)`` chunks of the
  split's rows, in a fixed order, holding those of ``columns`` that the data
  has (``where`` names the file in error messages).

Everything else has a working default built on those two: fitting the
preprocessing on the train split, reading a split into memory
(``read_store``: tables checked and converted by ``store.TableConverter``,
batched by ``batches.ParquetBatches``), the checkpoint state. A format may
override ``infer`` (feature specs from the data; by default ``features=`` is
required), ``read_store`` / ``dataset`` (faster or streaming reads),
``check_splits`` (checks before any batch) and ``count_rows`` (progress
totals). ``ParquetDataModule`` (``datamodules.parquet``) is such a subclass.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import pyarrow as pa
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mtl_lightning.features import Feature, feature_from_config
from mtl_lightning.tasks import Task, check_tasks

from .batches import EpochIterable, ParquetBatches
from .feature_specs import apply_feature_overrides, check_feature_overrides
from .id_columns import carried_keys, check_id_columns, id_columns, move_id_columns
from .partitions import PartitionRecord, fit_is_ending, partition_keys
from .paths import DataFile
from .placement import BatchLoaders, check_device_resident
from .preprocessing import Preprocessing, preprocessing_part
from .serving import preprocessing_state as _preprocessing_file
from .storage import uri_scheme
from .store import ColumnStore, TableConverter

SPLITS = ("train", "val", "test", "predict")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",), None: SPLITS}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


def read_checkpoint(checkpoint: str | Path) -> Any:
    """A Lightning checkpoint file (a path or a URI through fsspec), read with ``torch.load(weights_only=True)``."""
    name = str(checkpoint)
    try:
        if uri_scheme(name) is not None:
            import fsspec

            with fsspec.open(name, "rb") as stream:
                return torch.load(stream, map_location="cpu", weights_only=True)
        return torch.load(name, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {name}: cannot read it ({type(err).__name__}: {err})") from err


class MultiTaskDataModule(BatchLoaders, L.LightningDataModule):
    """Splits of tabular data to multi-task batches, whatever their file format; see the module docstring.

    ``splits`` maps ``train``/``val``/``test``/``predict`` to what the
    subclass reads for each (``None``: no such split); the other arguments are
    those of ``ParquetDataModule``, which documents them.
    """

    def __init__(
        self,
        splits: Mapping[str, Any],
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
        read_rows: int = 65_536,
        categorical: Mapping[str, Mapping[str, Any] | None] | Sequence[str] | None = None,
        normalize: bool | Sequence[str] = False,
        keys: Sequence[str] = (),
        group: str | None = None,
        scenario: str | None = None,
        implied_labels: Mapping[str, str] | None = None,
        ignore_label: float | None = -1,
        labels: Sequence[str] = (),
        grow_vocabulary: bool = False,
        allow_retraining: bool = False,
        continue_from: str | Path | None = None,
        fill_missing: Mapping[str, float | str] | None = None,
        missing_indicator: bool | Sequence[str] = False,
        progress: bool = True,
        feature_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        device_resident: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.paths = {split: splits.get(split) for split in SPLITS}
        if all(v is None for v in self.paths.values()):
            raise ValueError(f"{type(self).__name__} needs at least one of train, val, test, predict")
        self.tasks = check_tasks(tasks)
        self.features: list[Feature] | None = (
            [feature_from_config(f) for f in features] if features is not None else None
        )
        self._given = frozenset(f.name for f in self.features or ())  # the user's own specs
        self.feature_overrides = check_feature_overrides(feature_overrides)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if read_rows < 1:
            raise ValueError(f"read_rows must be >= 1, got {read_rows}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.row_id = row_id
        self.embedding_dim = embedding_dim
        self.exclude = set(exclude)
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.device_resident = check_device_resident(device_resident, False, num_workers)  # see datamodules.placement
        self.read_rows = read_rows
        self.implied_labels = dict(implied_labels or {})
        self.ignore_label = ignore_label
        self.labels = list(labels)
        self.keys = list(keys)
        self.group = group
        self.scenario = scenario
        self.progress = progress
        self.grow_vocabulary = grow_vocabulary
        self.continue_from = continue_from  # loaded once, by the first prepare_features
        self.preprocessing = Preprocessing(categorical, normalize, fill_missing, missing_indicator, embedding_dim,
                                           name=type(self).__name__)
        self.partitions = PartitionRecord(allow_retraining)
        self._train_partitions: list[str] | None = None
        self.stores: dict[str, ColumnStore] = {}

    # ------------------------------------------------- what a format gives
    def files(self, split: str) -> list[DataFile]:
        """The data files of ``split`` (empty when the split is not given)."""
        raise TypeError(f"{type(self).__name__} must define files(split)")

    def read_tables(self, split: str, columns: Sequence[str], read_rows: int | None = None) -> Iterator[tuple[Any, pa.Table]]:
        """``(where, table)`` chunks of the split's rows in a fixed order, with those of ``columns`` the data has."""
        raise TypeError(f"{type(self).__name__} must define read_tables(split, columns, read_rows)")

    def infer(self) -> list[Feature]:
        """Feature specs inferred from the data; this base class infers nothing, so ``features=`` is required."""
        raise ValueError(f"{type(self).__name__} cannot infer feature specs from the data; give features=[...]")

    def count_rows(self, split: str) -> int | None:
        """The rows of ``split`` if known without reading it (progress totals); ``None`` by default."""
        return None

    def check_splits(self) -> None:
        """Checks of every given split before any batch is read; nothing by default (``read_tables`` checks as it reads)."""

    # ---------------------------------------------- settings as properties
    @property
    def allow_retraining(self) -> bool:
        return self.partitions.allow_retraining

    @property
    def encoders(self) -> dict:
        return self.preprocessing.encoders

    @property
    def normalizers(self) -> dict:
        return self.preprocessing.normalizers

    @property
    def fillers(self) -> dict:
        return self.preprocessing.fillers

    @property
    def categorical(self) -> dict[str, dict[str, Any]]:
        return self.preprocessing.categorical

    @property
    def normalize(self) -> bool | list[str]:
        return self.preprocessing.normalize

    def _not_features(self) -> set[str]:
        """Columns that are never inferred as features: labels, row id, keys, excluded and encoded columns, fills."""
        names = {t.label for t in self.tasks} | ({self.row_id} if self.row_id else set()) | self.exclude
        names |= {t.sample_weight for t in self.tasks if t.sample_weight}
        names |= set(self.categorical) | set(self.keys) | set(self.labels)
        return names | {column for pair in self.implied_labels.items() for column in pair}

    def _progress_bar(self, split: str, what: str) -> Any:
        """A tqdm bar over the rows of ``split`` on rank 0 (``None`` elsewhere or with ``progress=False``)."""
        if not self.progress or rank_zero_only.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.count_rows(split), desc=f"{what} {split} split", unit=" rows", unit_scale=True,
                    leave=False, dynamic_ncols=True)

    # ------------------------------------------------------ preprocessing
    def preprocessing_fitted(self) -> bool:
        """Whether every categorical encoder, dense normaliser and filler has its mapping."""
        return self.preprocessing.fitted()

    def prepare_features(self) -> list[Feature]:
        """The feature specs: given or inferred, with the preprocessing fitted (or grown) on the train split."""
        if self.continue_from is not None:
            checkpoint, self.continue_from = self.continue_from, None
            self.load_checkpoint_state(checkpoint)
        if self.features is None:
            self.features = self.infer()
            rank_zero_info(f"{type(self).__name__} inferred features: " + ", ".join(
                f"{f.name} ({type(f).__name__}" + (", encoded)" if f.name in self.categorical else
                                                   f", vocab_size={f.vocab_size})" if hasattr(f, "vocab_size") else ")")
                for f in self.features))
        if self.preprocessing.active:
            has_train = self.paths["train"] is not None
            self.features, grew = self.preprocessing.prepare(
                self.features,
                (lambda columns: self.read_tables("train", columns, max(self.read_rows, 65_536))) if has_train else None,
                lambda: self._progress_bar("train", "fitting vocabularies/statistics on the"), given=self._given,
            )
            if grew:
                self._forget_reads()
        if self.feature_overrides and self.preprocessing.fitted():
            self.features = apply_feature_overrides(self.features, self.feature_overrides, self.categorical)
        return self.features

    def _forget_reads(self) -> None:
        """Drop what was read with another mapping (the in-memory stores; subclasses drop their checks too)."""
        self.stores.clear()

    def _require_fitted(self, split: str) -> None:
        if not self.preprocessing_fitted():
            raise ValueError(
                f"cannot read the {split} split: the encoders/statistics of {self.preprocessing.unfitted()} are not "
                "fitted; give train=... to fit them, or restore them from a checkpoint (trainer.predict/validate/"
                f"test(..., ckpt_path=...), or dm.load_checkpoint_state(path))"
            )

    def embedding_row_sources(self) -> dict[str, Any]:
        """How the vocabularies grew since the restored state: ``{feature: (ids before, sources)}``.

        ``sources[j]`` is the id the value of new id ``j`` had in the restored
        state, or ``-1`` (a new value: its embedding row starts afresh).
        ``MultiTaskLightningModule`` reads this when it loads the checkpoint
        the state came from, to grow its tables the same way. Empty unless
        ``grow_vocabulary`` grew something.
        """
        return self.preprocessing.embedding_row_sources()

    def preprocessing_state(self, features: Sequence[Feature] | None = None) -> dict[str, Any]:
        """The content of the preprocessing file an export writes for a model with ``features`` (default: this module's).

        ``datamodules.serving.preprocessing_state`` of this data module's
        fitted state: what ``mtl_lightning.export`` asks a data module for.
        """
        return self.preprocessing_file(features if features is not None else self.features or [], self.state_dict())

    @staticmethod
    def preprocessing_file(features: Sequence[Feature], state: Mapping[str, Any] | None) -> dict[str, Any]:
        """The preprocessing file's content from a data module ``state_dict()`` (e.g. a checkpoint's) and a model's features."""
        return _preprocessing_file(features, preprocessing_part(state))

    # ------------------------------------------------------- partitions
    def train_partitions(self) -> list[str]:
        """The partitions of the train split, sorted: each file's deepest ``key=value`` folder, else the file.

        E.g. ``s3://logs/impressions/day=2026-11-02`` for every file below that
        folder, however the split names it (the folder, a glob, the files, a
        relative path, a ``file://`` URI, a symbolic link); local paths are
        absolute. See ``datamodules.partitions``.
        """
        if self._train_partitions is None:
            self._train_partitions = partition_keys(self.files("train"))
        return self._train_partitions

    def teardown(self, stage: str) -> None:
        """At the end of a fit that completed (Lightning calls this only then): the train split counts as trained."""
        if stage == "fit" and self.paths["train"] is not None:
            self.partitions.complete_fit()

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Resolved feature specs, fitted encoders and normalisation statistics (plain data, saved in checkpoints).

        With a train split, also ``"partitions"``: ``{"trained": [...], "training": [...]}``,
        the partitions of completed fits (the checkpoint's earlier days, and
        this train split once its fit has completed or is at its last step)
        and those of a fit under way (see ``datamodules.partitions``).
        """
        state = self.preprocessing.state_dict(self.features)
        has_train = self.paths["train"] is not None
        record = self.partitions.state(self.train_partitions() if has_train else None,
                                       ending=has_train and fit_is_ending(self.trainer))
        if record is not None:
            state["partitions"] = record
        return state

    def same_preprocessing(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` (a checkpoint's) maps values as this data module does: the same encoders and statistics,
        or those it grew from (``grow_vocabulary``). The partition record is not compared."""
        theirs = preprocessing_part(state)
        return theirs == preprocessing_part(self.state_dict()) or self.preprocessing.is_grown_from(state)

    def adopt_checkpoint_state(self, state: Mapping[str, Any]) -> bool:
        """Take the state saved in the checkpoint a model was loaded from; ``True`` when it changed the mapping.

        The hook ``MultiTaskLightningModule`` calls at ``setup`` when it was built by
        ``load_from_checkpoint`` (``mtl_lightning.growth.hand_datamodule_state``):
        a state that maps values as this data module does (``same_preprocessing``)
        changes nothing; any other is loaded (``load_state_dict``).
        """
        if not state or self.same_preprocessing(state):
            return False
        self.load_state_dict(dict(state))
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's features, encoders and statistics; splits read with another mapping are re-read.

        With a train split, the checkpoint's partition record is adopted first
        (``datamodules.partitions``): during ``trainer.fit`` a train split
        holding a partition the checkpoint has trained on (its earlier days,
        or the partitions of a fit that ran to its end), or overlapping the
        partitions of an interrupted fit without being exactly those (resuming
        that fit), is refused with a ``ValueError`` naming them
        (``allow_retraining=True``: a warning); otherwise at the next
        ``setup("fit")``. With ``grow_vocabulary`` the restored vocabularies grow on
        the train split at the next ``setup``; a state this data module already
        grew from is not loaded again (Lightning restores it on
        ``fit(ckpt_path=...)``).
        """
        if not state_dict:
            return
        has_train = self.paths["train"] is not None
        resuming = self.partitions.adopt(state_dict.get("partitions"), self.train_partitions() if has_train else None)
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self.partitions.enforce()  # trainer.fit(..., ckpt_path=...): this fit is about to train the split
        preprocessing = preprocessing_part(state_dict)
        if self.preprocessing.is_grown_from(state_dict):
            return  # the state these vocabularies grew from: they include it
        if not preprocessing or preprocessing == preprocessing_part(self.state_dict()):
            return
        fitted_before = self.preprocessing_fitted()
        features = self.preprocessing.load_state_dict(preprocessing)
        if self.features is not None and fitted_before and features != self.features:
            warnings.warn("the checkpoint's feature specs differ from the data module's; using the checkpoint's")
        self.features = features
        self._forget_reads()
        if self.grow_vocabulary and not resuming and self.preprocessing.has_vocabularies():
            self.preprocessing.grow_from = dict(preprocessing)

    def load_checkpoint_state(self, checkpoint: str | Path) -> None:
        """Adopt the data module state saved in a Lightning checkpoint file (a path or a URI), before ``setup``.

        For incremental training: the previous day's vocabularies, statistics and
        partition record, so that ``setup`` grows the vocabularies on this train
        split (``grow_vocabulary=True``) and ``features`` has the grown sizes to
        build the model with. The file is read with ``torch.load(weights_only=True)``
        (a URI through fsspec, credentials from the environment as for Lightning's
        own checkpoint I/O).
        """
        loaded = read_checkpoint(checkpoint)
        key = type(self).__qualname__
        if not isinstance(loaded, dict) or key not in loaded:
            raise ValueError(f"checkpoint {checkpoint} holds no {key} state (it was not written by a fit with this "
                             "data module); nothing to continue from")
        self.load_state_dict(loaded[key])
        self.partitions.enforce()  # continuing from a checkpoint: the train split is to be trained next

    # --------------------------------------------------- group / scenario (datamodules.id_columns)
    def _id_columns(self) -> dict[str, str]:
        return id_columns(self.group, self.scenario)

    def _carried_keys(self) -> list[str]:
        """``keys`` plus the group and scenario columns (moved to their slots by ``on_before_batch_transfer``)."""
        return carried_keys(self.keys, self._id_columns())

    def _check_id_columns(self, path: Any, schema: pa.Schema) -> None:
        check_id_columns(path, schema, self._id_columns())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return move_id_columns(batch, self._id_columns(), self.keys)

    # ------------------------------------------------------------ reading
    def _split_tasks(self, split: str, names: Sequence[Sequence[str]]) -> list[Task]:
        """The tasks read in ``split``: all, but in the predict split only those whose label every file (``names``) has."""
        if split != "predict":
            return list(self.tasks)
        return [t for t in self.tasks if all(t.label in columns for columns in names)]

    def _converter(self, split: str, tasks: Sequence[Task]) -> TableConverter:
        """The checks and conversion of the split's tables."""
        return TableConverter(self.features, tasks, self.row_id, self._carried_keys(), self.encoders, self.normalizers,
                              implied_labels=self.implied_labels if split != "predict" else None,
                              ignore_label=self.ignore_label, fillers=self.fillers, sample_weights=split != "predict")

    def read_store(self, split: str, progress: Any = None) -> ColumnStore:
        """Every row of ``split`` checked and converted into one ``ColumnStore`` (from ``read_tables``).

        In the predict split the labels are those the first chunk has (every
        later chunk must have them too). ``progress(rows)`` is called after each chunk.
        """
        tables = self.read_tables(split, TableConverter(self.features, self.tasks, self.row_id, self._carried_keys(),
                                                        implied_labels=self.implied_labels).columns, self.read_rows)
        convert: TableConverter | None = None
        stores, at = [], 0
        for where, table in tables:
            self._check_id_columns(where, table.schema)
            if convert is None:
                convert = self._converter(split, self._split_tasks(split, [table.column_names]))
            stores.append(convert(table, where, at))
            at += table.num_rows
            if progress is not None:
                progress(table.num_rows)
        if not stores:
            raise ValueError(f"the {split} split holds no row")
        return ColumnStore.concat(stores)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            self.partitions.start_fit()
            self.partitions.enforce()
        self.prepare_features()
        self.check_splits()
        if self.preprocessing_fitted():  # unfitted encoders wait for load_state_dict (a checkpoint)
            self._read_stores(stage)

    def _read_stores(self, stage: str | None) -> None:
        """Read the splits of ``stage`` into memory (``read_store``), each once."""
        for split in STAGE_SPLITS[stage]:
            if self.paths[split] is not None and split not in self.stores:
                bar = self._progress_bar(split, "reading the")
                try:
                    self.stores[split] = self.read_store(split, progress=bar.update if bar is not None else None)
                finally:
                    if bar is not None:
                        bar.close()

    def dataset(self, split: str, rank: int | None = None, world_size: int | None = None) -> EpochIterable:
        """The batch stream of a split (``rank``/``world_size`` default to the DDP process group)."""
        if split not in self.stores:
            if self.paths.get(split) is None:
                raise ValueError(f"no {split} data was given to {type(self).__name__}")
            self.prepare_features()
            self._require_fitted(split)
            self.check_splits()
            self._read_stores(SPLIT_STAGE[split])
        train = split == "train"
        return ParquetBatches(
            self.batch_store(split), self.batch_size, shuffle=train and self.shuffle, seed=self.seed,
            drop_last=train and self.drop_last, pad_to_equal=train, rank=rank, world_size=world_size,
        )
