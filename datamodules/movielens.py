"""MovieLens-1M and MovieLens-100K (GroupLens) as multi-task Parquet with behaviour histories.

GroupLens' own archives, fetched by the user and checked against their SHA-256
(nothing from MovieLens is part of this project)::

    python -m datamodules.movielens download data/movielens             # ml-1m.zip (~6 MB) and ml-100k.zip (~5 MB)
    python -m datamodules.movielens download data/movielens --dataset 1m
    python -m datamodules.movielens convert data/movielens data/movielens   # zips (or extracted folders) you have

write ``DIR/ml-1m/{train,val,test}.parquet`` (and ``DIR/ml-100k/...``) plus a
``meta.json`` (vocabulary sizes, genre / occupation / zip-prefix names, split
boundaries, the year's statistics) from which :func:`movielens_features` builds
the feature specs.

One row per rating, in chronological order within each split:

* user: ``user_id`` (GroupLens' id), ``gender`` (1 = F, 2 = M), ``age`` (the
  seven ML-1M age groups, ids 1..7: under 18, 18-24, 25-34, 35-44, 45-49,
  50-55, 56+; ML-100K's ages in years are put in the same groups),
  ``occupation`` (ML-1M's code + 1; ML-100K's names numbered 1..n in sorted
  order), ``zip_prefix`` (the first ``zip_prefix_len`` characters of the zip
  code, numbered 1..n in sorted order);
* candidate: ``movie_id`` (GroupLens' id), ``genres`` (list of genre ids, in the
  order of the file: ML-1M's ``Genre|Genre`` string, ML-100K's flag columns),
  ``genre`` (the first of them), ``year`` (release year from the title, or
  ML-100K's release date; standardised with the mean and standard deviation of
  the train rows; a movie without a year gets the mean, i.e. 0);
* history: ``hist_movie`` and ``hist_genre``, the user's ratings BEFORE this one
  (never this one), the most recent first, at most ``history_len`` (default
  50); position ``i`` of both lists is the same rating (``hist_genre`` holds
  that movie's first genre). A user's ratings are ordered by timestamp, then
  movie id: of two ratings in the same second, the one with the smaller movie
  id comes first and is in the other's history. Histories span the split
  boundaries: a test row's history holds the user's train and val ratings;
* labels: ``like`` (rating >= 4, binary, float 0/1) and ``rating`` (1..5,
  regression, float).

Genre ids are the same in both data sets: 1..18 in GroupLens' order (Action,
Adventure, Animation, Children's, Comedy, Crime, Documentary, Drama, Fantasy,
Film-Noir, Horror, Musical, Mystery, Romance, Sci-Fi, Thriller, War, Western)
and 19 for "unknown" (ML-100K's ``unknown`` flag, or a movie without any genre).
Id 0 is padding in every list and never a value.

Time-based split over the whole data set: with all ratings sorted by
timestamp, ``t_val`` is the timestamp at position ``floor(0.8 n)`` and
``t_test`` the one at ``floor(0.9 n)`` (``split=(0.8, 0.1, 0.1)``); train holds
the ratings with ``timestamp < t_val``, val ``t_val <= timestamp < t_test``,
test ``timestamp >= t_test``. Ratings of the same second never straddle a
boundary, so the shares are close to, not exactly, 80/10/10 %. The split is by
time for everyone: a user may have rows in all three splits, or in test only.

The conversion works on whole columns with numpy and pyarrow (one sort, a
per-user position by a running maximum, one gather per chunk of rows for the
histories) and writes row groups of ``chunk_rows`` rows, so ML-1M's million
ratings with 50-long histories never need more than a few hundred MB.

Two files: ``datamodules.movielens_sources`` knows GroupLens' archives (URLs,
pinned checksums, the formats of both releases, :func:`load_movielens`); this
one turns the loaded columns into histories, splits and Parquet, builds the
feature specs and runs the command line. Every name stays importable from here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature
from mtl_lightning.tasks import Task

from .movielens_sources import (  # noqa: F401  (re-exported: they lived here)
    AGE_GROUPS, AGE_NAMES, ARCHIVES, BASE_URL, DATASETS, FILES, FOLDERS, GENRE_IDS, GENRES, OCCUPATIONS_1M,
    UNKNOWN_GENRE, _detect, load_movielens,
)

MOVIELENS_ENV = "MTL_MOVIELENS_DIR"
SPLITS = ("train", "val", "test")
TASKS = ("like", "rating")


def movielens_tasks() -> list[Task]:
    """``like`` (rating >= 4, binary) and ``rating`` (regression)."""
    return [Task("like"), Task("rating", kind="regression")]


# ---------------------------------------------------------------------------------------------------------------------
# histories, split, Parquet

def time_split_boundaries(timestamp: np.ndarray, split: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[int, int]:
    """``(t_val, t_test)``: the timestamps at positions ``floor(train * n)`` and ``floor((train + val) * n)``."""
    if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1.0) > 1e-9:
        raise ValueError(f"split must be three positive shares (train, val, test) summing to 1, got {tuple(split)}")
    ordered = np.sort(timestamp)
    n = ordered.size
    val_at = min(int(np.floor(split[0] * n + 1e-9)), n - 1)  # 1e-9: 0.9 * 10 is 9, not 8.999...
    test_at = min(int(np.floor((split[0] + split[1]) * n + 1e-9)), n - 1)
    return int(ordered[val_at]), int(ordered[test_at])


def history_positions(user: np.ndarray, movie: np.ndarray, timestamp: np.ndarray, history_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The order of the ratings by (user, timestamp, movie) and, per rating, where it is and how long its history is.

    Returns ``order`` (positions of the ratings sorted by user, timestamp, movie id), ``position`` (each rating's
    position in that order) and ``length`` (``min(#earlier ratings of the user, history_len)``, per rating). The
    history of rating ``r`` is ``movie[order[position[r] - 1]], ..., movie[order[position[r] - length[r]]]``.
    """
    order = np.lexsort((movie, timestamp, user))
    sorted_user = user[order]
    n = order.size
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_user[1:] != sorted_user[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    length = np.minimum(np.arange(n) - group_start, history_len)[position]
    return order, position, length


def _history_lists(sorted_values: np.ndarray, position: np.ndarray, length: np.ndarray) -> pa.ListArray:
    """For each row, ``sorted_values[position - 1], ..., sorted_values[position - length]`` (newest first)."""
    offsets = np.zeros(length.size + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    step = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], length)  # 0, 1, ... within each row
    flat = np.repeat(position, length) - 1 - step
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(sorted_values[flat], pa.int64()))


def prepare_movielens(source: str | Path, out_dir: str | Path, history_len: int = 50,
                      split: Sequence[float] = (0.8, 0.1, 0.1), zip_prefix_len: int = 3, chunk_rows: int = 200_000,
                      embedding_dim: int = 16) -> tuple[dict[str, Path], list[Feature], list[Task]]:
    """Convert one MovieLens archive or extracted folder into ``out_dir/{train,val,test}.parquet`` and ``meta.json``.

    Returns the split paths, the feature specs (:func:`movielens_features`) and the tasks.
    """
    if int(history_len) < 1:
        raise ValueError(f"history_len must be >= 1, got {history_len}")
    if int(zip_prefix_len) < 1:
        raise ValueError(f"zip_prefix_len must be >= 1, got {zip_prefix_len}")
    dataset, data = load_movielens(source, zip_prefix_len)
    order, position, length = history_positions(data.user, data.movie, data.timestamp, history_len)
    sorted_movie = data.movie[order]
    first_genre = np.zeros(len(data.movie_genres), dtype=np.int64)
    has = np.asarray(data.movie_genres.value_lengths().fill_null(0)) > 0
    starts = data.movie_genres.offsets.to_numpy()[:-1]
    first_genre[has] = data.movie_genres.values.to_numpy()[starts[has]]
    sorted_genre = first_genre[sorted_movie]

    t_val, t_test = time_split_boundaries(data.timestamp, split)
    part_of = np.where(data.timestamp < t_val, 0, np.where(data.timestamp < t_test, 1, 2))
    counts = np.bincount(part_of, minlength=3)
    if (counts == 0).any():
        empty = SPLITS[int(np.argmin(counts))]
        raise ValueError(f"{source}: the {empty} split is empty (boundaries t_val={t_val}, t_test={t_test}): too few "
                         f"distinct timestamps for split={tuple(split)}")
    known_year = ~np.isnan(data.movie_year[data.movie])
    train_years = data.movie_year[data.movie][(part_of == 0) & known_year]
    year_mean = float(train_years.mean()) if train_years.size else 0.0
    year_std = float(train_years.std()) if train_years.size > 1 and train_years.std() > 0 else 1.0
    year_scaled = np.nan_to_num((data.movie_year - year_mean) / year_std, nan=0.0).astype(np.float32)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    time_order = np.lexsort((data.movie, data.user, data.timestamp))
    paths: dict[str, Path] = {}
    for index, name in enumerate(SPLITS):
        rows = time_order[part_of[time_order] == index]
        paths[name] = out_dir / f"{name}.parquet"
        writer = None
        try:
            for begin in range(0, rows.size, chunk_rows):
                chunk = rows[begin:begin + chunk_rows]
                user, movie = data.user[chunk], data.movie[chunk]
                columns = {"user_id": pa.array(user, pa.int64())}
                for column in ("gender", "age", "occupation", "zip_prefix"):
                    columns[column] = pa.array(data.user_columns[column][user], pa.int64())
                columns["movie_id"] = pa.array(movie, pa.int64())
                columns["genres"] = data.movie_genres.take(pa.array(movie))
                columns["genre"] = pa.array(first_genre[movie], pa.int64())
                columns["year"] = pa.array(year_scaled[movie], pa.float32())
                columns["hist_movie"] = _history_lists(sorted_movie, position[chunk], length[chunk])
                columns["hist_genre"] = _history_lists(sorted_genre, position[chunk], length[chunk])
                columns["like"] = pa.array((data.rating[chunk] >= 4).astype(np.float32))
                columns["rating"] = pa.array(data.rating[chunk].astype(np.float32))
                table = pa.table(columns)
                if writer is None:
                    writer = pq.ParquetWriter(paths[name], table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()

    meta = {
        "dataset": f"MovieLens-{dataset.upper()}",
        "source": str(source),
        "rows": {name: int(counts[i]) for i, name in enumerate(SPLITS)},
        "split": list(split),
        "t_val": t_val,
        "t_test": t_test,
        "history_len": int(history_len),
        "zip_prefix_len": int(zip_prefix_len),
        "vocab_size": {
            "user_id": int(data.user_columns["gender"].size),
            "gender": 3,
            "age": len(AGE_GROUPS) + 1,
            "occupation": len(data.vocabularies["occupation"]) + 1,
            "zip_prefix": len(data.vocabularies["zip_prefix"]) + 1,
            "movie_id": int(len(data.movie_genres)),
            "genre": len(GENRES) + 1,
        },
        "max_genres": int(np.asarray(data.movie_genres.value_lengths().fill_null(0)).max()),
        "year_mean": year_mean,
        "year_std": year_std,
        "genres": list(GENRES),
        "age_groups": list(AGE_NAMES),
        "occupation": data.vocabularies["occupation"],
        "zip_prefix": data.vocabularies["zip_prefix"],
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths, movielens_features(out_dir, embedding_dim), movielens_tasks()


def movielens_features(folder: str | Path, embedding_dim: int = 16, pooling: str = "mean") -> list[Feature]:
    """Feature specs of a converted folder (read from its ``meta.json``).

    ``hist_movie`` shares ``movie_id``'s table and ``hist_genre`` / ``genres`` share ``genre``'s; the sequences are
    pooled with ``pooling``.
    """
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing; convert the data first (python -m datamodules.movielens convert ...)")
    meta = json.loads(meta_path.read_text())
    vocab = meta["vocab_size"]
    return [
        SparseFeature("user_id", vocab["user_id"], embedding_dim),
        SparseFeature("gender", vocab["gender"], embedding_dim),
        SparseFeature("age", vocab["age"], embedding_dim),
        SparseFeature("occupation", vocab["occupation"], embedding_dim),
        SparseFeature("zip_prefix", vocab["zip_prefix"], embedding_dim),
        SparseFeature("movie_id", vocab["movie_id"], embedding_dim),
        SparseFeature("genre", vocab["genre"], embedding_dim),
        SequenceFeature("genres", vocab["genre"], meta["max_genres"], embedding_dim, pooling=pooling,
                        shared_with="genre"),
        DenseFeature("year"),
        SequenceFeature("hist_movie", vocab["movie_id"], meta["history_len"], embedding_dim, pooling=pooling,
                        shared_with="movie_id"),
        SequenceFeature("hist_genre", vocab["genre"], meta["history_len"], embedding_dim, pooling=pooling,
                        shared_with="genre"),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# download / convert

def movielens_dir(data_dir: str | Path | None = None) -> Path:
    """The MovieLens folder: ``data_dir``, else ``$MTL_MOVIELENS_DIR``, else ``data/movielens``."""
    return Path(data_dir or os.environ.get(MOVIELENS_ENV) or Path("data") / "movielens")


def download_movielens(out_dir: str | Path, datasets: Sequence[str] = DATASETS, base_url: str = BASE_URL,
                       sha256: dict[str, str | None] | None = None, history_len: int = 50
                       ) -> dict[str, dict[str, Path]]:
    """Fetch GroupLens' archives into ``out_dir`` (SHA-256 checked) and convert each into ``out_dir/ml-<name>/``.

    ``sha256`` overrides the pinned checksum per data set (``None``: no check). Returns data set -> split -> path.
    """
    from .download import fetch

    out_dir = Path(out_dir)
    written = {}
    for dataset in datasets:
        if dataset not in ARCHIVES:
            raise ValueError(f"unknown MovieLens data set {dataset!r}; choose from {', '.join(DATASETS)}")
        archive, digest = ARCHIVES[dataset]
        if sha256 is not None and dataset in sha256:
            digest = sha256[dataset]
        source = fetch(base_url.rstrip("/") + "/" + archive, out_dir / archive, digest)
        written[dataset] = prepare_movielens(source, out_dir / FOLDERS[dataset], history_len=history_len)[0]
    return written


def convert_movielens(source: str | Path, out_dir: str | Path, history_len: int = 50
                      ) -> dict[str, dict[str, Path]]:
    """Convert what ``source`` holds: an archive, an extracted ``ml-1m``/``ml-100k`` folder, or a folder holding the
    archives (or extracted folders), as ``download`` leaves it. Each data set goes to ``out_dir/ml-<name>/``."""
    source = Path(source)
    candidates = [source]
    if source.is_dir() and not any((source / files[0]).is_file() for files in FILES.values()):
        candidates = [source / archive for archive, _ in ARCHIVES.values() if (source / archive).is_file()]
        candidates += [source / folder for folder in FOLDERS.values()
                       if any((source / folder / files[0]).is_file() for files in FILES.values())]
        if not candidates:
            raise ValueError(f"{source}: holds no MovieLens data (ml-1m.zip, ml-100k.zip, or the files ratings.dat / "
                             f"u.data); get it with: python -m datamodules.movielens download {source}")
    written: dict[str, dict[str, Path]] = {}
    for candidate in candidates:
        dataset = _detect(candidate)[0]
        if dataset in written:
            continue  # both the archive and its extracted folder: the first one found
        written[dataset] = prepare_movielens(candidate, Path(out_dir) / FOLDERS[dataset], history_len=history_len)[0]
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m datamodules.movielens download DIR`` / ``convert SOURCE DIR``."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.movielens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="fetch GroupLens' archives and write the Parquet splits")
    download.add_argument("out_dir", type=Path)
    download.add_argument("--dataset", nargs="+", choices=DATASETS, default=list(DATASETS))
    download.add_argument("--base-url", default=BASE_URL, help="folder URL holding ml-1m.zip / ml-100k.zip "
                                                               "(https://, or file:///folder/ for copies you have)")
    download.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (with one --dataset only)")
    convert = commands.add_parser("convert", help="write the Parquet splits from archives or folders you have")
    convert.add_argument("source", type=Path, help="ml-1m.zip, ml-100k.zip, an extracted folder, or a folder of them")
    convert.add_argument("out_dir", type=Path)
    for command in (download, convert):
        command.add_argument("--history", type=int, default=50, help="longest history kept (default 50)")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            if args.sha256 is not None and len(args.dataset) != 1:
                raise ValueError("--sha256 needs exactly one --dataset")
            sha256 = None if args.sha256 is None else {args.dataset[0]: args.sha256}
            written = download_movielens(args.out_dir, args.dataset, args.base_url, sha256, args.history)
        else:
            written = convert_movielens(args.source, args.out_dir, args.history)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for dataset, paths in written.items():
        for split_name, path in paths.items():
            print(f"ml-{dataset} {split_name}: {path}")
    print("tasks: like (rating >= 4), rating (regression); features: "
          "datamodules.movielens.movielens_features(<folder>)")


if __name__ == "__main__":
    main()
