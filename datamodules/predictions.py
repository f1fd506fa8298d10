"""``ParquetPredictionWriter``: ``trainer.predict`` output to Parquet files, one per process.

Lightning's ``BasePredictionWriter`` writing the predictions batch by batch
to one Parquet file per process, so predictions of a split larger than memory
never pile up (call ``trainer.predict(..., return_predictions=False)``).
Under DDP every rank writes its own file; together the files hold every row
of the predict split exactly once (the Parquet data module shards the predict
split without repetition).

``output_dir`` may be a URI (``s3://bucket/predictions/day=2026-11-02``,
``gs://``, ``hdfs://``...): the files are written through the same
filesystems as ``ParquetDataModule`` reads (fsspec with ``storage_options=``,
or a ``pyarrow.fs.FileSystem`` given as ``filesystem=``); an object store
receives each file when it is closed, at the end of ``trainer.predict``.

It lives beside the Parquet reader (``datamodules``), which it shares the
storage layer with; ``mtl_lightning.callbacks.ParquetPredictionWriter`` still
names it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from .storage import Storage, local_path, uri_scheme

# The writer reads row ids from the batch, not from sampler indices, which an IterableDataset does not have.
warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices fetched from your dataloader.*")


def check_prefix(prefix: Any) -> str:
    """``prefix`` if it is a plain file name prefix; a ``ValueError`` if it would put the files in another folder."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"ParquetPredictionWriter: prefix must be a non-empty file name prefix, got {prefix!r}")
    if "/" in prefix or "\\" in prefix or "\0" in prefix or prefix in (".", ".."):
        raise ValueError(f"ParquetPredictionWriter: prefix {prefix!r} names a folder; the files would be written "
                         "outside output_dir. Give a plain name (e.g. 'scores') and put the folder in output_dir")
    return prefix


class ParquetPredictionWriter(BasePredictionWriter):
    """Writes ``<output_dir>/<prefix>-rank<R>.parquet`` (``-dataloader<D>`` appended for extra dataloaders).

    Columns: ``row_id`` (when the batch has one), every key column the data
    module carries in ``batch["keys"]`` (``ParquetDataModule(keys=[...])``),
    then one column per task with what ``predict_step`` returned for it
    (probabilities for binary tasks, values for regression). A multi-class
    task of ``K`` classes is one column too, of type ``fixed_size_list<float>[K]``:
    each row holds the ``K`` class probabilities, ``column[c]`` the probability of
    class ``c`` (pandas reads it as one array per row;
    ``np.stack(frame["genre"])`` is the ``(rows, K)`` matrix). A file is
    rewritten from scratch by every ``trainer.predict`` call; a rank whose
    shard of the predict split is empty (a split smaller than the world size)
    gets one batch of 0 rows from ``ParquetDataModule`` and writes a file of 0 rows.

    ``prefix`` is a file name prefix: one that names a folder (``"../.."``,
    ``"sub/scores"``) would write outside ``output_dir`` and is refused
    with a ``ValueError``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        prefix: str = "predictions",
        storage_options: Mapping[str, Any] | None = None,
        filesystem: Any = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.prefix = check_prefix(prefix)
        self._storage = Storage(str(output_dir), storage_options, filesystem) if uri_scheme(output_dir) else None
        self.output_dir: Path | str = str(output_dir).rstrip("/") if self._storage else Path(local_path(str(output_dir)))
        self._writers: dict[int, tuple[pq.ParquetWriter, Any]] = {}
        self.paths: list[Path | str] = []

    def path(self, rank: int, dataloader_idx: int = 0) -> Path | str:
        """The file of ``rank`` (a URI when ``output_dir`` is one)."""
        suffix = f"-dataloader{dataloader_idx}" if dataloader_idx else ""
        name = f"{self.prefix}-rank{rank:05d}{suffix}.parquet"
        return f"{self.output_dir}/{name}" if self._storage else Path(self.output_dir) / name

    @staticmethod
    def _table(prediction: Mapping[str, Any], batch: Any) -> pa.Table:
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"ParquetPredictionWriter needs predict_step to return a dict of tensors, got {type(prediction).__name__}"
            )
        columns: dict[str, Any] = {}

        def add(name: str, value: Tensor, per_row: bool = False) -> None:
            array = value.detach().cpu().numpy()
            if per_row and array.ndim == 2:  # K numbers per row (a multi-class task's probabilities)
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
                return
            if array.ndim != 1:
                raise ValueError(f"ParquetPredictionWriter writes one value per row (or, for an output, one row of "
                                 f"K values); {name!r} has shape {tuple(value.shape)}")
            columns[name] = array

        if "row_id" in prediction:
            add("row_id", prediction["row_id"])
        elif isinstance(batch, Mapping) and "row_id" in batch:
            add("row_id", batch["row_id"])
        if isinstance(batch, Mapping):
            for name, value in (batch.get("keys") or {}).items():
                add(name, value)
        for name, value in prediction.items():
            if name != "row_id":
                add(name, value, per_row=True)
        return pa.table(columns)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        table = self._table(prediction, batch)
        if dataloader_idx not in self._writers:
            path = self.path(trainer.global_rank, dataloader_idx)
            if self._storage is not None:
                sink = self._storage.open_output(str(path))
                self._writers[dataloader_idx] = (pq.ParquetWriter(sink, table.schema), sink)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._writers[dataloader_idx] = (pq.ParquetWriter(path, table.schema), None)
            self.paths.append(path)
        self._writers[dataloader_idx][0].write_table(table)

    def _close(self) -> None:
        for writer, sink in self._writers.values():
            writer.close()
            if sink is not None:
                sink.close()  # an object store receives the file now
        self._writers = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self.paths = []

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()
