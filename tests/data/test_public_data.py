"""Real data one command away: download (file:// URLs, checksums; no network) and the published layouts -> Parquet."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from datamodules import ParquetDataModule
from datamodules.ali_ccp import FILES as ALI_CCP_FILES, ali_ccp_tasks, convert_ali_ccp
from datamodules.ali_ccp import main as ali_ccp_main
from datamodules.aliexpress import FILES as ALIEXPRESS_FILES, aliexpress_tasks
from datamodules.aliexpress import main as aliexpress_main
from datamodules.census import CENSUS_FILE, CENSUS_SHA256, COLUMNS, DENSE, census_source
from datamodules.census import main as census_main
from datamodules.download import sha256_of


def _census_lines(n: int) -> list[str]:
    """``n`` rows in the UCI layout (comma + space separated, no header): every 3rd earns 50000+, every 2nd never married."""
    rows = []
    for i in range(n):
        values = {c: (str(i % 90) if c in DENSE else f"{c}-{i % 4}") for c in COLUMNS}
        values["income_50k"] = "50000+." if i % 3 == 0 else "- 50000."
        values["marital_stat"] = "Never married" if i % 2 == 0 else "Married-civilian spouse present"
        values["instance_weight"] = "1000.5"
        rows.append(", ".join(values[c] for c in COLUMNS))
    return rows


def test_census_download_checks_the_checksum_and_writes_the_protocol_splits(tmp_path, capsys):
    source = tmp_path / "mirror" / CENSUS_FILE
    source.parent.mkdir()
    with gzip.open(source, "wt") as out:
        out.write("\n".join(_census_lines(200)) + "\n")
    digest = sha256_of(source, gunzipped=True)
    census_main(["download", str(tmp_path / "census"), "--url", source.as_uri(), "--sha256", digest])
    assert f"MTL_CENSUS_DIR={tmp_path / 'census'} make quality" in capsys.readouterr().out
    assert census_source(tmp_path / "census") == tmp_path / "census" / CENSUS_FILE
    splits = {s: pq.read_table(tmp_path / "census" / f"{s}.parquet") for s in ("train", "val", "test")}
    assert [t.num_rows for t in splits.values()] == [100, 50, 50]  # 50 / 25 / 25 %
    order = np.random.RandomState(2024).permutation(200)  # the protocol's permutation, by hand
    train = splits["train"]
    np.testing.assert_array_equal(train.column("income").to_numpy(), (order[:100] % 3 == 0).astype(np.float32))
    np.testing.assert_array_equal(train.column("never_married").to_numpy(), (order[:100] % 2 == 0).astype(np.float32))
    assert not {"marital_stat", "income_50k", "instance_weight"} & set(train.column_names)

    # a second download of the same file finds it in place; another checksum is refused and leaves nothing behind
    with pytest.raises(SystemExit, match=f"the SHA-256 of the decompressed content is {digest}, expected 0+;"):
        census_main(["download", str(tmp_path / "other"), "--url", source.as_uri(), "--sha256", "0" * 64])
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    with pytest.raises(SystemExit, match="cannot download file://.*nothing.gz"):
        census_main(["download", str(tmp_path / "other"), "--url", (tmp_path / "nothing.gz").as_uri()])


def test_missing_census_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_CENSUS_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"python -m datamodules.census download .*empty"):
        census_source(tmp_path / "empty")
    monkeypatch.setenv("MTL_CENSUS_DIR", str(tmp_path / "from-env"))
    with pytest.raises(FileNotFoundError, match="from-env"):
        census_source()


def test_census_checksum_is_that_of_the_uci_file(shared_data):
    assert sha256_of(shared_data(f"census-income/{CENSUS_FILE}"), gunzipped=True) == CENSUS_SHA256


def test_ali_ccp_download_and_layout(tmp_path, shared_data):
    sample = shared_data("ali-ccp-sample")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, _ in ALI_CCP_FILES.values():  # the fixtures under their published names, served from file://
        shutil.copyfile(sample / f"torchrechub_{name}", mirror / name)
    ali_ccp_main(["download", str(tmp_path / "out"), "--base-url", mirror.as_uri() + "/"])  # default checksums
    train = pq.read_table(tmp_path / "out" / "train.parquet")
    assert train.num_rows == 100 and pq.read_table(tmp_path / "out" / "val.parquet").num_rows == 50
    click, purchase = train.column("click").to_numpy(), train.column("purchase").to_numpy()
    np.testing.assert_array_equal(train.column("conversion").to_numpy(), np.where(click == 1, purchase, -1))
    assert click.sum() > 0 and purchase.sum() > 0
    data = ParquetDataModule(train=tmp_path / "out" / "train.parquet", tasks=ali_ccp_tasks(), labels=["purchase"])
    features = data.prepare_features()
    assert sum(type(f).__name__ == "SparseFeature" for f in features) == 23
    assert [f.name for f in features if type(f).__name__ == "DenseFeature"] == [
        "D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
    with pytest.raises(SystemExit, match="ali_ccp_train_sample.csv: the SHA-256 of the file is"):
        (mirror / "ali_ccp_train_sample.csv").write_text("click,purchase\n0,0\n")
        ali_ccp_main(["download", str(tmp_path / "again"), "--base-url", mirror.as_uri() + "/"])


def test_aliexpress_download_and_layout(tmp_path, shared_data):
    sample = shared_data("aliexpress-sample")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, _ in ALIEXPRESS_FILES.values():
        shutil.copyfile(sample / f"fuxictr_tiny_mtl_{name}", mirror / name)
    aliexpress_main(["download", str(tmp_path / "out"), "--base-url", mirror.as_uri() + "/"])
    test = pq.read_table(tmp_path / "out" / "test.parquet")
    assert test.num_rows == 100 and test.column_names[:2] == ["search_id", "categorical_1"]
    assert test.schema.field("numerical_63").type == "float" and test.schema.field("categorical_16").type == "int64"
    click, purchase = test.column("click").to_numpy(), test.column("purchase").to_numpy()
    np.testing.assert_array_equal(test.column("conversion").to_numpy(), np.where(click == 1, purchase, -1))
    data = ParquetDataModule(train=tmp_path / "out" / "train.parquet", tasks=aliexpress_tasks(),
                             labels=["purchase"], exclude=["search_id"])
    assert len(data.prepare_features()) == 16 + 63


def test_converter_errors_name_file_column_and_problem(tmp_path):
    (tmp_path / "a.csv").write_text("click,purchase,101,D1\n0,1,3,0.5\n1,1,2,0.1\n")
    with pytest.raises(ValueError, match=r"a.csv: 1 rows have 'purchase' = 1 where 'click' = 0"):
        convert_ali_ccp(tmp_path / "a.csv", tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("click,purchase,101,D1\n0,0,x,0.5\n")
    with pytest.raises(ValueError, match=r"b.csv: column '101' must hold integer ids"):
        convert_ali_ccp(tmp_path / "b.csv", tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text("click,purchase,101,D1\n2,0,1,0.5\n")
    with pytest.raises(ValueError, match=r"c.csv: label column 'click' must hold 0/1"):
        convert_ali_ccp(tmp_path / "c.csv", tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("search_id,click\n1,0\n")
    with pytest.raises(SystemExit, match=r"d.csv: missing column\(s\) \['conversion', 'categorical_1'"):
        aliexpress_main(["convert", str(tmp_path / "d.csv"), str(tmp_path / "d.csv"), str(tmp_path / "out")])
