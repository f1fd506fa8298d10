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
* an evaluation or prediction split smaller than the world size leaves some
  ranks no row; such a rank yields one batch of 0 rows, so that every rank
  runs the loop and its collectives (Lightning skips the loop, epoch-end hooks
  included, of a rank whose loader has no batch; a metric's sync and DDP's
  buffer broadcast before a rank's first evaluation forward then wait forever).
* with ``num_workers > 0`` each worker yields every ``num_workers``-th batch
  of its rank's block, so the batches are the same as with no workers.

Resuming mid-epoch: ``ParquetBatches`` and ``streaming.ParquetStream`` are
``EpochIterable``: their state (``state_dict()``, torchdata's ``Stateful``
protocol) is the epoch and the number of batches the worker has yielded in it,
and ``load_state_dict()`` makes the next pass skip those batches (in memory at
no cost; streaming replays its shuffle buffer, see there). ``EpochDataLoader``
is torchdata's ``StatefulDataLoader``, which keeps that state per worker as of
the batch it last handed out (batches the workers prefetched are not counted).
Lightning saves the train loader's ``state_dict()`` in every checkpoint and
restores it on ``trainer.fit(..., ckpt_path=...)``. Every rank runs the same
number of batches per worker, so the positions saved by rank 0 (the one that
writes checkpoints) are every rank's.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from mtl_lightning.batch import Batch

from .store import ColumnStore

# Each worker yields exactly its share of len() batches (see ParquetBatches.__iter__),
# so Lightning's generic warning about IterableDataset lengths does not apply.
warnings.filterwarnings("ignore", message=r".*IterableDataset.*has .__len__. defined.*")
# StatefulDataLoader.__init__ calls torch.set_vital, which recent torch versions deprecate: nothing to act on.
warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated.*")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the DataLoader worker running this code (``(0, 1)`` in the main process)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EpochIterable(IterableDataset, ABC):
    """Batches whose order is a pure function of the settings, the epoch, the rank and the worker.

    The state is ``{"epoch": e, "batches": n}``: this worker has yielded ``n``
    batches of epoch ``e``. After ``load_state_dict`` the next pass is epoch
    ``e`` without its first ``n`` batches (of this worker); ``set_epoch``
    starts an epoch from its first batch. Subclasses call ``_resume_position()``
    when a pass starts and ``_yielded += 1`` before yielding each batch.
    """

    epoch: int = 0
    _yielded: int = 0  # batches of this epoch this worker has yielded (restored ones included)
    _resume: int = 0  # batches the next pass skips

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._yielded = self._resume = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch = int(state_dict["epoch"])
        self._yielded = self._resume = int(state_dict["batches"])

    def _resume_position(self) -> int:
        """The batches this pass skips (a restored position), from which the count of yielded batches goes on."""
        skip, self._resume = self._resume, 0
        self._yielded = skip
        return skip

    @abstractmethod
    def order_key(self) -> dict[str, Any]:
        """What the order depends on besides epoch, rank and worker: a position is only valid under the same."""


class ParquetBatches(EpochIterable):
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

    def order_key(self) -> dict[str, Any]:
        return {"rows": self.store.num_rows, "world_size": self._rank_world()[1], "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "drop_last": self.drop_last, "pad_to_equal": self.pad_to_equal}

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
        if size == 0 and not self.pad_to_equal:  # an empty evaluation shard: one batch of 0 rows
            return 1
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

    def __iter__(self) -> Iterator[Batch]:
        start, stop, _ = self.shard_bounds()
        order = self.order()
        if order is not None and self.store.device.type != "cpu":  # drawn on the host, gathered on the device
            order = order.to(self.store.device)
        worker, workers = _worker()
        skip = self._resume_position()  # batches worker, worker + workers, ... of the rank's block
        for i in range(worker + skip * workers, self._num_batches(), workers):
            lo = start + i * self.batch_size
            hi = min(lo + self.batch_size, stop)
            batch = self.store.batch(slice(lo, hi) if order is None else order[lo:hi])
            self._yielded += 1
            yield batch


def keep_batch(batch: Any) -> Any:
    """``EpochDataLoader``'s default ``collate_fn``: its datasets yield whole batches, which need no collation (the
    DataLoader's own default, ``default_convert``, would rebuild every dict of every batch for nothing)."""
    return batch


class EpochDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` that tells its dataset the epoch before each pass and resumes mid-epoch.

    Lightning may build it again from its attributes (``trainer.predict`` with
    ``dataloaders=`` a loader the data module made for another split): the
    copy reads the same dataset.

    The epoch of a pass is ``epoch_fn()`` (the data module gives Lightning's
    epoch counter), or the number of passes so far, read when the pass yields
    its first batch. ``state_dict()`` is the epoch, the dataset's
    ``order_key()`` and the ``StatefulDataLoader``'s state (each worker's
    dataset state as of the last batch handed out). ``load_state_dict()``
    keeps it for the next pass, which restores it only if it is the same
    epoch: a checkpoint written at an epoch's end starts the next epoch from
    its first batch. Batches pass through as the dataset yields them
    (``collate_fn=keep_batch`` unless another is given).
    """

    def __init__(
        self, dataset: EpochIterable, epoch_fn: Callable[[], int] | None = None, batch_size: None = None, **kwargs: Any
    ) -> None:
        # batch_size is an argument (always None: the dataset yields whole batches) so that Lightning can build the
        # loader again from its attributes, as trainer.predict(dataloaders=dm.val_dataloader()) does
        if batch_size is not None:
            raise ValueError(f"EpochDataLoader takes batch_size=None (its dataset yields whole batches), got {batch_size}")
        kwargs.setdefault("collate_fn", keep_batch)
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0
        self._epoch = 0
        self._to_restore: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Lazy: resuming from a checkpoint written after an epoch's last batch, Lightning creates the pass
        # (FitLoop.setup_data) before it counts that epoch as done (FitLoop.reset), then takes batches.
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        saved, self._to_restore = self._to_restore, None
        if self.epoch_fn is not None:
            epoch = self.epoch_fn()
        else:  # no trainer: a restored position is the next pass
            epoch = int(saved["epoch"]) if saved is not None else self._passes
        self._passes, self._epoch = epoch + 1, epoch
        self.dataset.set_epoch(epoch)
        if saved is not None and int(saved["epoch"]) == epoch and saved["loader"]:
            self._check_resumable(saved)
            super().load_state_dict(saved["loader"])
        yield from super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        if self._to_restore is not None:  # restored, not yet iterated
            return dict(self._to_restore)
        return {
            "epoch": self._epoch, "num_workers": self.num_workers, "order": self.dataset.order_key(),
            # before the first pass there is no position (and asking torchdata for one would start the workers)
            "loader": super().state_dict() if self._iterator is not None else {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({})  # drops the current pass; the state is applied by the next one
        self._to_restore = dict(state_dict) if state_dict else None

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = {**self.dataset.order_key(), "num_workers": self.num_workers}
        then = {**saved["order"], "num_workers": saved["num_workers"]}
        changed = {k: (then.get(k), now.get(k)) for k in sorted(set(now) | set(then)) if then.get(k) != now.get(k)}
        if changed:
            raise ValueError(
                f"cannot resume epoch {saved['epoch']} in the middle: the checkpoint's position in its order is "
                f"only valid with the same data and settings, and these changed (checkpoint, now): {changed}; "
                "resume with the checkpoint's settings, or from a checkpoint written at the end of an epoch"
            )
