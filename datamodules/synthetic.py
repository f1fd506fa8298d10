"""A reproducible multi-task Parquet dataset with a known signal.

Every impression has a user, an item, a category, a city (sparse), three dense
features and a history of up to ``max_history`` item ids (a sequence). Hidden
per-user, per-item and per-category effects drive the labels:

* ``click`` ~ Bernoulli(sigmoid(ctr_logit)) over every impression;
* ``conversion`` = 1/0 on clicked rows (Bernoulli(sigmoid(cvr_logit))) and
  ``-1`` (the ignore label) on non-clicked rows: the CVR label given a click;
* ``purchase`` = click AND conversion over every impression (the CTCVR label);
* ``dwell`` = a regression target (log dwell time) correlated with the click logit.

The CVR logit shares part of the CTR signal (item quality) and has its own
part (price sensitivity via ``dense_1`` and the category), so the two tasks are
related but not identical. With ``with_truth=True`` the true probabilities
``p_click`` and ``p_conversion`` are written too (for bias experiments; they
must not be used as features).

``selection_bias=s > 0`` (default 0: the data above, unchanged) makes clicks
select a biased sample for CVR: ``s * 2 * dense_0`` is added to the CTR logit
and ``s * (dense_0^2 - 1)`` to the CVR logit, so impressions with a low
``dense_0`` are rarely clicked but convert well when they are; a CVR model fit
on clicked rows alone sees few of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature
from mtl_lightning.tasks import Task

NUM_USERS, NUM_ITEMS, NUM_CATEGORIES, NUM_CITIES = 500, 1000, 20, 30


def synthetic_features(embedding_dim: int = 16, max_history: int = 10) -> list[Feature]:
    """The feature specs of the synthetic dataset."""
    return [
        SparseFeature("user_id", NUM_USERS, embedding_dim),
        SparseFeature("item_id", NUM_ITEMS, embedding_dim),
        SparseFeature("category", NUM_CATEGORIES, embedding_dim),
        SparseFeature("city", NUM_CITIES, embedding_dim),
        DenseFeature("dense_0"),
        DenseFeature("dense_1"),
        DenseFeature("dense_2"),
        SequenceFeature("history", NUM_ITEMS, max_history, embedding_dim, shared_with="item_id"),
    ]


def synthetic_tasks() -> list[Task]:
    """Click (binary), conversion given click (binary, -1 on non-clicks) and dwell (regression)."""
    return [Task("click"), Task("conversion"), Task("dwell", kind="regression")]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_table(
    num_rows: int, seed: int = 0, max_history: int = 10, with_truth: bool = False, selection_bias: float = 0.0
) -> pa.Table:
    """``num_rows`` impressions; the hidden effects depend only on ``seed``'s world, rows on ``seed`` too."""
    world = np.random.default_rng(12345)  # the hidden effects are the same for every split
    user_bias = world.normal(0, 1.0, NUM_USERS)
    item_bias = world.normal(0, 1.0, NUM_ITEMS)
    item_quality = world.normal(0, 1.0, NUM_ITEMS)
    category_bias = world.normal(0, 0.8, NUM_CATEGORIES)
    category_cvr = world.normal(0, 1.0, NUM_CATEGORIES)
    city_bias = world.normal(0, 0.5, NUM_CITIES)
    item_category = world.integers(0, NUM_CATEGORIES, NUM_ITEMS)

    rng = np.random.default_rng(seed)
    user = rng.integers(0, NUM_USERS, num_rows)
    item = rng.integers(0, NUM_ITEMS, num_rows)
    category = item_category[item]
    city = rng.integers(0, NUM_CITIES, num_rows)
    dense = rng.normal(0, 1, (num_rows, 3)).astype(np.float32)
    lengths = rng.integers(0, max_history + 1, num_rows)
    history_flat = rng.integers(1, NUM_ITEMS, int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    history_quality = np.zeros(num_rows)
    has_history = lengths > 0
    sums = np.add.reduceat(item_quality[history_flat], offsets[:-1][has_history]) if history_flat.size else np.zeros(0)
    history_quality[has_history] = sums / lengths[has_history]

    ctr_logit = (
        -1.0 + user_bias[user] + item_bias[item] + 0.7 * item_quality[item] + category_bias[category]
        + city_bias[city] + 0.8 * dense[:, 0] - 0.5 * dense[:, 2] + 0.8 * history_quality
    )
    cvr_logit = -0.5 + 1.0 * item_quality[item] + category_cvr[category] - 0.8 * dense[:, 1] + 0.4 * user_bias[user]
    if selection_bias:
        ctr_logit = ctr_logit + selection_bias * 2.0 * dense[:, 0]
        cvr_logit = cvr_logit + selection_bias * (dense[:, 0] ** 2 - 1.0)
    p_click = _sigmoid(ctr_logit)
    p_conversion = _sigmoid(cvr_logit)
    click = (rng.random(num_rows) < p_click).astype(np.float32)
    converted = (rng.random(num_rows) < p_conversion).astype(np.float32)
    conversion = np.where(click == 1, converted, -1.0).astype(np.float32)
    purchase = (click * converted).astype(np.float32)
    dwell = (0.5 * ctr_logit + 0.3 * dense[:, 1] + rng.normal(0, 0.5, num_rows)).astype(np.float32)

    columns = {
        "user_id": pa.array(user, pa.int64()),
        "item_id": pa.array(item, pa.int64()),
        "category": pa.array(category, pa.int64()),
        "city": pa.array(city, pa.int64()),
        "dense_0": pa.array(dense[:, 0]),
        "dense_1": pa.array(dense[:, 1]),
        "dense_2": pa.array(dense[:, 2]),
        "history": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(history_flat, pa.int64())),
        "click": pa.array(click),
        "conversion": pa.array(conversion),
        "purchase": pa.array(purchase),
        "dwell": pa.array(dwell),
    }
    if with_truth:
        columns["p_click"] = pa.array(p_click.astype(np.float32))
        columns["p_conversion"] = pa.array(p_conversion.astype(np.float32))
    return pa.table(columns)


def write_synthetic(
    directory: str | Path,
    num_rows: Sequence[int] | int = (20_000, 5_000, 5_000),
    seed: int = 0,
    max_history: int = 10,
    with_truth: bool = False,
    files_per_split: int = 1,
    selection_bias: float = 0.0,
) -> dict[str, Path]:
    """Write ``train``/``val``/``test`` splits as Parquet under ``directory``; returns split -> path.

    ``num_rows`` is one size per split (or one int for all three). Splits use
    different row seeds (``seed``, ``seed + 1``, ``seed + 2``) over the same
    hidden effects. With ``files_per_split > 1`` each split is a folder of files.
    ``selection_bias`` is passed to :func:`make_table`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = [num_rows] * 3 if isinstance(num_rows, int) else list(num_rows)
    paths: dict[str, Path] = {}
    for offset, (split, size) in enumerate(zip(("train", "val", "test"), sizes)):
        table = make_table(size, seed=seed + offset, max_history=max_history, with_truth=with_truth,
                           selection_bias=selection_bias)
        if files_per_split == 1:
            path = directory / f"{split}.parquet"
            pq.write_table(table, path)
        else:
            path = directory / split
            path.mkdir(exist_ok=True)
            bounds = np.linspace(0, size, files_per_split + 1).astype(int)
            for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                pq.write_table(table.slice(lo, hi - lo), path / f"part-{part:03d}.parquet")
        paths[split] = path
    return paths


# Data whose click depends on the candidate and the behaviour history jointly (target attention's case): its own file
from .synthetic_sequences import (  # noqa: E402,F401
    make_sequence_table, sequence_features, sequence_tasks, write_sequence_synthetic,
)
