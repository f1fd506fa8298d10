"""The first day on one's own data, as a user meets the ``mtl-lightning`` command.

A refusal or a mistake ends in one message without a traceback (``mtl-lightning: error: ...``, exit
status 2) that names the config key and the file it came from, with hints in YAML and flag syntax;
``validate``/``test``/``predict`` refuse an untrained model unless asked; predictions land in a run
folder; runs are named after the architecture trained; a failed run leaves no folder; Lightning's noise
is gone. Three checks run the command in a subprocess, as a user does; the rest call ``main`` in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from datamodules.synthetic import write_synthetic
from mtl_lightning.cli import TRACEBACK_VARIABLE, main
from mtl_lightning.cli_messages import ConfigSources, argument_message, unwrap, user_message, yaml_hints

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
MMOE = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "data" / "synthetic.yaml"),
        "--config", str(CONFIGS / "mmoe.yaml")]
SMALL = ["--data.batch_size=250", "--model.model.init_args.expert_hidden=[8]", "--model.model.init_args.tower_hidden=[4]",
         "--model.model.init_args.num_experts=2", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
         "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A workspace holding what ``make demo`` leaves (``data/synthetic/``), fewer rows."""
    workspace = tmp_path_factory.mktemp("first_day")
    write_synthetic(workspace / "data" / "synthetic", (1000, 400, 400))
    return workspace


def own_data(directory: Path, rows: int = 600, seed: int = 0) -> Path:
    """A user's impression log: large integer ids, string columns with nulls, a float with nulls, and a
    conversion label given on clicked rows only (null elsewhere)."""
    rng = np.random.default_rng(seed)
    click = rng.random(rows) < 0.3
    conversion = np.where(click, (rng.random(rows) < 0.4).astype(float), np.nan)
    price = rng.normal(10.0, 3.0, rows)
    price[rng.random(rows) < 0.1] = np.nan
    table = pa.table({
        "user_id": rng.integers(0, 200, rows) * 1_000_003 + 10**12,
        "item_id": pa.array([f"item-{i}" for i in rng.integers(0, 50, rows)]),
        "country": pa.array([None if i == 3 else ["fr", "de", "us"][i] for i in rng.integers(0, 4, rows)]),
        "price": price,
        "click": click.astype(np.int8),
        "conversion": pa.array(conversion, from_pandas=True),
        "request_id": np.arange(rows, dtype=np.int64),
    })
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "part-0.parquet")
    return directory


def run_command(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "mtl_lightning.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """``mtl-lightning ARGS`` in this process: its exit status, stdout and stderr."""
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ refusals, through the console command
def test_predict_without_a_checkpoint_is_refused_in_one_line_and_untrained_is_opt_in(synthetic, tmp_path, capsys):
    result = run_command(["predict", *MMOE, "--data.predict=data/synthetic/test.parquet"], synthetic)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()  # the refusal comes before anything runs: nothing else is printed
    assert lines[0].startswith("mtl-lightning: error: predict needs a trained model: pass its checkpoint with "
                               "--ckpt_path=PATH"), result.stderr
    assert "--untrained=true to predict with the model as initialised" in lines[0]
    assert lines[1:] == [f"  ({TRACEBACK_VARIABLE}=1 shows the traceback)"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (synthetic / "lightning_logs").exists() and not (synthetic / "predictions").exists()
    os.chdir(synthetic)
    for subcommand in ("validate", "test"):
        code, _, err = run_main([subcommand, *MMOE], capsys)
        assert code == 2 and err.startswith(f"mtl-lightning: error: {subcommand} needs a trained model"), err
    # asked for explicitly, the untrained model predicts, into the run folder of the new run
    code, out, _ = run_main(["predict", *MMOE, *SMALL, "--data.predict=data/synthetic/test.parquet",
                             "--untrained=true"], capsys)
    predictions = synthetic / "lightning_logs" / "mmoe" / "version_0" / "predictions"
    assert code == 0 and f"predict: predictions written to {Path('lightning_logs/mmoe/version_0/predictions')}" in out
    assert pq.read_table(predictions / "predictions-rank00000.parquet").num_rows == 400
    assert not (synthetic / "predictions").exists()


def test_own_data_mistakes_are_named_all_at_once_with_their_key_and_file(tmp_path):
    """Large integer ids, strings, nulls: one run names them all, with the YAML that fixes them."""
    own_data(tmp_path / "data" / "train")
    own_data(tmp_path / "data" / "val", rows=200, seed=1)
    (tmp_path / "my_data.yaml").write_text(yaml.safe_dump({"data": {
        "train": "data/train/", "val": "data/val/", "tasks": [{"name": "click"}, {"name": "conversion"}]}}))
    args = ["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "mmoe.yaml"),
            "--config", "my_data.yaml"]
    result = run_command(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("mtl-lightning: error:"):]  # after Lightning's "Seed set to 0"
    assert message.startswith(f"mtl-lightning: error: {Path('data/train/part-0.parquet')}: cannot infer the features "
                              "of 4 column(s):"), message
    assert "feature 'user_id': its largest id 1000199000597" in message
    assert "column 'item_id' holds string values" in message and "column 'country' holds string values" in message
    assert "column 'price' holds numbers and" in message
    # the fix, as YAML keys and as flags
    assert ("data.categorical: {user_id: {}, item_id: {}, country: {}} (in YAML; "
            "--data.categorical='{user_id: {}, item_id: {}, country: {}}' on the command line)") in message
    assert "data.fill_missing: {price: mean}, data.missing_indicator: true" in message
    assert "ParquetDataModule(" not in message  # no Python syntax in a YAML workflow
    assert "  (data.train: set in my_data.yaml)" in message.splitlines()
    # the traceback, on request
    shown = run_command(args, tmp_path, **{TRACEBACK_VARIABLE: "1"})
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
    assert "ValueError: " in shown.stderr and "mtl-lightning: error" not in shown.stderr


def test_a_run_is_named_after_its_architecture_and_prints_no_noise(synthetic, tmp_path):
    """``--model.model=ple`` over configs/mmoe.yaml logs under ple; no tips, TPU line, summary table, hp_metric."""
    fit = run_command(["fit", *MMOE, "--model.model=ple", "--model.model.init_args.expert_hidden=[8]",
                       "--model.model.init_args.tower_hidden=[4]", "--data.batch_size=250", "--trainer.max_epochs=1",
                       "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"], synthetic)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = synthetic / "lightning_logs" / "ple" / "version_0"
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    validate = run_command(["validate", *MMOE, "--model.model=ple", "--model.model.init_args.expert_hidden=[8]",
                            "--model.model.init_args.tower_hidden=[4]", f"--ckpt_path={checkpoint}",
                            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"], synthetic)
    assert validate.returncode == 0, validate.stderr[-3000:]
    printed = fit.stdout + fit.stderr + validate.stdout + validate.stderr
    for noise in ("💡 Tip", "TPU available", "LeafSpec", "hp_metric", "weights_only", "Trainable params", "| Name"):
        assert noise not in printed, noise
    assert "PLE: " in fit.stdout and " parameters (" in fit.stdout and "tasks click, conversion, dwell" in fit.stdout
    assert "final validation metrics:" in fit.stdout and f"validate: logged to {Path('lightning_logs/ple/version_0')}"
    assert not (synthetic / "lightning_logs" / "mmoe" / "version_1").exists()


# ------------------------------------------------------------------ errors, in-process
def test_unknown_names_list_the_registered_ones_and_the_closest(synthetic, capsys, monkeypatch):
    monkeypatch.chdir(synthetic)
    code, _, err = run_main(["fit", *MMOE, "--model.model=mmoee"], capsys)
    assert code == 2
    assert err.startswith("mtl-lightning: error: model.model: unknown architecture 'mmoee' (did you mean 'mmoe'?); "
                          "registered names: adatt, aitm, "), err
    assert len(err.splitlines()) == 2 and "usage:" not in err  # no usage of a hundred lines
    code, _, err = run_main(["fit", *MMOE, "--model.weighting=gradnorn"], capsys)
    assert "unknown weighting 'gradnorn' (did you mean 'gradnorm'?)" in err
    (synthetic / "arch.yaml").write_text("model:\n  model:\n    class_path: plee\n")
    code, _, err = run_main(["fit", *MMOE, "--config", "arch.yaml"], capsys)
    assert code == 2 and "model.model: unknown architecture 'plee' (did you mean 'ple'?)" in err


def test_bad_values_and_unknown_options_name_the_key(synthetic, capsys, monkeypatch):
    monkeypatch.chdir(synthetic)
    code, _, err = run_main(["fit", *MMOE, "--data.batch_size=abc"], capsys)
    assert code == 2 and err.splitlines()[0] == "mtl-lightning: error: data.batch_size: expected an integer, got 'abc'"
    code, _, err = run_main(["fit", *MMOE, "--data.trian=x"], capsys)
    assert err.splitlines()[0] == ("mtl-lightning: error: unknown option(s) --data.trian=x (mtl-lightning fit --help "
                                   "lists every option)")
    code, _, err = run_main(["fit", *MMOE, "--config", "missing.yaml"], capsys)
    assert "config: no such file" in err and "missing.yaml" in err
    code, _, err = run_main(["fit", *MMOE, "--model.model.init_args.num_experts=0"], capsys)
    assert code == 2 and "num_experts must be >= 1, got 0" in err
    assert "(model.model.init_args.num_experts: set by --model.model.init_args.num_experts=0 on the command line)" in err


def test_a_label_column_a_config_names_is_traced_to_its_key_and_file(synthetic, capsys, monkeypatch):
    monkeypatch.chdir(synthetic)
    (synthetic / "tasks.yaml").write_text("data:\n  tasks:\n    - {name: click}\n    - {name: revenue}\n")
    code, _, err = run_main(["fit", *MMOE, "--config", "tasks.yaml", *SMALL], capsys)
    assert code == 2 and "missing label column 'revenue'" in err, err
    assert "  (data.tasks: set in tasks.yaml)" in err.splitlines()


def test_a_failed_run_leaves_no_version_folder(synthetic, tmp_path, capsys, monkeypatch):
    """A val file without a label column fails in setup, after the logger made version_0: the folder goes."""
    monkeypatch.chdir(synthetic)
    table = pq.read_table(synthetic / "data" / "synthetic" / "val.parquet").drop_columns(["conversion"])
    pq.write_table(table, tmp_path / "val.parquet")
    removed = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (removed.append(Path(path)), real_rmtree(path, **kw)))
    code, _, err = run_main(["fit", *MMOE, *SMALL, f"--data.val={tmp_path / 'val.parquet'}",
                             "--trainer.logger.init_args.name=failing"], capsys)
    assert code == 2 and "missing label column 'conversion'" in err, err
    # the keys that name the column, and the file that set them
    assert f"  (data.labels, data.implied_labels, data.tasks: set in {CONFIGS / 'data' / 'synthetic.yaml'})" in (
        err.splitlines())
    assert removed == [Path("lightning_logs/failing/version_0")]  # the logger had made it
    assert not (synthetic / "lightning_logs" / "failing").exists()


# ------------------------------------------------------------------ the message helpers
def test_hints_in_python_syntax_become_yaml_keys_and_flags():
    assert yaml_hints("encode it: ParquetDataModule(categorical={'user': {}}) (a vocabulary)") == (
        "encode it: data.categorical: {user: {}} (in YAML; --data.categorical='{user: {}}' on the command line) "
        "(a vocabulary)")
    assert yaml_hints("pass ParquetDataModule(labels=['x'], allow_retraining=True)") == (
        "pass data.labels: [x], data.allow_retraining: true (in YAML; --data.labels='[x]' "
        "--data.allow_retraining=true on the command line)")
    assert yaml_hints("ParquetDataModule(features=features)") == "ParquetDataModule(features=features)"  # not a value


def test_argument_messages_and_unwrapping():
    assert argument_message('Parser key "trainer.max_epochs":\n  Does not validate against any of the Union subtypes\n'
                            "  Errors:\n    - Expected a <class 'int'>\n    - Expected a <class 'NoneType'>\n"
                            "  Given value type: <class 'str'>\n  Given value: x") == (
        "trainer.max_epochs: expected an integer or null, got 'x'")
    cause = ValueError("data/x.parquet: no such file")
    try:
        try:
            raise cause
        except ValueError as error:
            raise ValueError("Call to compute_fn of link '_features_of(data) --> model' failed: ...") from error
    except ValueError as wrapped:
        assert unwrap(wrapped) is cause


def test_config_sources_know_which_file_or_flag_set_each_key(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("data:\n  train: x.parquet\n  tasks: [{name: click}]\n")
    second.write_text("fit:\n  data:\n    tasks: [{name: buy}]\n")
    sources = ConfigSources(["fit", "--config", str(first), "--config", str(second), "--data.val", "v.parquet"])
    assert sources.source("data.train") == str(first)
    assert sources.source("data.tasks") == str(second)  # the later file's whole list
    assert sources.source("data.val") == "--data.val=v.parquet on the command line"
    assert sources.source("trainer.max_epochs") is None
    assert user_message(ValueError("x.parquet: missing label column 'buy'"), sources) == (
        f"x.parquet: missing label column 'buy'\n  (data.train: set in {first})\n  (data.tasks: set in {second})")
