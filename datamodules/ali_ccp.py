"""Ali-CCP (Ma et al., SIGIR 2018, the ESMM data set) in the published CSV layout, as Parquet.

Layout (as torch-rechub publishes it, already label-encoded): ``click``,
``purchase`` (click and conversion), 23 sparse id fields named by their Ali-CCP
field id (``101``, ``121``, ... ``109_14``) and 8 dense fields whose names start
with ``D`` (``D109_14`` ...). The converted Parquet has the sparse fields as
int64 ids, the dense ones as float32, and the labels ``click``, ``conversion``
(purchase given click; ``-1`` on rows without a click) and ``purchase``
(``datamodules.csv_convert``), ready for ESMM/ESCM (``click_task="click"``,
``conversion_task="conversion"``, ``ctcvr_task="purchase"``).

    python -m datamodules.ali_ccp download data/ali_ccp            # torch-rechub's 100/50/50-row sample
    python -m datamodules.ali_ccp convert train.csv val.csv test.csv data/ali_ccp   # CSVs you have

``download`` fetches the public sample (a format sample, far too small for a
quality number) at a pinned commit, checking each file's SHA-256. The full data
set is Alibaba's, downloaded from Tianchi after signing in; pre-process it to
this layout (torch-rechub's script) and ``convert`` it.
"""

from __future__ import annotations

from pathlib import Path

from mtl_lightning.tasks import Task

from .csv_convert import convert_csv, sample_main

BASE_URL = ("https://raw.githubusercontent.com/datawhalechina/torch-rechub/"
            "3fee06ec467104b6b7246152c267aabd5a5202bf/examples/ranking/data/ali-ccp/")
FILES = {  # split -> (published name, SHA-256)
    "train": ("ali_ccp_train_sample.csv", "1c1d125bcdfca70c8f5ed24f6221acadab3e19b70e0b06b3eb3adb2af7a0f9b5"),
    "val": ("ali_ccp_val_sample.csv", "1236e1504b76bf7ceb48dbe3d999ae8b49f61fcda2d684578320fd9fc7821104"),
    "test": ("ali_ccp_test_sample.csv", "9764a9b8e53b25f85c00e08a89f65ecfadab100cb0834161bd7ef671b7702a09"),
}
LABELS = ("click", "purchase")


def ali_ccp_tasks() -> list[Task]:
    return [Task("click"), Task("conversion")]


def convert_ali_ccp(source: str | Path, target: str | Path) -> Path:
    """One CSV of the published layout -> Parquet; the fields are read from its header."""
    import pyarrow.csv as pacsv

    names = pacsv.open_csv(source).schema.names
    fields = [n for n in names if n not in LABELS]
    return convert_csv(source, target, "click", "purchase", sparse=[n for n in fields if not n.startswith("D")],
                       dense=[n for n in fields if n.startswith("D")])


def download_ali_ccp(out_dir: str | Path, base_url: str = BASE_URL, check: bool = True) -> dict[str, Path]:
    """Fetch the sample's CSVs into ``out_dir`` (checksum-checked) and write ``{train,val,test}.parquet``."""
    from .download import fetch

    out_dir = Path(out_dir)
    return {split: convert_ali_ccp(fetch(base_url + name, out_dir / name, digest if check else None),
                                   out_dir / f"{split}.parquet")
            for split, (name, digest) in FILES.items()}


def main(argv: list[str] | None = None) -> None:
    sample_main(argv, "python -m datamodules.ali_ccp", __doc__, ('train', 'val', 'test'), download_ali_ccp, convert_ali_ccp,
                BASE_URL, download_help="fetch the public sample and convert it",
                base_url_help="folder URL holding the published file names",
                convert_help="convert train/val/test CSVs of the published layout")


if __name__ == "__main__":
    main()
