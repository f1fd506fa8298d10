"""A reproducible multi-task Parquet dataset whose click depends on the candidate and the history JOINTLY.

Every impression shows a user a candidate item (``item_id``, with its
``category``) next to the user's recent behaviour: ``hist_item`` and
``hist_category``, two aligned lists (position ``i`` of both is the same
earlier click; the most recent first; 0 to ``max_history`` long, padded by the
data module with id 0). Item ids are ``1..NUM_ITEMS`` and categories
``1..NUM_CATEGORIES`` in both the scalar and the list columns, so ``hist_item``
can share ``item_id``'s table (``shared_with="item_id"``).

How the world works (fixed hidden effects, the same for every seed):

* every user has three favourite categories; a history position is one of
  them with probability 0.5 / 0.25 / 0.15, else any category (0.10); within a
  category, popular items are drawn more often (item rank ``floor(n u^2)``);
* the candidate is one of the user's own history items with probability
  ``repeat_share`` (re-exposure), else drawn like a history item with
  probability 0.5 (a personalised retrieval), else any category;
* ``match`` = how many history items share the candidate's category,
  ``seen`` = whether the candidate itself is in the history.

Labels:

* ``click`` ~ Bernoulli(sigmoid(-1.6 + user + item + ``match_weight`` log(1 + match)
  + ``seen_weight`` seen + 0.3 dense_0));
* ``conversion`` (given a click; ``-1`` on non-clicks, the ignore label) ~
  Bernoulli(sigmoid(-0.5 + quality(item) + 0.8 seen + 0.4 log(1 + match) - 0.5 dense_1));
* ``purchase`` = click AND conversion (CTCVR);
* ``dwell`` (regression) = 0.6 log(1 + match) + 0.5 seen + 0.3 quality(item) + N(0, 0.5).

Neither the candidate alone nor the history alone carries the signal: a model
must compare each history position with the candidate (target attention, as
DIN does), which pooling the history first (mean, sum) cannot do well.
Measured with a hand-written pair (``benchmarks/sequence_signal.py``), see
``docs/data.md``. ``user_id`` is a feature too, but with ``NUM_USERS`` users and
a fresh history drawn per impression, memorising a user's favourite categories
from a few rows each recovers little of ``match``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature
from mtl_lightning.tasks import Task

NUM_USERS, NUM_CATEGORIES, ITEMS_PER_CATEGORY = 20_000, 30, 100
NUM_ITEMS = NUM_CATEGORIES * ITEMS_PER_CATEGORY
FAVOURITE_SHARES = (0.5, 0.25, 0.15)  # the rest (0.10): any category


def sequence_features(embedding_dim: int = 16, max_history: int = 30, pooling: str = "mean") -> list[Feature]:
    """The feature specs of the sequence dataset; ``hist_item`` / ``hist_category`` share the candidate's tables."""
    return [
        SparseFeature("user_id", NUM_USERS + 1, embedding_dim),
        SparseFeature("item_id", NUM_ITEMS + 1, embedding_dim),
        SparseFeature("category", NUM_CATEGORIES + 1, embedding_dim),
        DenseFeature("dense_0"),
        DenseFeature("dense_1"),
        SequenceFeature("hist_item", NUM_ITEMS + 1, max_history, embedding_dim, pooling=pooling,
                        shared_with="item_id"),
        SequenceFeature("hist_category", NUM_CATEGORIES + 1, max_history, embedding_dim, pooling=pooling,
                        shared_with="category"),
    ]


def sequence_tasks() -> list[Task]:
    """Click (binary), conversion given click (binary, -1 on non-clicks) and dwell (regression)."""
    return [Task("click"), Task("conversion"), Task("dwell", kind="regression")]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _World:
    """The hidden effects: the same for every split and seed."""

    def __init__(self) -> None:
        world = np.random.default_rng(20_240_901)
        # item ids 1..NUM_ITEMS, shuffled over the (category, popularity rank) grid
        self.item_at = (world.permutation(NUM_ITEMS) + 1).reshape(NUM_CATEGORIES, ITEMS_PER_CATEGORY)
        self.category_of = np.zeros(NUM_ITEMS + 1, dtype=np.int64)
        self.category_of[self.item_at.ravel()] = np.repeat(np.arange(1, NUM_CATEGORIES + 1), ITEMS_PER_CATEGORY)
        self.item_bias = world.normal(0, 0.4, NUM_ITEMS + 1)
        self.item_quality = world.normal(0, 1.0, NUM_ITEMS + 1)
        self.user_bias = world.normal(0, 0.4, NUM_USERS + 1)
        # three distinct favourite categories per user (1-based)
        self.favourites = world.random((NUM_USERS + 1, NUM_CATEGORIES)).argsort(axis=1)[:, :3] + 1

    def draw_items(self, rng: np.random.Generator, user: np.ndarray, personalised: np.ndarray) -> np.ndarray:
        """One item per entry: from the user's favourite categories where ``personalised``, else any category;
        popular items (low rank) more often."""
        slot = rng.choice(4, size=user.size, p=[*FAVOURITE_SHARES, 1.0 - sum(FAVOURITE_SHARES)])
        slot = np.where(personalised, slot, 3)
        any_category = rng.integers(1, NUM_CATEGORIES + 1, user.size)
        category = np.where(slot < 3, self.favourites[user, np.minimum(slot, 2)], any_category)
        rank = np.floor(ITEMS_PER_CATEGORY * rng.random(user.size) ** 2).astype(np.int64)
        return self.item_at[category - 1, rank]


def make_sequence_table(num_rows: int, seed: int = 0, max_history: int = 30, repeat_share: float = 0.2,
                        match_weight: float = 1.0, seen_weight: float = 1.0, with_truth: bool = False) -> pa.Table:
    """``num_rows`` impressions (rows depend on ``seed``, the hidden effects do not).

    ``match_weight`` and ``seen_weight`` scale the two joint effects in the click logit (0 and 0: the history
    carries no click signal beyond the user's).
    """
    if int(max_history) < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if not 0.0 <= repeat_share <= 1.0:
        raise ValueError(f"repeat_share must be in [0, 1], got {repeat_share}")
    world = _World()
    rng = np.random.default_rng(seed)
    user = rng.integers(1, NUM_USERS + 1, num_rows)
    lengths = rng.integers(0, max_history + 1, num_rows)
    offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row_of = np.repeat(np.arange(num_rows), lengths)  # the row of each history position
    history = world.draw_items(rng, user[row_of], np.ones(row_of.size, dtype=bool))
    history_category = world.category_of[history]

    # the candidate: one of the user's history items (re-exposure), a personalised draw, or any category
    candidate = world.draw_items(rng, user, rng.random(num_rows) < 0.5)
    repeat = (rng.random(num_rows) < repeat_share) & (lengths > 0)
    pick = offsets[:-1] + np.floor(rng.random(num_rows) * np.maximum(lengths, 1)).astype(np.int64)
    candidate[repeat] = history[pick[repeat]]
    category = world.category_of[candidate]

    match = np.bincount(row_of, weights=history_category == category[row_of], minlength=num_rows)
    seen = np.bincount(row_of, weights=history == candidate[row_of], minlength=num_rows) > 0
    dense = rng.normal(0, 1, (num_rows, 2)).astype(np.float32)
    affinity = np.log1p(match)

    ctr_logit = (-1.6 + world.user_bias[user] + world.item_bias[candidate] + match_weight * affinity
                 + seen_weight * seen + 0.3 * dense[:, 0])
    cvr_logit = -0.5 + world.item_quality[candidate] + 0.8 * seen + 0.4 * affinity - 0.5 * dense[:, 1]
    p_click, p_conversion = _sigmoid(ctr_logit), _sigmoid(cvr_logit)
    click = (rng.random(num_rows) < p_click).astype(np.float32)
    converted = (rng.random(num_rows) < p_conversion).astype(np.float32)
    dwell = 0.6 * affinity + 0.5 * seen + 0.3 * world.item_quality[candidate] + rng.normal(0, 0.5, num_rows)

    # newest first: position 0 is the most recent click (the positions are drawn independently, so the order
    # carries no signal; it matches datamodules.movielens, where it does)
    list_offsets = pa.array(offsets.astype(np.int32))
    columns = {
        "user_id": pa.array(user, pa.int64()),
        "item_id": pa.array(candidate, pa.int64()),
        "category": pa.array(category, pa.int64()),
        "dense_0": pa.array(dense[:, 0]),
        "dense_1": pa.array(dense[:, 1]),
        "hist_item": pa.ListArray.from_arrays(list_offsets, pa.array(history, pa.int64())),
        "hist_category": pa.ListArray.from_arrays(list_offsets, pa.array(history_category, pa.int64())),
        "click": pa.array(click),
        "conversion": pa.array(np.where(click == 1, converted, -1.0).astype(np.float32)),
        "purchase": pa.array(click * converted),
        "dwell": pa.array(dwell.astype(np.float32)),
    }
    if with_truth:
        columns["p_click"] = pa.array(p_click.astype(np.float32))
        columns["p_conversion"] = pa.array(p_conversion.astype(np.float32))
        columns["match"] = pa.array(match.astype(np.int64))
        columns["seen"] = pa.array(seen)
    return pa.table(columns)


def write_sequence_synthetic(directory: str | Path, num_rows: Sequence[int] | int = (160_000, 20_000, 20_000),
                             seed: int = 0, max_history: int = 30, **kwargs) -> dict[str, Path]:
    """Write ``train``/``val``/``test`` Parquet files under ``directory`` (row seeds ``seed``, ``+1``, ``+2``);
    returns split -> path. ``kwargs`` go to :func:`make_sequence_table`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = [num_rows] * 3 if isinstance(num_rows, int) else list(num_rows)
    if len(sizes) != 3:
        raise ValueError(f"num_rows must be one int or three sizes (train, val, test), got {num_rows}")
    paths: dict[str, Path] = {}
    for offset, (split, size) in enumerate(zip(("train", "val", "test"), sizes)):
        paths[split] = directory / f"{split}.parquet"
        pq.write_table(make_sequence_table(size, seed=seed + offset, max_history=max_history, **kwargs), paths[split])
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m datamodules.synthetic_sequences DIR [--rows TRAIN VAL TEST] [--seed S] [--max-history N]``."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.synthetic_sequences", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, nargs=3, default=(160_000, 20_000, 20_000), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-history", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        paths = write_sequence_synthetic(args.out_dir, args.rows, args.seed, args.max_history)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
