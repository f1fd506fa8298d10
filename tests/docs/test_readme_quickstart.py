"""The README's Python quickstart runs as written on `make demo`'s data layout and leaks no label."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from datamodules.synthetic import write_synthetic

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    section = text[text.index("## Python quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_quickstart_runs_as_written(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "data" / "synthetic", (20_000, 2_000, 1_000))  # make demo's files, fewer rows
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*like a label.*")  # no label inferred as a feature
        exec(compile(quickstart_code(), str(README), "exec"), namespace)
    names = [f.name for f in namespace["dm"].features]
    assert names == ["user_id", "item_id", "category", "city", "dense_0", "dense_1", "dense_2", "history"]
    metrics = namespace["trainer"].callback_metrics
    # the conversion task learns from features only: a leaked label would give AUC 1.0
    assert 0.55 < float(metrics["val/conversion/auc"]) < 0.95
    assert float(metrics["val/click/auc"]) > 0.6
    assert namespace["restored"].hparams.lr == 1e-3
