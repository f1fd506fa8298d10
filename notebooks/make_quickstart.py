"""Build ``notebooks/quickstart.ipynb`` from the cells below and execute it (run it after editing them).

    .venv/bin/python notebooks/make_quickstart.py              # build and execute (a few minutes on 2 CPU cores)
    .venv/bin/python notebooks/make_quickstart.py --no-execute # build only, without outputs

The notebook is committed executed, so a reader of the repository sees its tables and plots; its two figures
are also written to ``docs/images/`` for the documentation site. It runs in a temporary folder (its data and
TensorBoard logs are not kept), and stderr outputs (warnings naming this machine's paths) are dropped.
``tests/docs/test_notebook.py`` checks that the committed notebook is what this script builds, that it carries its
outputs and figures (the same as ``docs/images/``), then executes it with small settings.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PATH = Path(__file__).with_name("quickstart.ipynb")
ROOT = Path(__file__).resolve().parents[1]
FIGURES = [ROOT / "docs" / "images" / "quickstart-auc.png", ROOT / "docs" / "images" / "quickstart-gradnorm.png"]

CELLS: list[tuple[str, str, list[str]]] = [
    ("markdown", """\
# mtl-lightning quickstart

This notebook writes the synthetic multi-task dataset, trains a few models with
an ordinary `lightning.Trainer`, reads the per-task validation curves back from
the TensorBoard logs, and compares the models in a table.

* **MMoE** on `click`, `conversion` (given a click) and `dwell` (regression);
* **MMoE with GradNorm** (Chen et al., ICML 2018): the task weights are learned, and we plot them over steps;
* **ESCM²-DR** (Wang et al., SIGIR 2022): `click`, `conversion` and `purchase` (= click and conversion) over
  the entire impression space, the conversion task trained with the doubly robust counterfactual loss;

Every run logs `val/<task>/auc`, `val/<task>/gauc` (group AUC per user),
`val/<task>/logloss`, `train/<task>/loss` and `train/<task>/weight` to TensorBoard.
The same runs are one command each with the CLI, e.g. `mtl-lightning fit --config configs/base.yaml --config configs/data/synthetic.yaml --config configs/mmoe.yaml`.""", []),
    ("code", """\
# Settings (the test suite runs this notebook with smaller ones)
TRAIN_ROWS, VAL_ROWS = 50_000, 10_000
EPOCHS = 4
BATCH_SIZE = 1024
WORKDIR = "quickstart_run\"""", ["parameters"]),
    ("code", """\
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import pandas as pd
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_tasks, write_synthetic
from mtl_lightning import MultiTaskLightningModule, Task, registry

torch.set_num_threads(2)
workdir = Path(WORKDIR)
paths = write_synthetic(workdir / "data", (TRAIN_ROWS, VAL_ROWS, VAL_ROWS))
tasks = synthetic_tasks()  # click (binary), conversion (binary, -1 where not clicked), dwell (regression)
LABELS = ["click", "conversion", "purchase", "dwell"]  # label columns: never features
pd.read_parquet(paths["train"]).head()""", []),
    ("markdown", """\
## Train

`train()` builds the data module (feature specs are inferred from the Parquet
schema; `group="user_id"` turns on group AUC), an architecture from the
registry, and the training module; it returns the TensorBoard log folder.
Label columns that are not tasks of the run are excluded from the inferred
features (a label used as a feature would leak the answer).""", []),
    ("code", """\
def train(run: str, architecture: str, tasks=tasks, weighting="static", counterfactual=None, **hparams) -> Path:
    L.seed_everything(0, verbose=False)
    other_labels = [c for c in LABELS if c not in {t.label for t in tasks}]
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], tasks=tasks, batch_size=BATCH_SIZE,
                           group="user_id", embedding_dim=8, exclude=other_labels)
    model = registry.create(architecture, features=dm.prepare_features(), tasks=tasks, **hparams)
    module = MultiTaskLightningModule(model, lr=3e-3, weighting=weighting, counterfactual=counterfactual)
    logger = TensorBoardLogger(workdir / "runs", name=run, version=0, default_hp_metric=False)
    trainer = L.Trainer(max_epochs=EPOCHS, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    return Path(logger.log_dir)


mmoe = dict(num_experts=4, expert_hidden=(64, 32), tower_hidden=(16,))
runs = {
    "MMoE": train("mmoe", "mmoe", **mmoe),
    "MMoE + GradNorm": train("mmoe_gradnorm", "mmoe", weighting={"name": "gradnorm", "alpha": 1.5, "lr": 0.01}, **mmoe),
    "ESCM²-DR": train("escm_dr", "escm", tasks=[Task("click"), Task("conversion"), Task("purchase")],
                      counterfactual={"mode": "dr", "click_task": "click", "conversion_task": "conversion"},
                      click_task="click", conversion_task="conversion", ctcvr_task="purchase", tower_hidden=(32, 16)),
}""", []),
    ("markdown", """\
## Read the TensorBoard logs

`EventAccumulator` reads the event files; every scalar tag becomes a
`(step, value)` table.""", []),
    ("code", """\
def scalars(log_dir: Path) -> dict[str, pd.DataFrame]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: pd.DataFrame([(e.step, e.value) for e in events.Scalars(tag)], columns=["step", "value"])
            for tag in events.Tags()["scalars"]}


logs = {name: scalars(log_dir) for name, log_dir in runs.items()}
sorted(logs["MMoE"])""", []),
    ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, task in zip(axes, ["click", "conversion"]):
    for name, tags in logs.items():
        curve = tags[f"val/{task}/auc"]
        ax.plot(curve.step, curve.value, marker="o", label=name)
    ax.set(title=f"validation AUC: {task}", xlabel="step", ylabel="AUC")
    ax.legend()
plt.tight_layout()
plt.show()""", []),
    ("markdown", """\
## GradNorm's task weights

GradNorm learns one weight per task so that the tasks train at similar rates
(the weights always sum to the number of tasks); the module logs them as
`train/<task>/weight` at every step.""", []),
    ("code", """\
fig, ax = plt.subplots(figsize=(6, 3.5))
for task in tasks:
    curve = logs["MMoE + GradNorm"][f"train/{task.name}/weight"]
    ax.plot(curve.step, curve.value, label=task.name)
ax.set(title="GradNorm task weights", xlabel="step", ylabel="weight")
ax.legend()
plt.show()""", []),
    ("markdown", """\
## Compare

The last validation value of every metric, one row per model (empty where a
model has no such task: ESCM² has no `dwell`, the MMoE runs no `purchase`).""", []),
    ("code", """\
columns = ["val/click/auc", "val/click/gauc", "val/conversion/auc", "val/conversion/gauc", "val/purchase/auc",
           "val/dwell/mse"]
table = pd.DataFrame({name: {c: tags[c].value.iloc[-1] if c in tags else float("nan") for c in columns}
                      for name, tags in logs.items()}).T
table.round(4)""", []),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    cells = []
    for kind, source, tags in CELLS:
        cell = new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        cells.append(cell)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def figures(notebook: nbformat.NotebookNode) -> list[bytes]:
    """The PNG images of the notebook's outputs, in order."""
    return [base64.b64decode(output["data"]["image/png"]) for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def execute(notebook: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
    """Runs ``notebook`` in a temporary folder with the repository importable; drops stderr outputs."""
    from nbclient import NotebookClient

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as workdir:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": workdir}}).execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    return notebook


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="write the notebook without outputs")
    notebook = build()
    if not parser.parse_args().no_execute:
        notebook = execute(notebook)
        for path, png in zip(FIGURES, figures(notebook), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
            print(f"wrote {path}")
    nbformat.write(notebook, PATH)
    print(f"wrote {PATH}")
