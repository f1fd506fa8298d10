"""Streaming Parquet batches for splits larger than memory (``ParquetDataModule(streaming=True)``).

Nothing is read up front but the files' footers: the split is a list of row
groups (``RowGroup``) with their row counts, so the total row count ``N`` and
every rank's share are known without touching the data.

One epoch, for rank ``r`` of ``W`` and DataLoader worker ``k`` of ``K``:

1. **Order of row groups.** Training shuffles the row groups with seed
   ``(seed, epoch)`` -- the same permutation on every rank and worker;
   evaluation keeps file order. Laid end to end they give positions ``0..N-1``.
2. **Rank share.** Rank ``r`` takes the contiguous positions
   ``[r*R, (r+1)*R)``. Training uses ``R = ceil(N/W)`` on every rank and wraps
   past ``N`` to the start, so when ``N`` is not a multiple of ``W`` fewer than
   ``W`` rows are seen twice in that epoch (as ``DistributedSampler`` pads) and
   every rank runs exactly ``ceil(R/batch_size)`` steps -- uneven files or row
   groups can never make one rank wait for another. Evaluation and prediction
   splits cut ``[0, N)`` into blocks that differ by at most one row, with no
   repetition: every row exactly once. A rank left without a row (a split
   smaller than the world size) yields one batch of 0 rows, as in memory
   (see ``datamodules.batches``).
3. **Worker share.** The rank's ``nb`` batches (``ceil(R/B)``, or ``floor`` with
   ``drop_last``, which drops the last ``R mod B`` rows of each rank) are cut
   into ``K`` contiguous runs of whole batches; worker ``k`` reads the rows of
   its run, so every batch but the rank's last is full and the workers together
   yield exactly ``nb`` batches.
4. **Shuffle buffer.** A worker reads its rows in chunks of at most
   ``read_rows`` (only the needed columns), checks and converts each chunk to
   tensors, and appends it to a buffer. When the buffer holds
   ``shuffle_buffer`` rows it is permuted (seed ``(seed, epoch, rank, worker)``)
   and whole batches are taken out until about half of it is left; the rest is
   mixed with the next chunks. At the end the remainder is permuted and
   emitted. Memory is bounded by ``shuffle_buffer + read_rows`` rows per
   worker, whatever the size of the split.

The order is a pure function of ``(seed, epoch, world_size, num_workers,
batch_size, shuffle_buffer, read_rows)`` and the files, so resuming a run at
epoch ``e`` replays epoch ``e``'s order exactly.

Files are data that must hold still: each file's size, modification time
(local files) and footer are recorded when the row groups are listed
(``RowGroup.signature``) and compared before every row group is read; a file
rewritten or replaced under a running stream is refused with a ``ValueError``
naming it, instead of being read in part.

Resuming mid-epoch (see ``datamodules.batches``): a worker's saved state is
the epoch and the number ``n`` of batches it had yielded. With shuffling, the
shuffle buffer is not saved but replayed: the worker reads, converts and
permutes its rows as in the interrupted pass and skips the gathers of its
first ``n`` batches, so it goes on with exactly the batches that pass would
have yielded next. The cost is reading the worker's rows up to the position
(about ``n * batch_size`` rows, plus up to ``shuffle_buffer``), without
building or training on them. Without shuffling the worker seeks straight to
its ``n``-th batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mtl_lightning.batch import Batch

from .batches import EpochIterable, _worker
from .files import ParquetReader, open_file
from .paths import DataFile, Partition, as_data_file
from .storage import Storage
from .store import ColumnStore, TableConverter



@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: its file, index in the file, first row's position in the split, size and partitions."""

    path: Path | str  # a URI for a remote file
    index: int
    first_row: int
    num_rows: int
    partitions: tuple[Partition, ...] = ()  # the file's Hive partition values (``DataFile.partitions``)
    storage: Storage | None = None  # where a remote file is read from (``DataFile.storage``)
    signature: tuple | None = None  # the file's version when listed (``ParquetReader.signature``), checked on reads

    @property
    def file(self) -> DataFile:
        return DataFile(self.path, self.partitions, self.storage)


def list_row_groups(files: Sequence[DataFile | Path]) -> list[RowGroup]:
    """The row groups of ``files`` in file order, from the footers only."""
    groups: list[RowGroup] = []
    offset = 0
    for file in map(as_data_file, files):
        with open_file(file) as reader:
            metadata = reader.metadata
            signature = reader.signature()
        if metadata.num_rows == 0:
            raise ValueError(f"{file}: file is empty (0 rows)")
        for index in range(metadata.num_row_groups):
            size = metadata.row_group(index).num_rows
            if size:
                groups.append(RowGroup(file.path, index, offset, size, file.partitions, file.storage, signature))
                offset += size
    return groups


def check_unchanged(group: RowGroup, reader: ParquetReader) -> None:
    """Refuse to read ``group`` from a file that is not the version its split listed (rewritten or replaced since)."""
    if group.signature is None:
        return
    now = reader.signature()
    if now != group.signature:
        raise ValueError(
            f"{group.path}: the file changed while this run reads it (listed with size, modification time and footer "
            f"{group.signature}, now {now}); reading it on would mix two versions of the data. Write new data to new "
            "files (a new partition) and leave the files of a running split as they are, then start the run again"
        )


class ParquetStream(EpochIterable):
    """Batches of a split streamed from its row groups; see the module docstring for order and sharding."""

    def __init__(
        self,
        row_groups: Sequence[RowGroup],
        convert: TableConverter,
        batch_size: int,
        shuffle: bool = False,
        shuffle_buffer: int = 65_536,
        seed: int = 0,
        drop_last: bool = False,
        pad_to_equal: bool = False,
        rank: int = 0,
        world_size: int = 1,
        read_rows: int = 65_536,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if read_rows < 1:
            raise ValueError(f"read_rows must be >= 1, got {read_rows}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.row_groups = list(row_groups)
        if not self.row_groups:
            raise ValueError("ParquetStream needs at least one non-empty row group")
        self.convert = convert
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.pad_to_equal = pad_to_equal
        self.rank = rank
        self.world_size = world_size
        self.read_rows = read_rows
        self.num_rows = sum(g.num_rows for g in self.row_groups)

    def order_key(self) -> dict[str, Any]:
        return {"rows": self.num_rows, "row_groups": len(self.row_groups), "world_size": self.world_size,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "read_rows": self.read_rows, "seed": self.seed, "drop_last": self.drop_last,
                "pad_to_equal": self.pad_to_equal}

    # ----------------------------------------------------------- sharding
    def rank_bounds(self) -> tuple[int, int]:
        """``(start, stop)`` positions of this rank's share (``stop`` may exceed ``N``: it wraps)."""
        n, r, w = self.num_rows, self.rank, self.world_size
        if self.pad_to_equal:
            per = math.ceil(n / w)
            return r * per, (r + 1) * per
        return r * n // w, (r + 1) * n // w

    def _num_batches(self) -> int:
        start, stop = self.rank_bounds()
        rows = stop - start
        if rows == 0 and not self.pad_to_equal:  # an empty evaluation shard: one batch of 0 rows
            return 1
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def __len__(self) -> int:
        return self._num_batches()

    def worker_bounds(self, worker: int, workers: int) -> tuple[int, int]:
        """``(start, stop)`` positions read by ``worker``: a contiguous run of whole batches of the rank's share."""
        start, stop = self.rank_bounds()
        batches = self._num_batches()
        first, last = worker * batches // workers, (worker + 1) * batches // workers
        return start + first * self.batch_size, min(start + last * self.batch_size, stop)

    def epoch_order(self) -> list[RowGroup]:
        if not self.shuffle:
            return self.row_groups
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.row_groups))
        return [self.row_groups[i] for i in permutation]

    def segments(self, start: int, stop: int) -> Iterator[tuple[RowGroup, int, int]]:
        """``(row_group, lo, hi)`` slices (within the row group) covering positions ``[start, stop)`` of this epoch."""
        order = self.epoch_order()
        starts = np.cumsum([0] + [g.num_rows for g in order])
        position = start
        while position < stop:
            wrapped = position % self.num_rows
            j = int(np.searchsorted(starts, wrapped, side="right")) - 1
            lo = wrapped - int(starts[j])
            hi = min(order[j].num_rows, lo + (stop - position))
            yield order[j], lo, hi
            position += hi - lo

    # ------------------------------------------------------------- reading
    def _chunks(self, start: int, stop: int) -> Iterator[ColumnStore]:
        wanted = self.convert.columns
        parquet, path, slots = None, None, None
        for group, lo, hi in self.segments(start, stop):
            if group.path != path:  # one open file at a time: a reader keeps buffers of what it read
                if parquet is not None:
                    parquet.close()
                parquet, path = open_file(group.file), group.path  # errors name the file (and column)
            check_unchanged(group, parquet)  # before every row group: the file is still the one listed
            names = set(parquet.schema.names)  # with the partition columns
            columns = [c for c in wanted if c in names]  # a missing column is reported by the converter
            offset = 0
            for record_batch in parquet.iter_batches(self.read_rows, columns, row_groups=[group.index]):
                size = record_batch.num_rows
                a, b = max(lo - offset, 0), min(hi - offset, size)
                if a < b:
                    table = record_batch.slice(a, b - a)
                    chunk = self.convert(table, group.path, group.first_row + offset + a)
                    if slots is None:
                        slots = chunk.slots
                    elif chunk.slots != slots:  # a key column read as integers in one file, floats in another
                        changed = sorted({(s.name, s.dtype) for s in set(chunk.slots) - set(slots)})
                        raise ValueError(f"{group.path}: column types {changed} differ from the files read before "
                                         "it; a key column must have one type, integer or float, in every file")
                    yield chunk
                offset += size
                if offset >= hi:
                    break
        if parquet is not None:
            parquet.close()

    def _empty_batch(self) -> Batch:
        """A batch of 0 rows with the split's columns: what a rank without a row of an evaluation split yields."""
        first = self.row_groups[0]
        with open_file(first.file) as reader:
            return ColumnStore(self.convert.slots(reader.schema, first.path), 0).batch(slice(0, 0))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        start, stop = self.worker_bounds(worker, workers)
        skip = self._resume_position()  # batches of this pass already yielded (a restored position)
        size, step = 0, self.batch_size
        if not self.shuffle:  # batch j is positions [start + j*step, start + (j+1)*step): seek
            start, skip = min(start + skip * step, stop), 0
        if start >= stop:
            batches = self._num_batches()
            if worker * batches // workers < (worker + 1) * batches // workers and not skip:  # an empty shard's batch
                batch = self._empty_batch()
                self._yielded += 1
                yield batch
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        capacity = max(self.shuffle_buffer, step) if self.shuffle else step
        pending: list[ColumnStore] = []
        made = 0  # batches this pass has produced, skipped ones included
        for chunk in self._chunks(start, stop):
            pending.append(chunk)
            size += chunk.num_rows
            if size < capacity:
                continue
            buffer = ColumnStore.concat(pending)
            keep = capacity // 2 if self.shuffle else 0
            out = (size - keep) // step * step
            order = torch.from_numpy(rng.permutation(size)) if self.shuffle else torch.arange(size)
            # gathers: compact batches, never views of the buffer; a replay skips those of yielded batches
            for lo in range(max(skip - made, 0) * step, out, step):
                batch = buffer.batch(order[lo:lo + step])
                self._yielded += 1
                yield batch
            made += out // step
            pending = [buffer.take(order[out:])]
            size -= out
        if size:
            buffer = ColumnStore.concat(pending)
            order = torch.from_numpy(rng.permutation(size)) if self.shuffle else torch.arange(size)
            for lo in range(max(skip - made, 0) * step, size, step):
                batch = buffer.batch(order[lo:lo + step])
                self._yielded += 1
                yield batch
