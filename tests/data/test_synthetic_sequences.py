"""datamodules.synthetic_sequences: aligned histories, the joint click signal as specified, the Parquet it writes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from datamodules import ParquetDataModule
from datamodules.synthetic import make_sequence_table, sequence_features, sequence_tasks, write_sequence_synthetic
from datamodules.synthetic_sequences import NUM_CATEGORIES, NUM_ITEMS, main


def _rows(table, *names):
    return [table.column(n).to_pylist() for n in names]


def test_histories_are_aligned_and_match_and_seen_are_what_the_lists_say():
    table = make_sequence_table(3000, seed=3, max_history=12, with_truth=True)
    items, categories, candidate, category, match, seen = _rows(
        table, "hist_item", "hist_category", "item_id", "category", "match", "seen")
    item_category = {}
    for hist, cats in zip(items, categories):
        assert len(hist) == len(cats) <= 12
        for i, c in zip(hist, cats):
            assert 1 <= i <= NUM_ITEMS and 1 <= c <= NUM_CATEGORIES
            assert item_category.setdefault(i, c) == c  # an item has one category, in every row
    for row in range(len(items)):
        assert item_category.get(candidate[row], category[row]) == category[row]
        assert match[row] == sum(c == category[row] for c in categories[row])
        assert seen[row] == (candidate[row] in items[row])
    lengths = np.array([len(h) for h in items])
    assert lengths.min() == 0 and lengths.max() == 12
    assert 0.1 < np.mean(seen) < 0.4  # re-exposure (repeat_share=0.2) plus chance
    # the same hidden world for every seed: item -> category agrees across seeds
    other = make_sequence_table(500, seed=4, max_history=12)
    for i, c in zip(other.column("item_id").to_pylist(), other.column("category").to_pylist()):
        assert item_category.get(i, c) == c
    assert make_sequence_table(200, seed=3, max_history=12).equals(make_sequence_table(200, seed=3, max_history=12))


def test_the_click_depends_on_candidate_and_history_jointly_and_the_labels_are_consistent():
    table = make_sequence_table(40_000, seed=0, with_truth=True)
    click, conversion, purchase = (table.column(n).to_numpy() for n in ("click", "conversion", "purchase"))
    match, seen = table.column("match").to_numpy(), table.column("seen").to_numpy(zero_copy_only=False)
    # the click rate rises with the matching history items and with having seen the candidate
    assert click[seen].mean() > click[~seen].mean() + 0.15
    assert click[(match >= 5) & ~seen].mean() > click[(match == 0) & ~seen].mean() + 0.2
    # with both joint effects off the history carries no click signal
    flat = make_sequence_table(40_000, seed=0, match_weight=0.0, seen_weight=0.0, with_truth=True)
    flat_click, flat_match = flat.column("click").to_numpy(), flat.column("match").to_numpy()
    assert abs(flat_click[flat_match >= 5].mean() - flat_click[flat_match == 0].mean()) < 0.03
    # conversion is the label given a click, -1 elsewhere; purchase = click and conversion
    assert (conversion[click == 0] == -1).all() and np.isin(conversion[click == 1], (0, 1)).all()
    np.testing.assert_array_equal(purchase, click * (conversion == 1))
    assert np.isfinite(table.column("dwell").to_numpy()).all()


def test_written_splits_feed_the_data_module_and_bad_arguments_are_refused(tmp_path, capsys):
    paths = write_sequence_synthetic(tmp_path, (300, 100, 100), max_history=8)
    assert [pq.read_metadata(p).num_rows for p in paths.values()] == [300, 100, 100]
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], features=sequence_features(8, max_history=8),
                           tasks=sequence_tasks(), batch_size=64, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    hist_item, hist_category = batch["features"]["hist_item"], batch["features"]["hist_category"]
    assert hist_item.shape == hist_category.shape == (64, 8)
    assert ((hist_item == 0) == (hist_category == 0)).all()  # the same positions are padding
    with pytest.raises(ValueError, match="max_history must be >= 1"):
        make_sequence_table(10, max_history=0)
    with pytest.raises(ValueError, match="num_rows must be one int or three sizes"):
        write_sequence_synthetic(tmp_path / "bad", (10, 10))
    main([str(tmp_path / "cli"), "--rows", "50", "20", "20", "--max-history", "5"])
    assert f"test: {tmp_path / 'cli' / 'test.parquet'}" in capsys.readouterr().out
    assert max(len(h) for h in pq.read_table(tmp_path / "cli" / "train.parquet").column("hist_item").to_pylist()) == 5
