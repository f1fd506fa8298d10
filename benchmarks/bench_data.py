"""The benchmark dataset: written once as Parquet and cached under ``benchmarks/.cache/``.

Needs only numpy and pyarrow, so the anchor libraries' virtualenv can read the
same spec without importing mtl-lightning.

16 sparse features (vocabularies log-spaced from 10 to 100,000, ids skewed
towards small values as real traffic is), 8 dense features, one history
sequence of up to 20 ids (its own 50,000-id vocabulary, 0 = padding) and three
labels: ``click`` (binary), ``conversion`` (binary on clicked rows, -1 on the
others), ``purchase`` (click and conversion, ESMM's CTCVR label) and ``dwell``
(regression). Hidden per-id effects of six sparse features, two dense features
and the history drive the labels, so a model learns something real (the
sparse-versus-dense AUC check needs that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_SPARSE, NUM_DENSE, SEQ_LEN, SEQ_VOCAB, EMBEDDING_DIM = 16, 8, 20, 50_000, 16
SPARSE_VOCABS = [int(round(v)) for v in np.geomspace(10, 100_000, NUM_SPARSE)]
SPARSE = [f"s{i}" for i in range(NUM_SPARSE)]
DENSE = [f"d{i}" for i in range(NUM_DENSE)]
SEQUENCE = "history"
TASKS = [("click", "binary"), ("conversion", "binary"), ("dwell", "regression")]
CACHE = Path(__file__).resolve().parent / ".cache"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_table(num_rows: int, seed: int) -> pa.Table:
    world = np.random.default_rng(2024)  # the hidden effects: the same for every split
    effects = [world.normal(0, 0.6, v) for v in SPARSE_VOCABS]
    seq_effect = world.normal(0, 1.0, SEQ_VOCAB)
    rng = np.random.default_rng(seed)
    ids = [np.minimum((v * rng.random(num_rows) ** 2).astype(np.int64), v - 1) for v in SPARSE_VOCABS]
    dense = rng.normal(0, 1, (num_rows, NUM_DENSE)).astype(np.float32)
    lengths = rng.integers(0, SEQ_LEN + 1, num_rows)
    flat = np.minimum((SEQ_VOCAB * rng.random(int(lengths.sum())) ** 2).astype(np.int64), SEQ_VOCAB - 1)
    flat = np.maximum(flat, 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    history_effect = np.zeros(num_rows)
    nonempty = lengths > 0
    if flat.size:
        history_effect[nonempty] = np.add.reduceat(seq_effect[flat], offsets[:-1][nonempty]) / lengths[nonempty]

    ctr = -1.2 + 0.8 * dense[:, 0] - 0.5 * dense[:, 1] + 0.8 * history_effect
    for k in (3, 6, 9, 11, 13, 15):
        ctr = ctr + effects[k][ids[k]]
    cvr = -0.3 + effects[9][ids[9]] - effects[4][ids[4]] + 0.6 * dense[:, 2]
    click = (rng.random(num_rows) < _sigmoid(ctr)).astype(np.float32)
    converted = (rng.random(num_rows) < _sigmoid(cvr)).astype(np.float32)
    columns = {name: pa.array(column) for name, column in zip(SPARSE, ids)}
    columns.update({name: pa.array(dense[:, i]) for i, name in enumerate(DENSE)})
    columns[SEQUENCE] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64()))
    columns["click"] = pa.array(click)
    columns["conversion"] = pa.array(np.where(click == 1, converted, -1.0).astype(np.float32))
    columns["purchase"] = pa.array(click * converted)
    columns["dwell"] = pa.array((0.5 * ctr + 0.3 * dense[:, 3] + rng.normal(0, 0.5, num_rows)).astype(np.float32))
    return pa.table(columns)


def val_rows(num_rows: int) -> int:
    """Validation rows that go with ``num_rows`` training rows."""
    return max(num_rows // 10, 10_000)


def dataset(num_rows: int) -> dict[str, Path]:
    """``{"train": path, "val": path}`` of the cached dataset with ``num_rows`` training rows."""
    val = val_rows(num_rows)
    folder = CACHE / f"rows-{num_rows}-val-{val}"
    paths = {"train": folder / "train.parquet", "val": folder / "val.parquet"}
    if not all(p.exists() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for (split, path), seed in zip(paths.items(), (0, 1)):
            rows = num_rows if split == "train" else val
            tmp = path.with_suffix(".tmp")
            pq.write_table(make_table(rows, seed), tmp, row_group_size=1 << 17)
            tmp.rename(path)
    return paths


def padded_history(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The ragged history lists as ``(N, SEQ_LEN)`` int64, right-padded with 0 (what the anchors need)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    out = np.zeros((len(column), SEQ_LEN), dtype=np.int64)
    rows = np.repeat(np.arange(len(column)), lengths)
    position = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    out[rows, position] = flat
    return out
