"""Deferred embedding tables: built without memory, initialised later row range by row range.

Inside :func:`deferred_tables` a ``FeatureEmbedding`` holds its table
weights as meta tensors and one seed; :func:`initial_rows` then gives any
rows of any table from that seed alone, so each process of a sharded run
(``TorchRecStrategy``) initialises only its own shards, with values that do
not depend on the sharding or the number of processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Iterator

import torch
from torch import Tensor

from ..features import SequenceFeature, SparseFeature

_DEFERRED = contextvars.ContextVar("mtl_lightning_deferred_tables", default=False)
INIT_CHUNK_ROWS = 65_536  # rows drawn per generator by initial_rows


@contextlib.contextmanager
def deferred_tables() -> Iterator[None]:
    """``FeatureEmbedding`` layers built inside allocate no tables (meta tensors) until ``materialize_tables()``.

    What ``TorchRecStrategy.tensor_init_context`` (``with
    trainer.init_module():``) uses, so that each process allocates and
    initialises only its own shards of the tables: see :func:`initial_rows`
    for the values they start from.
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def tables_deferred() -> bool:
    """Whether layers built now defer their tables (inside :func:`deferred_tables`)."""
    return _DEFERRED.get()


def initial_rows(table_seed: int, owner: SparseFeature | SequenceFeature, start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)`` of ``owner``'s table as a deferred layer with ``table_seed`` initialises them.

    ``(stop - start, d)`` float32 on the CPU: normal(0, 0.05) values drawn in
    chunks of ``INIT_CHUNK_ROWS`` rows, each chunk from its own generator
    seeded by (``table_seed``, owner feature, chunk index); the padding row 0
    of a sequence-owned table is zero. Only the chunks holding those rows are drawn.
    """
    if not 0 <= start <= stop <= owner.vocab_size:
        raise ValueError(f"initial_rows({owner.name!r}, {start}, {stop}): the table has {owner.vocab_size} rows")
    out = torch.empty(stop - start, owner.embedding_dim)
    for first in range(start - start % INIT_CHUNK_ROWS, stop, INIT_CHUNK_ROWS):
        size = min(INIT_CHUNK_ROWS, owner.vocab_size - first)
        key = f"{table_seed}:{owner.name}:{first // INIT_CHUNK_ROWS}".encode()
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(),
                                                                 "little") >> 1)
        chunk = torch.randn(size, owner.embedding_dim, generator=generator).mul_(0.05)
        if first == 0 and isinstance(owner, SequenceFeature):
            chunk[0] = 0.0  # the padding row
        lo, hi = max(start, first), min(stop, first + size)
        out[lo - start : hi - start] = chunk[lo - first : hi - first]
    return out


__all__ = ["deferred_tables", "tables_deferred", "initial_rows", "INIT_CHUNK_ROWS"]
