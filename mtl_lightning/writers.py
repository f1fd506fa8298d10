"""``ParquetPredictionWriter``: ``trainer.predict`` / ``mtl-lightning predict`` results to Parquet.

Each rank writes one file with a ``row_id`` column (when the batches carry
one) and one column per task (probabilities for binary tasks, values for
regression tasks): ``<output_dir>/predictions.parquet`` on a single process,
``predictions-rank<r>.parquet`` under DDP (ranks hold disjoint rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class ParquetPredictionWriter(BasePredictionWriter):
    """Collects the per-task predictions of every batch and writes them when prediction ends."""

    def __init__(self, output_dir: str | Path = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._parts: list[dict[str, torch.Tensor]] = []
        self.path: Path | None = None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = []

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
        self._parts.append({k: v.detach().cpu() for k, v in prediction.items()})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._parts:
            return
        columns = {name: torch.cat([p[name] for p in self._parts]).numpy() for name in self._parts[0]}
        ordered = (["row_id"] if "row_id" in columns else []) + [n for n in columns if n != "row_id"]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.parquet" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.parquet"
        self.path = self.output_dir / name
        pq.write_table(pa.table({n: columns[n] for n in ordered}), self.path)
        self._parts = []
