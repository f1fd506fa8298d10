"""DDP end to end on CPU: 2 ranks x 2 DataLoader workers, streamed uneven files, synced AUC, prediction files.

Lightning's ``strategy="ddp"`` re-launches the running script once per rank, so
the run lives in ``tests/scripts/ddp_stream.py`` and this test starts it with
``subprocess`` and checks the files it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from datamodules.synthetic import make_table

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_stream.py"


def write_uneven(directory: Path, sizes_train=(1300, 150, 550), sizes_val=(700, 301)) -> None:
    """Splits cut into files of unequal sizes (row groups of 256 rows), with a raw string column ``city_name``."""
    for split, sizes, seed in (("train", sizes_train, 0), ("val", sizes_val, 1)):
        table = make_table(sum(sizes), seed=seed)
        table = table.append_column("city_name", pa.array([f"city-{c}" for c in table["city"].to_pylist()]))
        (directory / split).mkdir(parents=True, exist_ok=True)
        start = 0
        for i, size in enumerate(sizes):
            pq.write_table(table.slice(start, size), directory / split / f"part-{i}.parquet", row_group_size=256)
            start += size


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_uneven(root / "data")
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(root / "data"), str(out)], capture_output=True,
                            text=True, timeout=300, env=env)  # a hang (uneven shards) fails here
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_ddp_training_sees_every_row_once_with_equal_steps(ddp_run):
    ranks = [json.loads((ddp_run / f"train_ids_rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 8  # ceil(1000 / 128) steps on both ranks despite 1300/150/550 files
    ids = [i for rank in ranks for batch in rank for i in batch]
    assert sorted(ids) == list(range(2000))  # 2 ranks x 2 workers: every row exactly once


def test_ddp_validation_auc_over_all_ranks_equals_one_process_auc(ddp_run):
    metrics = [json.loads((ddp_run / f"metrics_rank{r}.json").read_text()) for r in range(2)]
    assert metrics[0] == metrics[1]  # every rank logs the synced value
    files = sorted((ddp_run / "predictions").glob("*.parquet"))
    assert [f.name for f in files] == ["predictions-rank00000.parquet", "predictions-rank00001.parquet"]
    per_rank = [pq.read_table(f).to_pandas() for f in files]
    assert sorted(len(p) for p in per_rank) == [500, 501]  # val/predict shards: 1001 rows, none repeated
    predictions = pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()
    assert sorted(predictions["row_id"]) == list(range(1001))
    assert set(predictions.columns) == {"row_id", "user_id", "click", "conversion"}
    val = pa.concat_tables([pq.read_table(f) for f in sorted((ddp_run.parent / "data" / "val").iterdir())])
    np.testing.assert_array_equal(predictions["user_id"], val["user_id"].to_numpy()[predictions["row_id"]])

    def auc(frame, task):
        labels = val[task].to_numpy()[frame["row_id"].to_numpy()]
        keep = labels >= 0  # conversion is -1 (ignored) on non-clicked rows
        return float(binary_auroc(torch.tensor(frame[task].to_numpy()[keep]), torch.tensor(labels[keep]).long()))

    for task in ("click", "conversion"):
        assert auc(predictions, task) == pytest.approx(metrics[0][f"val/{task}/auc"], abs=1e-6)
        # one rank's half alone gives another number: the logged metric really is the synced one
        assert max(abs(auc(p, task) - metrics[0][f"val/{task}/auc"]) for p in per_rank) > 1e-4

    # per scenario (the val files' city column, carried by ParquetDataModule(scenario="city")): over both ranks
    city = val["city"].to_numpy()
    cities = sorted(set(city.tolist()))
    in_city = lambda frame, c: frame[city[frame["row_id"].to_numpy()] == c]  # noqa: E731

    def defined(task, c):  # AUC needs both classes among the city's valid labels
        labels = val[task].to_numpy()[city == c]
        return {0, 1} <= set(labels[labels >= 0].tolist())

    expected = {(task, c) for task in ("click", "conversion") for c in cities if defined(task, c)}
    assert sorted(k for k in metrics[0] if "/auc/domain=" in k) == sorted(f"val/{t}/auc/domain={c}" for t, c in expected)
    assert {k.rsplit("/domain=", 1)[0].split("/")[-1] for k in metrics[0] if "/domain=" in k} >= {"auc", "ne", "pcoc"}
    assert len(cities) >= 3 and len(expected) > len(cities)
    for task, c in expected:
        assert auc(in_city(predictions, c), task) == pytest.approx(metrics[0][f"val/{task}/auc/domain={c}"], abs=1e-6)
    assert max(abs(auc(in_city(p, c), t) - metrics[0][f"val/{t}/auc/domain={c}"])
               for p in per_rank for t, c in expected) > 1e-4


EMPTY_SHARD_SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_empty_shard.py"


def test_ddp_runs_with_a_one_row_val_and_predict_split(tmp_path):
    """1 row on 2 ranks leaves one rank's evaluation shard empty: fit, validate and predict still run, once per row."""
    data = tmp_path / "data"
    for split, rows, seed in (("train", 100, 0), ("one", 1, 1)):
        (data / split).mkdir(parents=True)
        pq.write_table(make_table(rows, seed=seed), data / split / "part-0.parquet")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(EMPTY_SHARD_SCRIPT), str(data), str(out)], capture_output=True,
                            text=True, timeout=300, env=env)  # a hang (a rank skipping a collective) fails here
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = pq.read_table(data / "one" / "part-0.parquet").to_pylist()[0]
    for mode in ("memory", "streaming"):
        metrics = [json.loads((out / mode / f"metrics_rank{r}.json").read_text()) for r in range(2)]
        assert metrics[0] == metrics[1]  # synced: the rank without a row logs the other rank's value
        files = sorted((out / mode / "predictions").glob("*.parquet"))
        predictions = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
        assert [(p["row_id"], p["user_id"]) for p in predictions] == [(0, row["user_id"])]  # the row, exactly once
        p, y = predictions[0]["click"], float(row["click"])
        logloss = -(y * np.log(p) + (1 - y) * np.log(1 - p))  # the one row's log-loss is the split's
        assert metrics[0]["val/click/logloss"] == pytest.approx(logloss, abs=1e-5)
        # the regression task per scenario: the one row's squared error; no XAUC (no pair of rows)
        assert metrics[0][f"val/dwell/mse/domain={row['city']}"] == pytest.approx(
            (predictions[0]["dwell"] - row["dwell"]) ** 2, rel=1e-4)
        assert not [k for k in metrics[0] if k.startswith("val/dwell/xauc")]
