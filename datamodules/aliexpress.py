"""AliExpress (the PLE/AITM data sets, MTReclib layout) as Parquet.

Layout (MTReclib's CSVs per country, e.g. ``AliExpress_NL/train.csv``):
``search_id``, ``categorical_1`` .. ``categorical_16`` (integer ids),
``numerical_1`` .. ``numerical_63``, ``click`` and ``conversion`` (a purchase
over every impression; it implies a click). The converted Parquet keeps
``search_id`` (an int64 key, e.g. ``ParquetDataModule(group="search_id")``;
not a feature: list it in ``exclude``), the ids as int64, the numbers as
float32, and the labels ``click``, ``conversion`` (purchase given click; ``-1``
on rows without a click) and ``purchase`` (the published ``conversion``), see
``datamodules.csv_convert``.

    python -m datamodules.aliexpress download data/aliexpress     # FuxiCTR's 100+100-row tiny_mtl sample
    python -m datamodules.aliexpress convert train.csv test.csv data/aliexpress   # MTReclib CSVs you have

``download`` fetches the public tiny sample (a format sample) at a pinned
commit, checking each file's SHA-256; the full data sets are on Tianchi
(sign-in required): download a country's ``train.csv``/``test.csv`` and
``convert`` them.
"""

from __future__ import annotations

from pathlib import Path

from mtl_lightning.tasks import Task

from .csv_convert import convert_csv, sample_main

BASE_URL = "https://raw.githubusercontent.com/reczoo/FuxiCTR/9200900dcba4931381332bc9439f4e3b89ea533a/data/tiny_mtl/"
FILES = {  # split -> (published name, SHA-256)
    "train": ("train.csv", "6f260d3492b1d262c35aba442a3cd7663d4ab2820a65bad717ad3802d113899d"),
    "test": ("test.csv", "40d83af4118b5bafd317f066bd1a73ea290aa7d1f1b227af4d3aad0e599f15cc"),
}
SPARSE = [f"categorical_{i}" for i in range(1, 17)]
DENSE = [f"numerical_{i}" for i in range(1, 64)]


def aliexpress_tasks() -> list[Task]:
    return [Task("click"), Task("conversion")]


def convert_aliexpress(source: str | Path, target: str | Path) -> Path:
    """One MTReclib CSV -> Parquet."""
    return convert_csv(source, target, "click", "conversion", sparse=SPARSE, dense=DENSE, keys=["search_id"])


def download_aliexpress(out_dir: str | Path, base_url: str = BASE_URL, check: bool = True) -> dict[str, Path]:
    """Fetch the sample's CSVs into ``out_dir`` (checksum-checked) and write ``{train,test}.parquet``."""
    from .download import fetch

    out_dir = Path(out_dir)
    return {split: convert_aliexpress(fetch(base_url + name, out_dir / name, digest if check else None),
                                      out_dir / f"{split}.parquet")
            for split, (name, digest) in FILES.items()}


def main(argv: list[str] | None = None) -> None:
    sample_main(argv, "python -m datamodules.aliexpress", __doc__, ('train', 'test'), download_aliexpress, convert_aliexpress,
                BASE_URL, download_help="fetch the public tiny sample and convert it",
                base_url_help="folder URL holding train.csv and test.csv",
                convert_help="convert MTReclib train/test CSVs")


if __name__ == "__main__":
    main()
