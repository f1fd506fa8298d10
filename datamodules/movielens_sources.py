"""MovieLens' raw files: where GroupLens publishes them, their checksums, and reading them.

The part of ``datamodules.movielens`` that knows GroupLens' archives and
formats: their URL and pinned SHA-256 (``datamodules.download`` fetches and
checks them), the genre, age and occupation codes, and :func:`load_movielens`,
which reads an archive or an extracted folder of either release into whole
columns, refusing malformed files with errors that name the file. The
conversion into Parquet with histories is ``datamodules.movielens``, which
re-exports the public names of this module.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
# SHA-256 of GroupLens' archives (the files have not changed since their release: ML-100K 1998, ML-1M 2003).
# GroupLens publishes MD5s beside them (ml-1m.zip.md5: c4d9eecfca2ab87c1945afe126590906, ml-100k.zip.md5:
# 0e33842e24a9c977be4e0107933c0723); the SHA-256 below are those of the archives with those MD5s (5,917,549 and
# 4,924,029 bytes), as recorded by TensorFlow Datasets' url_checksums/movielens.txt and other public projects.
ARCHIVES = {  # dataset -> (archive name, SHA-256)
    "1m": ("ml-1m.zip", "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"),
    "100k": ("ml-100k.zip", "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"),
}
DATASETS = tuple(ARCHIVES)
FOLDERS = {"1m": "ml-1m", "100k": "ml-100k"}  # the archives' top folder, and the output folder's name
FILES = {"1m": ("ratings.dat", "movies.dat", "users.dat"), "100k": ("u.data", "u.item", "u.user")}

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "unknown")
GENRE_IDS = {name: i + 1 for i, name in enumerate(GENRES)}  # 1..19; 0 is padding
UNKNOWN_GENRE = GENRE_IDS["unknown"]
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ML-1M's age codes: the lower bound of each group
AGE_NAMES = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
OCCUPATIONS_1M = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)


@dataclass
class _Ratings:
    """The raw data of one MovieLens release as whole columns."""

    user: np.ndarray  # int64 (n,)
    movie: np.ndarray  # int64 (n,)
    rating: np.ndarray  # int64 (n,)
    timestamp: np.ndarray  # int64 (n,)
    users: np.ndarray  # int64: the user ids of the users file
    movies: np.ndarray  # int64: the movie ids of the movies file
    user_columns: dict[str, np.ndarray]  # name -> int64 (max_user + 1,), indexed by user id
    movie_genres: pa.ListArray  # (max_movie + 1,) lists of genre ids, indexed by movie id
    movie_year: np.ndarray  # float64 (max_movie + 1,), NaN = unknown
    vocabularies: dict[str, list[str]]  # occupation / zip_prefix names, in id order (id = index + 1)


# ---------------------------------------------------------------------------------------------------------------------
# reading GroupLens' files

def _read_table(raw: bytes, name: str, columns: Sequence[str], types: dict[str, pa.DataType], separator: str,
                expected: str, encoding: str = "utf-8") -> pa.Table:
    """One GroupLens text file (``separator`` between fields, no header, no quoting) as a table; errors name the file."""
    if not raw.strip():
        raise ValueError(f"{name}: the file is empty; expected lines {expected}")
    text = raw.decode(encoding)
    if len(separator) > 1:  # pyarrow splits on one character; ML-1M uses "::", which no field contains
        if "\t" in text:
            raise ValueError(f"{name}: unexpected tab character; expected lines {expected}")
        text = text.replace(separator, "\t")
        separator = "\t"
    try:
        return pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(column_names=list(columns)),
            parse_options=pacsv.ParseOptions(delimiter=separator, quote_char=False, escape_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False, null_values=[]),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        message = str(error).splitlines()[0]
        raise ValueError(f"{name}: not in GroupLens' format, expected lines {expected} ({message})") from None


def _ids(table: pa.Table, column: str, name: str) -> np.ndarray:
    values = table.column(column).to_numpy().astype(np.int64)
    if values.size and values.min() < 1:
        raise ValueError(f"{name}: column {column!r} holds ids < 1 (min {values.min()}); GroupLens' ids start at 1")
    return values


def _unique_ids(values: np.ndarray, column: str, name: str) -> None:
    if np.unique(values).size != values.size:
        raise ValueError(f"{name}: {column} is not unique (a line per {column} is expected)")


def _by_id(ids: np.ndarray, values: np.ndarray, size: int, fill: float | int = 0) -> np.ndarray:
    """An array indexed by id: ``out[ids] = values``, ``fill`` elsewhere."""
    out = np.full(size, fill, dtype=values.dtype if np.issubdtype(values.dtype, np.floating) else np.int64)
    out[ids] = values
    return out


def _numbered(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Strings -> ids 1..n in sorted order of the distinct values; returns the ids and the names in id order."""
    names, inverse = np.unique(values.astype(str), return_inverse=True)
    return inverse.astype(np.int64) + 1, [str(n) for n in names]


def _year_from_title(titles: np.ndarray) -> np.ndarray:
    """The ``(YYYY)`` at the end of each title as float, NaN where there is none."""
    import pandas as pd

    years = pd.Series(titles, dtype=object).str.extract(r"\((\d{4})\)\s*$", expand=False)
    return pd.to_numeric(years, errors="coerce").to_numpy(np.float64)


def _genre_lists(offsets: np.ndarray, values: np.ndarray, movie_ids: np.ndarray, size: int) -> pa.ListArray:
    """Per-movie genre lists (``offsets``/``values`` in the order of ``movie_ids``) -> lists indexed by movie id."""
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))
    position = np.full(size, -1, dtype=np.int64)
    position[movie_ids] = np.arange(movie_ids.size)
    empty = pa.array([[]], pa.list_(pa.int64()))
    return pa.concat_arrays([lists, empty]).take(pa.array(np.where(position < 0, len(lists), position)))


def _check_ratings(user: np.ndarray, movie: np.ndarray, rating: np.ndarray, users: np.ndarray, movies: np.ndarray,
                   names: tuple[str, str, str]) -> None:
    ratings_name, movies_name, users_name = names
    if rating.size == 0:
        raise ValueError(f"{ratings_name}: no ratings")
    if rating.min() < 1 or rating.max() > 5:
        raise ValueError(f"{ratings_name}: ratings must be 1..5, found {rating.min()}..{rating.max()}")
    unknown_users = np.setdiff1d(user, users)
    if unknown_users.size:
        raise ValueError(f"{ratings_name}: {unknown_users.size} user ids are not in {users_name} "
                         f"(e.g. {unknown_users[:5].tolist()})")
    unknown_movies = np.setdiff1d(movie, movies)
    if unknown_movies.size:
        raise ValueError(f"{ratings_name}: {unknown_movies.size} movie ids are not in {movies_name} "
                         f"(e.g. {unknown_movies[:5].tolist()})")


def _zip_prefixes(zips: np.ndarray, zip_prefix_len: int) -> np.ndarray:
    return np.array([z.strip().upper()[:zip_prefix_len] for z in zips.astype(str)], dtype=object)


def _load_1m(read: dict[str, bytes], names: dict[str, str], zip_prefix_len: int) -> _Ratings:
    int64, string = pa.int64(), pa.string()
    ratings = _read_table(read["ratings.dat"], names["ratings.dat"], ("user", "movie", "rating", "timestamp"),
                          dict.fromkeys(("user", "movie", "rating", "timestamp"), int64), "::",
                          "UserID::MovieID::Rating::Timestamp")
    movies = _read_table(read["movies.dat"], names["movies.dat"], ("movie", "title", "genres"),
                         {"movie": int64, "title": string, "genres": string}, "::",
                         "MovieID::Title (Year)::Genre|Genre (latin-1)", encoding="latin-1")
    users = _read_table(read["users.dat"], names["users.dat"], ("user", "gender", "age", "occupation", "zip"),
                        {"user": int64, "gender": string, "age": int64, "occupation": int64, "zip": string}, "::",
                        "UserID::Gender::Age::Occupation::Zip-code")
    user_ids, movie_ids = _ids(users, "user", names["users.dat"]), _ids(movies, "movie", names["movies.dat"])
    _unique_ids(user_ids, "UserID", names["users.dat"])
    _unique_ids(movie_ids, "MovieID", names["movies.dat"])

    gender_text = users.column("gender").to_numpy(zero_copy_only=False).astype(str)
    bad = ~np.isin(gender_text, ("F", "M"))
    if bad.any():
        raise ValueError(f"{names['users.dat']}: Gender must be F or M, found {gender_text[bad][0]!r}")
    age = users.column("age").to_numpy()
    bad = ~np.isin(age, AGE_GROUPS)
    if bad.any():
        raise ValueError(f"{names['users.dat']}: Age must be one of ML-1M's codes {AGE_GROUPS}, found {age[bad][0]}")
    occupation = users.column("occupation").to_numpy()
    bad = (occupation < 0) | (occupation >= len(OCCUPATIONS_1M))
    if bad.any():
        raise ValueError(f"{names['users.dat']}: Occupation must be 0..{len(OCCUPATIONS_1M) - 1}, "
                         f"found {occupation[bad][0]}")
    zip_ids, zip_names = _numbered(_zip_prefixes(users.column("zip").to_numpy(zero_copy_only=False), zip_prefix_len))
    user_size = int(user_ids.max()) + 1
    user_columns = {
        "gender": _by_id(user_ids, np.where(gender_text == "F", 1, 2), user_size),
        "age": _by_id(user_ids, np.searchsorted(AGE_GROUPS, age) + 1, user_size),
        "occupation": _by_id(user_ids, occupation.astype(np.int64) + 1, user_size),
        "zip_prefix": _by_id(user_ids, zip_ids, user_size),
    }

    genre_strings = movies.column("genres").to_numpy(zero_copy_only=False).astype(str)
    split = pc.split_pattern(pa.array(genre_strings), "|")
    flat = np.asarray(split.flatten().to_numpy(zero_copy_only=False), dtype=object)
    known = np.isin(flat, GENRES[:-1])
    if not known.all():
        raise ValueError(f"{names['movies.dat']}: unknown genre {flat[~known][0]!r}; expected '|'-separated names "
                         f"of {', '.join(GENRES[:-1])}")
    names_found, inverse = np.unique(flat.astype(str), return_inverse=True)
    genre_values = np.array([GENRE_IDS[g] for g in names_found], dtype=np.int64)[inverse]
    movie_size = int(movie_ids.max()) + 1
    return _Ratings(
        user=_ids(ratings, "user", names["ratings.dat"]),
        movie=_ids(ratings, "movie", names["ratings.dat"]),
        rating=ratings.column("rating").to_numpy().astype(np.int64),
        timestamp=ratings.column("timestamp").to_numpy().astype(np.int64),
        users=user_ids,
        movies=movie_ids,
        user_columns=user_columns,
        movie_genres=_genre_lists(split.offsets.to_numpy(), genre_values, movie_ids, movie_size),
        movie_year=_by_id(movie_ids, _year_from_title(movies.column("title").to_numpy(zero_copy_only=False)),
                          movie_size, fill=np.nan),
        vocabularies={"occupation": list(OCCUPATIONS_1M), "zip_prefix": zip_names},
    )


def _load_100k(read: dict[str, bytes], names: dict[str, str], zip_prefix_len: int) -> _Ratings:
    int64, string = pa.int64(), pa.string()
    ratings = _read_table(read["u.data"], names["u.data"], ("user", "movie", "rating", "timestamp"),
                          dict.fromkeys(("user", "movie", "rating", "timestamp"), int64), "\t",
                          "user id<TAB>item id<TAB>rating<TAB>timestamp")
    flags = ["unknown"] + list(GENRES[:-1])  # u.item's 19 genre flags, in its order
    item_columns = ["movie", "title", "release_date", "video_release_date", "url"] + [f"g{i}" for i in range(19)]
    items = _read_table(read["u.item"], names["u.item"], item_columns,
                        {"movie": int64, **{c: string for c in item_columns[1:5]},
                         **{f"g{i}": int64 for i in range(19)}}, "|",
                        "movie id|title|release date|video release date|IMDb URL|19 genre flags 0/1 (latin-1)",
                        encoding="latin-1")
    users = _read_table(read["u.user"], names["u.user"], ("user", "age", "gender", "occupation", "zip"),
                        {"user": int64, "age": int64, "gender": string, "occupation": string, "zip": string}, "|",
                        "user id|age|gender|occupation|zip code")
    user_ids, movie_ids = _ids(users, "user", names["u.user"]), _ids(items, "movie", names["u.item"])
    _unique_ids(user_ids, "user id", names["u.user"])
    _unique_ids(movie_ids, "movie id", names["u.item"])

    gender_text = users.column("gender").to_numpy(zero_copy_only=False).astype(str)
    bad = ~np.isin(gender_text, ("F", "M"))
    if bad.any():
        raise ValueError(f"{names['u.user']}: gender must be F or M, found {gender_text[bad][0]!r}")
    age = users.column("age").to_numpy()
    occupation_ids, occupation_names = _numbered(users.column("occupation").to_numpy(zero_copy_only=False))
    zip_ids, zip_names = _numbered(_zip_prefixes(users.column("zip").to_numpy(zero_copy_only=False), zip_prefix_len))
    user_size = int(user_ids.max()) + 1
    user_columns = {
        "gender": _by_id(user_ids, np.where(gender_text == "F", 1, 2), user_size),
        "age": _by_id(user_ids, np.searchsorted(AGE_GROUPS, age, side="right").clip(1, None), user_size),
        "occupation": _by_id(user_ids, occupation_ids, user_size),
        "zip_prefix": _by_id(user_ids, zip_ids, user_size),
    }

    flag_matrix = np.stack([items.column(f"g{i}").to_numpy() for i in range(19)], axis=1)  # (movies, 19)
    if not np.isin(flag_matrix, (0, 1)).all():
        raise ValueError(f"{names['u.item']}: the 19 genre flags must be 0 or 1")
    flag_ids = np.array([GENRE_IDS[g] for g in flags], dtype=np.int64)
    flag_matrix[:, 0] |= flag_matrix.sum(axis=1) == 0  # no genre at all: "unknown"
    rows, columns = np.nonzero(flag_matrix)  # row-major: each movie's genres in the file's column order
    counts = np.bincount(rows, minlength=len(movie_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    # the "unknown" flag is the file's first column but genre id 19: list the named genres first, then "unknown"
    order = np.lexsort((np.where(columns == 0, 19, columns), rows))
    genre_values = flag_ids[columns[order]]

    release = items.column("release_date").to_numpy(zero_copy_only=False).astype(str)
    year = np.array([float(r[-4:]) if re.fullmatch(r".*\d{4}", r) else np.nan for r in release])
    from_title = _year_from_title(items.column("title").to_numpy(zero_copy_only=False))
    year = np.where(np.isnan(year), from_title, year)
    movie_size = int(movie_ids.max()) + 1
    return _Ratings(
        user=_ids(ratings, "user", names["u.data"]),
        movie=_ids(ratings, "movie", names["u.data"]),
        rating=ratings.column("rating").to_numpy().astype(np.int64),
        timestamp=ratings.column("timestamp").to_numpy().astype(np.int64),
        users=user_ids,
        movies=movie_ids,
        user_columns=user_columns,
        movie_genres=_genre_lists(offsets, genre_values, movie_ids, movie_size),
        movie_year=_by_id(movie_ids, year, movie_size, fill=np.nan),
        vocabularies={"occupation": occupation_names, "zip_prefix": zip_names},
    )


def _detect(source: Path) -> tuple[str, dict[str, bytes], dict[str, str]]:
    """The data set in ``source`` (an archive, or a folder of the extracted files) and its three files' bytes."""
    if source.is_file():
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            raise ValueError(f"{source}: not a zip archive; expected GroupLens' ml-1m.zip or ml-100k.zip") from None
        with archive:
            members = {Path(m).name: m for m in archive.namelist() if not m.endswith("/")}
            for dataset, files in FILES.items():
                if files[0] in members:
                    missing = [f for f in files if f not in members]
                    if missing:
                        raise ValueError(f"{source}: the archive has no {missing[0]} (expected {', '.join(files)})")
                    return (dataset, {f: archive.read(members[f]) for f in files},
                            {f: f"{source}:{members[f]}" for f in files})
        raise ValueError(f"{source}: holds neither ratings.dat (ML-1M) nor u.data (ML-100K)")
    if not source.is_dir():
        raise ValueError(f"{source}: no such file or folder")
    for dataset, files in FILES.items():
        if (source / files[0]).is_file():
            missing = [source / f for f in files if not (source / f).is_file()]
            if missing:
                raise ValueError(f"{missing[0]}: missing; a MovieLens folder needs {', '.join(files)}")
            return dataset, {f: (source / f).read_bytes() for f in files}, {f: str(source / f) for f in files}
    raise ValueError(f"{source}: holds neither ratings.dat (ML-1M) nor u.data (ML-100K), nor is it an archive")


def load_movielens(source: str | Path, zip_prefix_len: int = 3) -> tuple[str, _Ratings]:
    """Read an archive or an extracted folder; returns the data set's name (``1m`` / ``100k``) and its columns."""
    dataset, read, names = _detect(Path(source))
    loader = _load_1m if dataset == "1m" else _load_100k
    data = loader(read, names, zip_prefix_len)
    files = FILES[dataset]
    _check_ratings(data.user, data.movie, data.rating, data.users, data.movies,
                   (names[files[0]], names[files[1]], names[files[2]]))
    return dataset, data


__all__ = ["BASE_URL", "ARCHIVES", "DATASETS", "FOLDERS", "FILES", "GENRES", "GENRE_IDS", "UNKNOWN_GENRE",
           "AGE_GROUPS", "AGE_NAMES", "OCCUPATIONS_1M", "load_movielens"]
