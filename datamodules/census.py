"""UCI Census-Income (KDD) as multi-task Parquet, following ``shared/data/README.md``.

The protocol of the MMoE paper's data set as used for this project's numbers:
the test file (99,762 rows) is the pool, permuted with
``numpy.random.RandomState(2024).permutation`` and split 50 % train / 25 % val
/ 25 % test. Tasks: ``income`` (income_50k == "50000+.") and ``never_married``
(marital_stat == "Never married"); ``marital_stat``, ``income_50k`` and
``instance_weight`` are not features. Categorical columns get ids fitted on the
train part (id 0 = unseen in train); dense columns are ``log1p``-transformed
(they are non-negative and heavy-tailed) and standardised with train statistics.
"""

from __future__ import annotations

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
