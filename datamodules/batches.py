"""In-memory batching: whole batches of a ``ColumnStore`` for one rank and worker (``ParquetBatches``).

Order and sharding:

* train: every epoch a new permutation of all rows, seeded by ``seed + epoch``
  (the same on every rank), so resuming at epoch ``e`` reproduces epoch ``e``'s
  order; val/test/predict keep file order.
* under DDP (``torch.distributed`` initialised) rank ``r`` of ``W`` takes the
  ``r``-th contiguous block of the (permuted) row order. Evaluation and
  prediction splits are cut into blocks whose sizes differ by at most one row:
  every row exactly once. For training every rank must run the same number of
  steps, so when ``N`` is not a multiple of ``W`` the order is padded with its
  first ``W*ceil(N/W) - N`` rows (fewer than ``W`` rows seen twice in that
  epoch, different ones every epoch, as ``DistributedSampler`` does).
* with ``num_workers > 0`` each worker yields every ``num_workers``-th batch
  of its rank's block, so the batches are the same as with no workers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .store import ColumnStore

# Each worker yields exactly its share of len() batches (see ParquetBatches.__iter__),
# so Lightning's generic warning about IterableDataset lengths does not apply.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has .__len__. defined.*")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ParquetBatches(IterableDataset):
    """Yields whole batches of one split for one rank (and worker); see the module docstring."""

    def __init__(
        self,
        store: ColumnStore,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pad_to_equal: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store = store
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad_to_equal = pad_to_equal
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        rank, world = _distributed()
        return (self.rank if self.rank is not None else rank, self.world_size if self.world_size is not None else world)

    def shard_bounds(self) -> tuple[int, int, int]:
        """``(start, stop, padded_total)`` of this rank's block in the (possibly padded) row order."""
        rank, world = self._rank_world()
        n = self.store.num_rows
        if self.pad_to_equal:
            per = math.ceil(n / world)
            return rank * per, (rank + 1) * per, per * world
        return rank * n // world, (rank + 1) * n // world, n

    def _num_batches(self) -> int:
        start, stop, _ = self.shard_bounds()
        size = stop - start
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def __len__(self) -> int:
        return self._num_batches()

    def order(self) -> Tensor | None:
        """This epoch's row order (``None`` means file order, served as zero-copy slices)."""
        start, stop, total = self.shard_bounds()
        n = self.store.num_rows
        if not self.shuffle and total == n:
            return None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if total > n:
            order = torch.cat([order, order[: total - n]])
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, stop, _ = self.shard_bounds()
        order = self.order()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, self._num_batches(), workers):
            lo = start + i * self.batch_size
            hi = min(lo + self.batch_size, stop)
            yield self.store.batch(slice(lo, hi) if order is None else order[lo:hi])


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` that tells its ``ParquetBatches`` the current epoch before each pass."""

    def __init__(self, dataset: ParquetBatches, epoch_fn: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0

    def __iter__(self):  # type: ignore[override]
        self.dataset.set_epoch(self.epoch_fn() if self.epoch_fn is not None else self._passes)
        self._passes += 1
        return super().__iter__()
