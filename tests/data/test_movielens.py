"""MovieLens (datamodules/movielens.py) on tiny fixtures written here in GroupLens' exact formats: histories,
split and labels against hand-computed values; the download's checksum; bad input named by file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datamodules import ParquetDataModule
from datamodules.download import sha256_of
from datamodules.movielens import (
    GENRE_IDS, convert_movielens, history_positions, main, movielens_features, movielens_tasks, prepare_movielens,
)

# ML-1M: UserID::MovieID::Rating::Timestamp; user 1 rates movies 2 and 3 in the same second (200)
RATINGS_1M = [(1, 1, 5, 100), (2, 5, 1, 150), (1, 3, 3, 200), (1, 2, 4, 200), (1, 5, 2, 300), (2, 1, 4, 400),
              (3, 2, 5, 500), (4, 3, 4, 600), (1, 10, 4, 900), (3, 10, 3, 950)]
MOVIES_1M = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure|Children's|Fantasy",
             "3::Café au lait (1993)::Comedy|Drama", "5::Heat (1995)::Action|Crime|Thriller",
             "10::A Film Without Year::Drama"]
USERS_1M = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117-1234", "4::F::45::7::02460"]


def _write_1m(folder: Path, ratings=RATINGS_1M, movies=MOVIES_1M, users=USERS_1M) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join("::".join(map(str, r)) + "\n" for r in ratings))
    (folder / "movies.dat").write_bytes("".join(m + "\n" for m in movies).encode("latin-1"))
    (folder / "users.dat").write_text("".join(u + "\n" for u in users))
    return folder


def _flags(*genres: str) -> str:
    names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    return "|".join("1" if n in genres else "0" for n in names)


def _write_100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("1\t1\t5\t10\n1\t2\t3\t20\n2\t267\t4\t30\n1\t4\t2\t40\n3\t1\t4\t50\n2\t1\t1\t60\n")
    children = "Children's"
    items = [f"1|Toy Story (1995)|01-Jan-1995||http://x/Toy%20Story|{_flags('Animation', children, 'Comedy')}",
             f"2|GoldenEye (1995)|01-Jan-1995||http://x/GoldenEye|{_flags('Action', 'Adventure', 'Thriller')}",
             f"4|Un été (1990)|01-Jan-1990||http://x/ete|{_flags()}",  # no genre flag at all
             f"267|unknown||||{_flags('unknown')}"]
    (folder / "u.item").write_bytes("".join(i + "\n" for i in items).encode("latin-1"))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|writer|T8H1N\n")
    return folder


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for file in sorted(folder.iterdir()):
            out.write(file, f"{folder.name}/{file.name}")
    return archive


def _lists(table, column: str) -> list[list[int]]:
    return table.column(column).to_pylist()


def test_ml_1m_histories_split_and_labels_as_computed_by_hand(tmp_path):
    paths, features, tasks = prepare_movielens(_write_1m(tmp_path / "ml-1m"), tmp_path / "out")
    train, val, test = (pq.read_table(paths[s]) for s in ("train", "val", "test"))
    # sorted timestamps 100 150 200 200 300 400 500 600 900 950: t_val = 10th * 0.8 -> index 8 = 900, t_test = 950
    assert (train.num_rows, val.num_rows, test.num_rows) == (8, 1, 1)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["t_val"], meta["t_test"]) == (900, 950)
    # train in time order (timestamp, user, movie); the tie at 200 puts movie 2 before movie 3
    assert train.column("user_id").to_pylist() == [1, 2, 1, 1, 1, 2, 3, 4]
    assert train.column("movie_id").to_pylist() == [1, 5, 2, 3, 5, 1, 2, 3]
    assert train.column("rating").to_pylist() == [5, 1, 4, 3, 2, 4, 5, 4]
    assert train.column("like").to_pylist() == [1, 0, 1, 0, 0, 1, 1, 1]
    # histories: the user's earlier ratings, newest first, never the current one
    assert _lists(train, "hist_movie") == [[], [], [1], [2, 1], [3, 2, 1], [5], [], []]
    genre = {1: GENRE_IDS["Animation"], 2: GENRE_IDS["Adventure"], 3: GENRE_IDS["Comedy"], 5: GENRE_IDS["Action"],
             10: GENRE_IDS["Drama"]}
    assert _lists(train, "hist_genre") == [[genre[m] for m in h] for h in _lists(train, "hist_movie")]
    assert _lists(val, "hist_movie") == [[5, 3, 2, 1]]  # spans the split boundary
    assert _lists(val, "hist_genre") == [[1, 5, 2, 3]]
    assert _lists(test, "hist_movie") == [[2]] and test.column("user_id").to_pylist() == [3]
    # candidate features
    assert train.column("genre").to_pylist() == [genre[m] for m in [1, 5, 2, 3, 5, 1, 2, 3]]
    assert _lists(train, "genres")[0] == [GENRE_IDS["Animation"], GENRE_IDS["Children's"], GENRE_IDS["Comedy"]]
    # year: train rows have 6 x 1995 and 2 x 1993: mean 1994.5, std sqrt(0.75); movie 10 has none -> 0
    np.testing.assert_allclose(train.column("year").to_numpy()[:4], [0.5 / 0.75 ** 0.5] * 3 + [-1.5 / 0.75 ** 0.5],
                               rtol=1e-6)
    assert val.column("year").to_pylist() == [0.0]
    # user features: gender F=1/M=2, age group ids, occupation code + 1, zip prefix numbered in sorted order
    users = {u: i for i, u in enumerate(train.column("user_id").to_pylist())}
    row = lambda column, user: train.column(column).to_pylist()[users[user]]  # noqa: E731
    assert [row("gender", u) for u in (1, 2, 3, 4)] == [1, 2, 2, 1]
    assert [row("age", u) for u in (1, 2, 3, 4)] == [1, 7, 3, 5]
    assert [row("occupation", u) for u in (1, 2, 3, 4)] == [11, 17, 16, 8]
    assert meta["zip_prefix"] == ["024", "480", "551", "700"]
    assert [row("zip_prefix", u) for u in (1, 2, 3, 4)] == [2, 4, 3, 1]
    assert [t.name for t in tasks] == ["like", "rating"] and tasks[1].kind == "regression"
    assert {f.name: f.vocab_size for f in features if hasattr(f, "vocab_size")}["movie_id"] == 11

    # a shorter history keeps the most recent ratings
    short, _, _ = prepare_movielens(tmp_path / "ml-1m", tmp_path / "short", history_len=2)
    assert _lists(pq.read_table(short["train"]), "hist_movie")[4] == [3, 2]
    assert _lists(pq.read_table(short["val"]), "hist_movie") == [[5, 3]]


def test_ml_100k_formats_genre_flags_and_age_groups(tmp_path):
    paths, features, _ = prepare_movielens(_write_100k(tmp_path / "ml-100k"), tmp_path / "out")
    train, val, test = (pq.read_table(paths[s]) for s in ("train", "val", "test"))
    # timestamps 10 20 30 40 50 60: t_val = index floor(4.8) = 4 -> 50, t_test = index 5 -> 60
    assert (train.num_rows, val.num_rows, test.num_rows) == (4, 1, 1)
    assert train.column("movie_id").to_pylist() == [1, 2, 267, 4]
    assert _lists(train, "hist_movie") == [[], [1], [], [2, 1]]
    assert _lists(test, "hist_movie") == [[267]] and _lists(test, "hist_genre") == [[GENRE_IDS["unknown"]]]
    assert _lists(train, "hist_genre")[3] == [GENRE_IDS["Action"], GENRE_IDS["Animation"]]
    assert _lists(train, "genres") == [[3, 4, 5], [1, 2, 16], [19], [19]]  # no flag at all -> unknown (19)
    assert train.column("like").to_pylist() == [1, 0, 1, 0]
    # ages 24 / 53 / 17 in ML-1M's groups; occupations and zip prefixes numbered in sorted order
    assert train.column("age").to_pylist()[:3] == [2, 2, 6] and val.column("age").to_pylist() == [1]
    assert train.column("occupation").to_pylist()[:3] == [2, 2, 1] and val.column("occupation").to_pylist() == [3]
    assert val.column("zip_prefix").to_pylist() == [3]  # "T8H" after "857", "940"
    assert train.column("gender").to_pylist()[:3] == [2, 2, 1]
    # years from the release date (1995, 1995, unknown, 1990): train mean of the known ones
    years = np.array([1995, 1995, 1990.0])
    np.testing.assert_allclose(train.column("year").to_numpy(), [*((years - years.mean()) / years.std())[:2], 0.0,
                                                                 (1990 - years.mean()) / years.std()], rtol=1e-6)
    # the converted folder trains as it is: ParquetDataModule with the feature specs of meta.json
    dm = ParquetDataModule(train=paths["train"], val=paths["test"], features=features, tasks=movielens_tasks(),
                           batch_size=4, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["features"]["hist_movie"].shape == (1, 50)
    assert batch["features"]["hist_movie"][0, :3].tolist() == [267, 0, 0]  # padded with 0
    assert batch["labels"]["rating"].tolist() == [1.0] and batch["labels"]["like"].tolist() == [0.0]


def test_history_positions_handle_ties_and_truncation_without_a_loop():
    user = np.array([2, 1, 1, 1, 2])
    movie = np.array([7, 3, 9, 4, 8])
    time = np.array([5, 1, 2, 2, 5])  # user 1: movie 3, then 4 and 9 in the same second (4 first); user 2 ties too
    order, position, length = history_positions(user, movie, time, history_len=1)
    assert movie[order].tolist() == [3, 4, 9, 7, 8]
    assert length.tolist() == [0, 0, 1, 1, 1]
    assert [movie[order[p - 1]] if n else None for p, n in zip(position, length)] == [None, None, 4, 3, 7]


def test_download_checks_the_checksum_and_convert_reads_archives_and_folders(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    one = _zip(_write_1m(tmp_path / "src" / "ml-1m"), mirror / "ml-1m.zip")
    _zip(_write_100k(tmp_path / "src" / "ml-100k"), mirror / "ml-100k.zip")
    digest = sha256_of(one)
    main(["download", str(tmp_path / "data"), "--dataset", "1m", "--base-url", mirror.as_uri() + "/",
          "--sha256", digest, "--history", "3"])
    out = capsys.readouterr().out
    assert f"ml-1m train: {tmp_path / 'data' / 'ml-1m' / 'train.parquet'}" in out
    assert _lists(pq.read_table(tmp_path / "data" / "ml-1m" / "val.parquet"), "hist_movie") == [[5, 3, 2]]
    # GroupLens' own checksum is pinned: the fixture is not the real archive and is refused, leaving nothing
    with pytest.raises(SystemExit, match=r"ml-1m.zip: the SHA-256 of the file is [0-9a-f]{64}, expected a6898adb"):
        main(["download", str(tmp_path / "other"), "--dataset", "1m", "--base-url", mirror.as_uri()])
    assert not (tmp_path / "other" / "ml-1m").exists()
    with pytest.raises(SystemExit, match="--sha256 needs exactly one --dataset"):
        main(["download", str(tmp_path / "other"), "--sha256", digest])

    # convert: a folder holding both archives (as download leaves it), one archive, an extracted folder
    written = convert_movielens(mirror, tmp_path / "converted")
    assert sorted(written) == ["100k", "1m"]
    assert pq.read_table(written["100k"]["train"]).num_rows == 4
    main(["convert", str(tmp_path / "src" / "ml-100k"), str(tmp_path / "extracted")])
    assert pq.read_table(tmp_path / "extracted" / "ml-100k" / "train.parquet").equals(
        pq.read_table(written["100k"]["train"]))
    assert len(movielens_features(tmp_path / "extracted" / "ml-100k")) == 11


def test_bad_input_names_the_file(tmp_path):
    folder = _write_1m(tmp_path / "ml-1m")
    (folder / "users.dat").unlink()
    with pytest.raises(ValueError, match=r"ml-1m/users.dat: missing; a MovieLens folder needs ratings.dat"):
        prepare_movielens(folder, tmp_path / "out")

    comma = _write_1m(tmp_path / "comma", ratings=[(1, 1, 5, 100)])
    (comma / "ratings.dat").write_text("1,1,5,100\n2,5,1,150\n")
    with pytest.raises(ValueError, match=r"comma/ratings.dat: not in GroupLens' format, expected lines "
                                         r"UserID::MovieID::Rating::Timestamp"):
        prepare_movielens(comma, tmp_path / "out")

    unknown = _write_1m(tmp_path / "unknown", ratings=[*RATINGS_1M, (1, 99, 4, 990)])
    with pytest.raises(ValueError, match=r"unknown/ratings.dat: 1 movie ids are not in .*unknown/movies.dat"):
        prepare_movielens(unknown, tmp_path / "out")

    genre = _write_1m(tmp_path / "genre", movies=[*MOVIES_1M[:4], "10::A Film (1990)::Drama|Noir"])
    with pytest.raises(ValueError, match=r"genre/movies.dat: unknown genre 'Noir'"):
        prepare_movielens(genre, tmp_path / "out")

    stars = _write_1m(tmp_path / "stars", ratings=[*RATINGS_1M, (1, 10, 6, 990)])
    with pytest.raises(ValueError, match=r"stars/ratings.dat: ratings must be 1..5, found 1..6"):
        prepare_movielens(stars, tmp_path / "out")

    age = _write_1m(tmp_path / "age", users=[*USERS_1M[:3], "4::F::44::7::02460"])
    with pytest.raises(ValueError, match=r"age/users.dat: Age must be one of ML-1M's codes"):
        prepare_movielens(age, tmp_path / "out")

    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(ValueError, match=r"notzip.zip: not a zip archive"):
        prepare_movielens(tmp_path / "notzip.zip", tmp_path / "out")
    with pytest.raises(SystemExit, match=r"empty: holds no MovieLens data .*download"):
        (tmp_path / "empty").mkdir()
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    one_second = _write_1m(tmp_path / "one_second", ratings=[(1, 1, 5, 100), (2, 5, 1, 100)])
    with pytest.raises(ValueError, match=r"one_second: the train split is empty"):
        prepare_movielens(one_second, tmp_path / "out")
