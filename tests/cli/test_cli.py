"""The ``mtl-lightning`` CLI: every registered architecture has a runnable config; fit/validate/test/predict; DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from datamodules.synthetic import write_synthetic
from mtl_lightning import Task, registry
from mtl_lightning.cli import build_cli, resolve_registry_args

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# the trainer and the logger, then the synthetic data set: every architecture file goes on top of them
BASE = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "data" / "synthetic.yaml")]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """1000/400/400 rows of the synthetic dataset, written once per session."""
    return write_synthetic(tmp_path_factory.mktemp("tiny"), (1000, 400, 400))


def _data_args(paths: dict[str, Path]) -> list[str]:
    return [f"--data.train={paths['train']}", f"--data.val={paths['val']}", f"--data.test={paths['test']}"]


def _config_names() -> list[str]:
    """Every registered architecture, plus the extra configs (weighting, counterfactual variants)."""
    names = registry.names()
    return names + sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in names and p.stem != "base")


@pytest.mark.parametrize("name", _config_names())
def test_config_runs(name, tiny_paths, tmp_path, monkeypatch):
    config = CONFIGS / f"{name}.yaml"
    assert config.exists(), f"registered architecture {name!r} has no config: add configs/{name}.yaml"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    cli = build_cli(["fit", *BASE, f"--config={config}", *_data_args(tiny_paths), "--data.batch_size=200",
                     "--trainer.fast_dev_run=true", *QUIET])
    assert cli.config["fit"]["trainer"]["logger"]["init_args"]["name"] == name  # runs are named after what trains
    architecture = cli.model.model
    if name in registry.names():
        assert type(architecture) is registry.get(name)
    # the feature specs were inferred by the data module and linked into the architecture
    assert architecture.features == tuple(cli.datamodule.features)
    label_columns = {"click", "conversion", "purchase", "dwell"}
    assert not label_columns & {f.name for f in architecture.features}, "a label column was inferred as a feature"
    # the data's tasks, and the ctcvr task ESMM and ESCM add (trained on click · conversion, which they derive)
    added = {t.name for t in architecture.tasks} - {t.name for t in cli.datamodule.tasks}
    assert {t.name for t in cli.datamodule.tasks} <= {t.name for t in architecture.tasks}
    assert added == ({"ctcvr"} if name in ("escm",) else set()), added
    # an architecture file's data.tasks replace the data file's whole (jsonargparse alone would merge them item by item)
    written = yaml.safe_load(config.read_text()).get("data", {}).get("tasks")
    written = written or yaml.safe_load((CONFIGS / "data" / "synthetic.yaml").read_text())["data"]["tasks"]
    assert list(cli.datamodule.tasks) == [Task(**t) for t in written]
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/click/auc" in metrics
    assert cli.trainer.global_step >= 1


def test_configs_are_layered_base_data_architecture():
    """base.yaml and the architecture files hold no data-set keys: a user's own data file starts clean."""
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert set(base["data"]) == {"batch_size"}  # no files, tasks, labels, group ... of any data set
    assert "model" not in base["model"]  # the architecture comes from its own file
    assert base["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert base["trainer"]["logger"]["init_args"]["name"] is None  # named after the architecture trained
    synthetic = yaml.safe_load((CONFIGS / "data" / "synthetic.yaml").read_text())
    assert set(synthetic) == {"data"} and synthetic["data"]["train"] == "data/synthetic/train.parquet"
    template = yaml.safe_load((CONFIGS / "data" / "template.yaml").read_text())
    assert set(template) == {"data"} and {"train", "val", "tasks"} <= set(template["data"])
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.stem == "base":
            continue
        config = yaml.safe_load(path.read_text())
        assert set(config) <= {"model", "data"}, path  # no trainer: the run's name follows the model
        assert config["model"]["model"]["class_path"] in registry.names(), path
        # an architecture file may say which tasks it trains (a CVR model's click and conversion), nothing else
        assert set(config.get("data", {})) <= {"tasks"}, path
        assert f"--config configs/base.yaml --config configs/data/synthetic.yaml --config configs/{path.name}" in (
            path.read_text()), path  # its usage line


def test_registry_names_on_the_command_line_become_class_paths():
    args = ["fit", "--model.model=ple", "--model.model.class_path", "mmoe", "--trainer.logger.init_args.name=mmoe"]
    assert resolve_registry_args(args) == [
        "fit", "--model.model=mtl_lightning.architectures.ple.PLE", "--model.model.class_path",
        "mtl_lightning.architectures.mmoe.MMoE", "--trainer.logger.init_args.name=mmoe",
    ]


def test_fit_validate_test_predict(tiny_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = [*BASE, "--config", str(CONFIGS / "mmoe.yaml"), *_data_args(tiny_paths), "--data.batch_size=250",
             "--model.model=shared_bottom", "--model.model.init_args.bottom_hidden=[16]",
             "--model.model.init_args.tower_hidden=[8]", "--data.embedding_dim=4", "--model.lr=0.02", *QUIET]
    cli = build_cli(["fit", *small, "--trainer.max_epochs=3"])
    assert type(cli.model.model).__name__ == "SharedBottom"
    assert cli.model.model.features[0].embedding_dim == 4  # data.embedding_dim reached the inferred specs
    run = Path(cli.trainer.log_dir).resolve()
    assert run == tmp_path / "lightning_logs" / "shared_bottom" / "version_0"  # the architecture trained names it
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    assert checkpoint.name == "epoch=2-step=12.ckpt"  # 1000 rows / 250 per batch * 3 epochs
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["model"]["class_path"] == "mtl_lightning.architectures.shared_bottom.SharedBottom"
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    # fit ends by saying where the run and its best checkpoint are, with the final validation metrics per task
    printed = capsys.readouterr().out
    assert f"run folder (TensorBoard logs): {cli.trainer.log_dir}" in printed
    assert f"best checkpoint: {cli.trainer.checkpoint_callback.best_model_path}" in printed
    table = printed[printed.index("final validation metrics:"):].splitlines()
    assert table[1].split() == ["task", "auc", "gauc", "logloss", "ne", "pcoc", "ece", "mse", "mae", "xauc"]
    click_row = next(line.split() for line in table if line.startswith("click "))
    assert float(click_row[1]) == pytest.approx(float(cli.trainer.callback_metrics["val/click/auc"]), abs=1e-4)
    assert next(line.split() for line in table if line.startswith("dwell "))[1:3] == ["-", "-"]  # no AUC for regression

    # validate from the run's checkpoint logs into that run (no version_1), its config beside the fit's
    validated = build_cli(["validate", *small, f"--ckpt_path={checkpoint}"])
    assert Path(validated.trainer.log_dir).resolve() == run
    assert not (tmp_path / "lightning_logs" / "shared_bottom" / "version_1").exists()
    assert f"validate: logged to {validated.trainer.log_dir}" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text()) == saved  # the fit's config is kept
    assert yaml.safe_load((run / "config_validate.yaml").read_text())["ckpt_path"] == str(checkpoint)
    tested = build_cli(["test", *small, f"--ckpt_path={checkpoint}", "--trainer.logger=false"])
    val = validated.trainer.callback_metrics
    assert 0.5 < float(val["val/click/auc"]) and 0.0 < float(val["val/click/gauc"]) < 1.0
    assert float(tested.trainer.callback_metrics["test/click/auc"]) > 0.5
    assert torch.isclose(val["val/click/auc"], cli.trainer.callback_metrics["val/click/auc"])  # same weights

    build_cli(["predict", *small, f"--ckpt_path={checkpoint}", "--trainer.logger=false",
               f"--data.predict={tiny_paths['test']}", f"--prediction_writer.output_dir={tmp_path / 'out'}"])
    table = pq.read_table(tmp_path / "out" / "predictions-rank00000.parquet")
    assert table.column_names == ["row_id", "click", "conversion", "dwell"]
    assert table.column("row_id").to_pylist() == list(range(400))
    click = table.column("click").to_numpy()
    assert ((click > 0) & (click < 1)).all()
    # without --prediction_writer.output_dir the predictions go into the run, and the command says so
    build_cli(["predict", *small, f"--ckpt_path={checkpoint}", f"--data.predict={tiny_paths['test']}"])
    assert f"predict: predictions written to {run / 'predictions'}" in capsys.readouterr().out
    assert pq.read_table(run / "predictions" / "predictions-rank00000.parquet").equals(table)
    assert not (tmp_path / "predictions").exists()
    assert not (tmp_path / "lightning_logs" / "shared_bottom" / "version_1").exists()


def test_unknown_architecture_is_rejected(tiny_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        build_cli(["fit", *BASE, "--config", str(CONFIGS / "mmoe.yaml"), *_data_args(tiny_paths), "--model.model=nope"])
    assert "nope" in capsys.readouterr().err


def test_ddp_with_two_processes_on_cpu(tiny_paths, tmp_path):
    """``--trainer.strategy=ddp --trainer.devices=2`` through the console script: each rank trains on half the rows."""
    script = Path(sys.executable).with_name("mtl-lightning")
    assert script.exists(), "the mtl-lightning console script is not installed (pip install -e .)"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(script), "fit", *BASE, "--config", str(CONFIGS / "mmoe.yaml"), *_data_args(tiny_paths),
           "--data.batch_size=100", "--model.model.init_args.expert_hidden=[16]",
           "--model.model.init_args.tower_hidden=[8]", "--model.model.init_args.num_experts=2",
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1", *QUIET]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list((tmp_path / "lightning_logs" / "mmoe" / "version_0" / "checkpoints").glob("*.ckpt"))
    # 1000 rows, 100 per batch: 10 steps on one process, 5 per rank with two
    assert [p.name for p in checkpoints] == ["epoch=0-step=5.ckpt"]
    state = torch.load(checkpoints[0], weights_only=True, map_location="cpu")
    assert state["global_step"] == 5


def test_data_ignore_label_is_the_modules(tiny_paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*BASE, f"--config={CONFIGS / 'mmoe.yaml'}", *_data_args(tiny_paths), "--data.ignore_label=-2",
                     *QUIET], run=False)
    assert cli.datamodule.ignore_label == -2 and cli.model.hparams.ignore_label == -2
