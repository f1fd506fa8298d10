"""Callbacks for training and inference with ``MultiTaskLightningModule``.

``ParquetPredictionWriter`` is Lightning's ``BasePredictionWriter`` writing
``trainer.predict`` output batch by batch to one Parquet file per process, so
predictions of a split larger than memory never pile up (call
``trainer.predict(..., return_predictions=False)``). Under DDP every rank
writes its own file; together the files hold every row of the predict split
exactly once (the Parquet data module shards the predict split without
repetition).
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

# The writer reads row ids from the batch, not from sampler indices, which an IterableDataset does not have.
warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices fetched from your dataloader.*")


class ParquetPredictionWriter(BasePredictionWriter):
    """Writes ``<output_dir>/<prefix>-rank<R>.parquet`` (``-dataloader<D>`` appended for extra dataloaders).

    Columns: ``row_id`` (when the batch has one), every key column the data
    module carries in ``batch["keys"]`` (``ParquetDataModule(keys=[...])``),
    then one column per task with what ``predict_step`` returned for it
    (probabilities for binary tasks, values for regression). A file is
    rewritten from scratch by every ``trainer.predict`` call; a rank whose
    shard of the predict split is empty (a split smaller than the world size)
    gets one batch of 0 rows from ``ParquetDataModule`` and writes a file of 0 rows.
    """

    def __init__(self, output_dir: str | Path, prefix: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self._writers: dict[int, pq.ParquetWriter] = {}
        self.paths: list[Path] = []

    def path(self, rank: int, dataloader_idx: int = 0) -> Path:
        suffix = f"-dataloader{dataloader_idx}" if dataloader_idx else ""
        return self.output_dir / f"{self.prefix}-rank{rank:05d}{suffix}.parquet"

    @staticmethod
    def _table(prediction: Mapping[str, Any], batch: Any) -> pa.Table:
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"ParquetPredictionWriter needs predict_step to return a dict of tensors, got {type(prediction).__name__}"
            )
        columns: dict[str, Any] = {}

        def add(name: str, value: Tensor) -> None:
            array = value.detach().cpu().numpy()
            if array.ndim != 1:
                raise ValueError(f"ParquetPredictionWriter writes one value per row; {name!r} has shape {tuple(value.shape)}")
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
                add(name, value)
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
        writer = self._writers.get(dataloader_idx)
        if writer is None:
            path = self.path(trainer.global_rank, dataloader_idx)
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self._writers[dataloader_idx] = pq.ParquetWriter(path, table.schema)
            self.paths.append(path)
        writer.write_table(table)

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self.paths = []

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()
