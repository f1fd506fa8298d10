"""The quickstart notebook is what its generator builds, and it runs end to end (small settings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
sys.path.insert(0, str(ROOT / "notebooks"))
import make_quickstart  # noqa: E402

SMALL = "TRAIN_ROWS, VAL_ROWS = 6_000, 2_000\nEPOCHS = 2\nBATCH_SIZE = 250\nWORKDIR = 'quickstart_run'"

# appended by the test: what the notebook computed, as JSON on stdout
REPORT = """\
import json
print(json.dumps({
    "runs": list(runs),
    "auc_points": {name: len(tags["val/click/auc"]) for name, tags in logs.items()},
    "gradnorm_weights": {t.name: logs["MMoE + GradNorm"][f"train/{t.name}/weight"].value.tolist() for t in tasks},
    "table": table.round(6).fillna(-1).to_dict(),
}))"""


def _cells(notebook) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in notebook.cells]


def test_committed_notebook_is_the_generated_one():
    assert _cells(nbformat.read(NOTEBOOK, as_version=4)) == _cells(make_quickstart.build()), (
        "notebooks/quickstart.ipynb is stale: run .venv/bin/python notebooks/make_quickstart.py"
    )


def test_committed_notebook_is_executed_with_its_figures():
    """A reader of the repository (and of the docs) sees the outputs: every code cell ran, in order, without an
    error; the AUC curves and GradNorm's weights are there, and docs/images/ holds the same two figures."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        "notebooks/quickstart.ipynb is not executed: run .venv/bin/python notebooks/make_quickstart.py")
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]  # no machine paths
    assert make_quickstart.figures(notebook) == [path.read_bytes() for path in make_quickstart.FIGURES]
    for png in make_quickstart.figures(notebook):
        assert png.startswith(b"\x89PNG") and len(png) > 10_000  # a real plot, not an empty canvas
    table = next(o for o in code[-1].outputs if o.output_type == "execute_result")
    assert "MMoE + GradNorm" in table["data"]["text/plain"] and "ESCM²-DR" in table["data"]["text/plain"]
    notebook_md = (ROOT / "docs" / "notebook.md").read_text()
    for path in make_quickstart.FIGURES:
        assert f"images/{path.name}" in notebook_md  # the docs page shows both figures


def test_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    parameters[0].source = SMALL
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT))
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the AUC curves and GradNorm's weights
    report = json.loads(notebook.cells[-1].outputs[0]["text"])
    assert report["runs"] == ["MMoE", "MMoE + GradNorm", "ESCM²-DR"]
    # one validation point per epoch (Lightning's sanity check is not logged), read back from the event files
    assert report["auc_points"] == {name: 2 for name in report["runs"]}
    for name in report["runs"]:
        assert 0.65 < report["table"]["val/click/auc"][name] < 1.0  # every model learned the click signal (0.5: none)
        assert 0.0 < report["table"]["val/click/gauc"][name] < 1.0
    assert report["table"]["val/dwell/mse"]["ESCM²-DR"] == -1 and report["table"]["val/purchase/auc"]["ESCM²-DR"] > 0.5
    # GradNorm's weights, read back from the event files: one per step, moved away from 1, always summing to 3
    weights = report["gradnorm_weights"]
    steps = 2 * 6_000 // 250
    assert all(len(w) == steps for w in weights.values())
    assert all(abs(sum(w[i] for w in weights.values()) - 3.0) < 1e-4 for i in range(steps))
    assert max(abs(w[-1] - 1.0) for w in weights.values()) > 0.05
    assert (tmp_path / "quickstart_run" / "runs" / "mmoe" / "version_0").is_dir()
