"""UCI Census-Income (KDD) as multi-task Parquet, following ``shared/data/README.md``.

The protocol of the MMoE paper's data set as used for this project's numbers:
the test file (99,762 rows) is the pool, permuted with
``numpy.random.RandomState(2024).permutation`` and split 50 % train / 25 % val
/ 25 % test. Tasks: ``income`` (income_50k == "50000+.") and ``never_married``
(marital_stat == "Never married"); ``marital_stat``, ``income_50k`` and
``instance_weight`` are not features. Categorical columns get ids fitted on the
train part (id 0 = unseen in train); dense columns are ``log1p``-transformed
(they are non-negative and heavy-tailed) and standardised with train statistics.

Getting the data, one command (UCI's file, about 3 MB, checked against its SHA-256)::

    python -m datamodules.census download data/census      # -> data/census/{train,val,test}.parquet

writes ``census-income.test.gz`` and the three Parquet splits into the folder;
``python -m datamodules.census convert FILE DIR`` converts a copy you already
have. ``make quality`` and ``tests/data/test_census.py`` read the folder named by
``MTL_CENSUS_DIR`` (default ``data/census``): :func:`census_source`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_lightning.features import DenseFeature, Feature, SparseFeature
from mtl_lightning.tasks import Task

COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends", "tax_filer_stat",
    "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father",
    "country_mother", "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits",
    "weeks_worked", "year", "income_50k",
]
DENSE = ["age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked"]
NOT_FEATURES = {"marital_stat", "income_50k", "instance_weight"}
CATEGORICAL = [c for c in COLUMNS if c not in DENSE and c not in NOT_FEATURES]


# UCI's own copy of the test file; the checksum is of its decompressed content (the census-income.test file), which
# does not depend on how the archive was compressed
CENSUS_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/census-income.test.gz"
CENSUS_SHA256 = "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c"
CENSUS_FILE = "census-income.test.gz"
CENSUS_ENV = "MTL_CENSUS_DIR"
DEFAULT_CENSUS_DIR = Path("data") / "census"


def census_dir(data_dir: str | Path | None = None) -> Path:
    """The Census folder: ``data_dir``, else ``$MTL_CENSUS_DIR``, else ``data/census``."""
    return Path(data_dir or os.environ.get(CENSUS_ENV) or DEFAULT_CENSUS_DIR)


def census_missing_message(folder: str | Path) -> str:
    """What to run when the Census file is not in ``folder``."""
    return (f"UCI Census-Income (KDD) not found: {Path(folder) / CENSUS_FILE} does not exist. Get it with\n"
            f"    python -m datamodules.census download {folder}\n"
            f"(about 3 MB from UCI, checksum-checked), or point {CENSUS_ENV} at a folder that holds {CENSUS_FILE}")


def census_source(data_dir: str | Path | None = None) -> Path:
    """The raw Census file in the Census folder (:func:`census_dir`); ``FileNotFoundError`` saying what to run."""
    source = census_dir(data_dir) / CENSUS_FILE
    if not source.is_file():
        raise FileNotFoundError(census_missing_message(census_dir(data_dir)))
    return source


def download_census(out_dir: str | Path, url: str = CENSUS_URL, sha256: str | None = CENSUS_SHA256
                    ) -> dict[str, Path]:
    """Fetch the UCI file into ``out_dir`` (checksum-checked) and write the Parquet splits beside it."""
    from .download import fetch

    source = fetch(url, Path(out_dir) / CENSUS_FILE, sha256, gunzipped=True)
    return prepare_census(source, out_dir)[0]


def convert_census(source: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Copy a local ``census-income.test`` (gzip or not) into ``out_dir`` as ``census-income.test.gz`` and write the
    Parquet splits beside it, so the folder is the same as ``download`` makes."""
    import gzip
    import shutil

    source, target = Path(source), Path(out_dir) / CENSUS_FILE
    if not source.is_file():
        raise ValueError(f"{source}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as head:
        compressed = head.read(2) == b"\x1f\x8b"
    if source.resolve() != target.resolve():
        if compressed:
            shutil.copyfile(source, target)
        else:
            with open(source, "rb") as stream, gzip.open(target, "wb") as out:
                shutil.copyfileobj(stream, out)
    return prepare_census(target, out_dir)[0]


def census_tasks() -> list[Task]:
    return [Task("income"), Task("never_married")]


def load_census_frame(source: str | Path) -> pd.DataFrame:
    """The raw UCI file (``census-income.test.gz``) as a DataFrame with named columns."""
    frame = pd.read_csv(source, header=None, names=COLUMNS, sep=",", skipinitialspace=True, dtype=str,
                        keep_default_na=False)
    if frame.shape[1] != len(COLUMNS) or frame.empty:
        raise ValueError(f"{source}: expected {len(COLUMNS)} comma-separated columns, got {frame.shape}")
    return frame


def prepare_census(source: str | Path, out_dir: str | Path, embedding_dim: int = 8, seed: int = 2024
                   ) -> tuple[dict[str, Path], list[Feature], list[Task]]:
    """Write ``train``/``val``/``test`` Parquet files; returns the paths, the feature specs and the tasks."""
    frame = load_census_frame(source)
    order = np.random.RandomState(seed).permutation(len(frame))
    n_train, n_val = len(frame) // 2, len(frame) // 4
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    train = frame.iloc[parts["train"]]
    vocabularies = {c: {v: i + 1 for i, v in enumerate(sorted(train[c].unique()))} for c in CATEGORICAL}
    dense_train = np.log1p(train[DENSE].astype(np.float64).clip(lower=0))
    mean, std = dense_train.mean(), dense_train.std().replace(0, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in parts.items():
        part = frame.iloc[rows]
        columns: dict[str, pa.Array] = {}
        for c in CATEGORICAL:
            columns[c] = pa.array(part[c].map(vocabularies[c]).fillna(0).astype(np.int64).to_numpy())
        dense = (np.log1p(part[DENSE].astype(np.float64).clip(lower=0)) - mean) / std
        for c in DENSE:
            columns[c] = pa.array(dense[c].to_numpy(np.float32))
        columns["income"] = pa.array((part["income_50k"] == "50000+.").to_numpy(np.float32))
        columns["never_married"] = pa.array((part["marital_stat"] == "Never married").to_numpy(np.float32))
        paths[split] = out_dir / f"{split}.parquet"
        pq.write_table(pa.table(columns), paths[split])
    features: list[Feature] = [SparseFeature(c, len(vocabularies[c]) + 1, embedding_dim) for c in CATEGORICAL]
    features += [DenseFeature(c) for c in DENSE]
    return paths, features, census_tasks()


def main(argv: list[str] | None = None) -> None:
    """``python -m datamodules.census download DIR`` / ``convert FILE DIR``."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.census", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="fetch the UCI file and write the Parquet splits")
    download.add_argument("out_dir", type=Path)
    download.add_argument("--url", default=CENSUS_URL, help="where to fetch it (https://, file://)")
    download.add_argument("--sha256", default=CENSUS_SHA256, help="expected SHA-256 of the decompressed file")
    convert = commands.add_parser("convert", help="write the Parquet splits from a census-income.test(.gz) you have")
    convert.add_argument("source", type=Path)
    convert.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            paths = download_census(args.out_dir, args.url, args.sha256)
        else:
            paths = convert_census(args.source, args.out_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"tasks: income, never_married; use it with: {CENSUS_ENV}={args.out_dir} make quality")


if __name__ == "__main__":
    main()
