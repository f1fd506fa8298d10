"""Checkpoints and configs are data: a ``class_path`` names only a subclass of the expected base, loading is
``weights_only=True``, and a truncated checkpoint is named as such. Every refusal is checked to run nothing
(a ``subprocess.run`` that would touch a marker file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic
from mtl_lightning import MultiTaskLightningModule, registry
from mtl_lightning.architectures import MultiTaskArchitecture, SharedBottom
from mtl_lightning.checkpoint import SafeCheckpointIO, check_checkpoint_file, load_checkpoint
from mtl_lightning.cli import build_cli
from mtl_lightning.config import build, resolve_class
from mtl_lightning.export import main as export_main
from mtl_lightning.weighting import GradNorm, Static, WeightingStrategy, create_weighting


ROOT = Path(__file__).resolve().parents[2]
MMOE_CONFIG = ["--config", str(ROOT / "configs" / "base.yaml"), "--config", str(ROOT / "configs" / "data" / "synthetic.yaml"),
               "--config", str(ROOT / "configs" / "mmoe.yaml")]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
         "--trainer.logger=false"]


class HalfWeights(WeightingStrategy):
    """A user's own strategy (defined outside the library): half of every loss."""

    def __init__(self, factor: float = 0.5) -> None:
        super().__init__()
        self.factor = factor

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        return self._weighted_sum(torch.full_like(losses, self.factor), losses)


class MyBottom(SharedBottom):
    """A user's own architecture (a subclass of a registered one; it does not take over its name)."""


def _evil(marker: Path) -> dict:
    return {"class_path": "subprocess.run", "init_args": {"args": ["touch", str(marker)]}}


def _small_module(**kwargs) -> MultiTaskLightningModule:
    model = registry.create("shared_bottom", features=synthetic_features(embedding_dim=4), tasks=synthetic_tasks(),
                            bottom_hidden=(8,), tower_hidden=(4,))
    return MultiTaskLightningModule(model, **kwargs)


def _save(module: MultiTaskLightningModule, path: Path, **hyper_parameters) -> Path:
    """A checkpoint like Lightning's (loadable with ``weights_only=True``), with some hyper-parameters replaced."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {**dict(module.hparams), **hyper_parameters},
                "pytorch-lightning_version": "2.6.0", "epoch": 0, "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic(tmp_path_factory.mktemp("tiny"), (300, 100, 100))


def _tiny_data(paths: dict[str, Path], **kwargs) -> ParquetDataModule:
    return ParquetDataModule(train=paths["train"], tasks=synthetic_tasks(), features=synthetic_features(embedding_dim=4),
                             batch_size=100, **kwargs)


def _data_args(paths: dict[str, Path]) -> list[str]:
    return [f"--data.train={paths['train']}", f"--data.val={paths['val']}", f"--data.test={paths['test']}",
            "--data.batch_size=100"]


# ------------------------------------------------------------------------------------------- build / resolve_class
def test_build_refuses_anything_but_a_subclass_of_the_base_before_calling_it(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(TypeError, match=r"model: class_path 'subprocess\.run' is a function, not a subclass of "
                                        r"mtl_lightning\.architectures\.base\.MultiTaskArchitecture"):
        build(_evil(marker), MultiTaskArchitecture, "model")
    with pytest.raises(TypeError, match=r"weighting: class_path 'subprocess\.Popen' is a class that is not a "
                                        r"subclass of .*WeightingStrategy"):
        build({"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}},
              WeightingStrategy, "weighting")
    with pytest.raises(TypeError, match=r"model: class_path 'mtl_lightning\.weighting\.GradNorm' is a class that is "
                                        "not a subclass of .*MultiTaskArchitecture"):
        build({"class_path": "mtl_lightning.weighting.GradNorm"}, MultiTaskArchitecture, "model")
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"model: class_path 'no_such_module\.Thing': module 'no_such_module' is not "
                                         "imported, and a class path read from a checkpoint is never imported"):
        resolve_class("no_such_module.Thing", MultiTaskArchitecture, "model")
    with pytest.raises(ValueError, match=r"model: class_path 'no_such_module\.Thing': cannot import module"):
        resolve_class("no_such_module.Thing", MultiTaskArchitecture, "model", import_modules=True)  # CLI configs
    with pytest.raises(ValueError, match=r"model: class_path 'subprocess\.nothing': 'subprocess' has no 'nothing'"):
        resolve_class("subprocess.nothing", MultiTaskArchitecture, "model")
    with pytest.raises(ValueError, match=r"model: class_path 'nope' is not a registered name; use one of \[.*'mmoe'"):
        resolve_class("nope", MultiTaskArchitecture, "model")
    with pytest.raises(TypeError, match="model: class_path must be a non-empty string"):
        resolve_class(None, MultiTaskArchitecture, "model")
    with pytest.raises(ValueError, match=r"model: unknown entries \['dict_kwargs'\]"):
        build({"class_path": "mmoe", "dict_kwargs": {}}, MultiTaskArchitecture, "model")


def test_registered_names_and_user_subclasses_still_build():
    features, tasks = synthetic_features(embedding_dim=4), [t.to_config() for t in synthetic_tasks()]
    for name in ("mmoe", "MMoE", "mtl_lightning.architectures.MMoE", "mtl_lightning.architectures.mmoe.MMoE"):
        model = build({"class_path": name, "init_args": {"features": features, "tasks": tasks, "num_experts": 2}},
                      MultiTaskArchitecture, "model")
        assert type(model) is registry.get("mmoe") and len(model.gates["click"].linear.weight) == 2
    assert resolve_class("shared_bottom", MultiTaskArchitecture, "model") is SharedBottom  # not MyBottom
    assert resolve_class(f"{__name__}.MyBottom", MultiTaskArchitecture, "model") is MyBottom
    assert type(create_weighting({"class_path": "gradnorm", "init_args": {"alpha": 1.0}})) is GradNorm
    assert type(create_weighting({"class_path": "mtl_lightning.weighting.GradNorm"})) is GradNorm
    assert type(create_weighting({"class_path": f"{__name__}.HalfWeights", "init_args": {"factor": 0.25}})) is HalfWeights


def test_user_classes_round_trip_through_a_checkpoint(tmp_path):
    model = MyBottom(features=synthetic_features(embedding_dim=4), tasks=synthetic_tasks(), bottom_hidden=(8,),
                     tower_hidden=(4,))
    module = MultiTaskLightningModule(model, weighting=HalfWeights(factor=0.25))
    loaded = MultiTaskLightningModule.load_from_checkpoint(_save(module, tmp_path / "user.ckpt"))
    assert type(loaded.model) is MyBottom and type(loaded.weighting) is HalfWeights
    assert loaded.weighting.factor == 0.25
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("key", ["model", "weighting"])
def test_checkpoint_naming_a_function_is_refused_and_runs_nothing(key, tmp_path):
    marker = tmp_path / "marker"
    path = _save(_small_module(), tmp_path / "evil.ckpt", **{key: _evil(marker)})
    assert torch.load(path, weights_only=True)["hyper_parameters"][key]["class_path"] == "subprocess.run"
    base = "MultiTaskArchitecture" if key == "model" else "WeightingStrategy"
    with pytest.raises(TypeError, match=rf"^{key}: class_path 'subprocess\.run' is a function, not a subclass of .*{base}"):
        MultiTaskLightningModule.load_from_checkpoint(path)
    assert not marker.exists()


class _RunsOnUnpickling:
    """What a malicious pickle does: unpickling calls ``subprocess.run(["touch", marker])``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return subprocess.run, (["touch", str(self.marker)],)


def test_checkpoint_holding_a_pickled_object_is_refused_everywhere(tmp_path, tiny_paths, quiet_trainer):
    marker = tmp_path / "marker"
    module = _small_module()
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0", "payload": _RunsOnUnpickling(marker)}, path)
    refused = rf"checkpoint {path} holds pickled objects other than tensors and plain data, refused by weights_only=True"
    with pytest.raises(ValueError, match=refused):
        MultiTaskLightningModule.load_from_checkpoint(path)
    with pytest.raises(ValueError, match=refused):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=refused):
        export_main([str(path), "--onnx", str(tmp_path / "m.onnx")])
    data = _tiny_data(tiny_paths)
    with pytest.raises(ValueError, match=refused):
        quiet_trainer(max_epochs=1, plugins=[SafeCheckpointIO()]).fit(_small_module(), data, ckpt_path=path)
    # a plain Trainer gets SafeCheckpointIO from the module (no plugin given)
    with pytest.raises(ValueError, match=refused):
        quiet_trainer(max_epochs=1).fit(_small_module(), data, ckpt_path=path)
    with pytest.raises(ValueError, match="weights_only=True only"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_truncated_checkpoint_is_named(tmp_path, tiny_paths, quiet_trainer):
    module = _small_module()
    whole = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    data = _tiny_data(tiny_paths)
    whole.fit(module, data)
    good = tmp_path / "good.ckpt"
    whole.save_checkpoint(good)
    assert MultiTaskLightningModule.load_from_checkpoint(good).hparams["weighting"] == "static"
    content = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(content[: len(content) // 2])
    truncated = rf"checkpoint {cut} is truncated or corrupt \({len(content) // 2} bytes"
    with pytest.raises(ValueError, match=truncated):
        MultiTaskLightningModule.load_from_checkpoint(cut)
    with pytest.raises(ValueError, match=truncated):
        MultiTaskLightningModule.load_from_checkpoint(str(cut), map_location="cpu")
    with pytest.raises(ValueError, match=truncated):
        export_main([str(cut), "--torchscript", str(tmp_path / "m.pt")])
    with pytest.raises(ValueError, match=truncated):
        quiet_trainer(max_epochs=2, plugins=[SafeCheckpointIO()]).fit(_small_module(), data, ckpt_path=cut)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"checkpoint {empty} is truncated or corrupt \(0 bytes"):
        check_checkpoint_file(empty)
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'missing.ckpt'} does not exist"):
        MultiTaskLightningModule.load_from_checkpoint(tmp_path / "missing.ckpt")
    # the complete file resumes through SafeCheckpointIO (its fit ran to its end: training its data again is allowed)
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, plugins=[SafeCheckpointIO()])
    with pytest.warns(UserWarning, match="already trained on the partition"):
        resumed.fit(_small_module(), _tiny_data(tiny_paths, allow_retraining=True), ckpt_path=good)
    assert resumed.global_step == 2


# --------------------------------------------------------------------------------- class paths import nothing
HELPERS = """import pathlib
pathlib.Path({marker!r}).touch()  # what importing this file does

from mtl_lightning.architectures import SharedBottom


class Evil(SharedBottom):
    pass
"""


def test_a_checkpoint_class_path_never_imports_its_module(tmp_path, monkeypatch):
    """``helpers.py`` beside the checkpoint (and on sys.path, as the working folder is) and ``venv.__main__`` (which
    exits the process when imported) are refused by name, before anything of theirs runs; a module the user imported
    first resolves."""
    import sys

    marker = tmp_path / "marker"
    (tmp_path / "helpers.py").write_text(HELPERS.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _save(_small_module(), tmp_path / "helpers.ckpt",
                 model={"class_path": "helpers.Evil", "init_args": dict(_small_module().hparams["model"]["init_args"])})
    with pytest.raises(ValueError, match=r"^model: class_path 'helpers\.Evil': module 'helpers' is not imported"):
        MultiTaskLightningModule.load_from_checkpoint(path)
    assert not marker.exists() and "helpers" not in sys.modules
    exits = _save(_small_module(), tmp_path / "venv.ckpt", weighting={"class_path": "venv.__main__.Anything"})
    with pytest.raises(ValueError, match=r"weighting: class_path 'venv\.__main__\.Anything': module "
                                         r"'venv\.__main__' is not imported"):
        MultiTaskLightningModule.load_from_checkpoint(exits)
    assert "venv.__main__" not in sys.modules
    from mtl_lightning.cli import check_checkpoint

    with pytest.raises(ValueError, match=rf"checkpoint {path}: hyper_parameters model.model: class_path "
                                         r"'helpers\.Evil': module 'helpers' is not imported"):
        check_checkpoint(path)  # the CLI's --ckpt_path check
    assert not marker.exists()
    import helpers  # noqa: F401  (the user trusts it and imports it: now it resolves)

    monkeypatch.delitem(sys.modules, "helpers")  # (undone after the test; the class object stays alive below)
    sys.modules["helpers"] = helpers
    assert type(MultiTaskLightningModule.load_from_checkpoint(path).model).__name__ == "Evil"


# ------------------------------------------------------------------------------- TorchRec checkpoint folders as data
TABLE = {"key": "tables.model.embedding.item", "layer": "model.embedding", "table": "item", "rows": 4, "dim": 2,
         "plain_key": "tables.item.weight", "first_row": 0, "dtype": "float32"}


def _folder(path: Path, stored: dict | None = None, table: dict | None = None) -> Path:
    """A checkpoint folder as TorchRecStrategy writes one (meta.pt + DCP files), without TorchRec."""
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True)
    stored = {TABLE["key"]: torch.arange(8.0).view(4, 2)} if stored is None else stored
    dcp.save(stored, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
    torch.save({"torchrec": {"format": 1, "world_size": 1, "tables": [table or TABLE], "embedding_optimizer": None},
                "state_dict": {}, "epoch": 0, "global_step": 0}, path / "meta.pt")
    return path


def _rewrite_index(path: Path, change) -> None:
    import pickle

    index = path / ".metadata"
    metadata = pickle.loads(index.read_bytes())  # the test's own, trusted file
    change(metadata)
    index.write_bytes(pickle.dumps(metadata))


def _refused_everywhere(folder: Path, entry: str) -> None:
    """``consolidate``, ``load_from_checkpoint`` and ``python -m mtl_lightning.distributed.checkpoint`` refuse the
    folder with a ValueError naming it and the entry."""
    from mtl_lightning.distributed.checkpoint import consolidate

    message = rf"checkpoint folder {folder}: {entry}"
    with pytest.raises(ValueError, match=message):
        consolidate(folder)
    with pytest.raises(ValueError, match=message):
        MultiTaskLightningModule.load_from_checkpoint(folder)
    done = subprocess.run([sys.executable, "-m", "mtl_lightning.distributed.checkpoint", str(folder),
                           str(folder.parent / "out.ckpt")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and f"checkpoint folder {folder}: " in done.stderr, done.stderr
    assert not (folder.parent / "out.ckpt").exists()


def test_a_valid_folder_consolidates(tmp_path):
    from mtl_lightning.distributed.checkpoint import consolidate

    state = consolidate(_folder(tmp_path / "good.ckpt"))["state_dict"]
    assert torch.equal(state["model.embedding.tables.item.weight"], torch.arange(8.0).view(4, 2))


def test_a_bytes_item_in_a_folder_runs_nothing(tmp_path):
    """DCP's default planner would ``torch.load(weights_only=False)`` a bytes item: the payload would touch the marker.
    The index check refuses it; without that check the tensor-only planner still does."""
    from mtl_lightning.distributed import checkpoint as folders

    marker = tmp_path / "marker"
    folder = _folder(tmp_path / "evil.ckpt", stored={TABLE["key"]: _RunsOnUnpickling(marker)})
    _refused_everywhere(folder, rf"index entry '{TABLE['key']}': is a bytes item")
    target = {TABLE["key"]: torch.zeros(4, 2)}
    original = folders.check_index
    try:
        folders.check_index = lambda path, metadata: None  # the planner alone
        with pytest.raises(ValueError, match=rf"checkpoint folder {folder}: index entry '{TABLE['key']}': is a bytes"):
            folders.load_sharded(folder, target)
    finally:
        folders.check_index = original
    assert not marker.exists()


def test_folder_storage_outside_it_absurd_sizes_and_bad_dtypes_are_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    outside = _folder(tmp_path / "outside.ckpt")
    (tmp_path / "elsewhere.distcp").write_bytes((outside / "__0_0.distcp").read_bytes())

    def point_outside(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../elsewhere.distcp"

    _rewrite_index(outside, point_outside)
    _refused_everywhere(outside, r"storage file '\.\./elsewhere\.distcp': not a plain file inside")

    linked = _folder(tmp_path / "linked.ckpt")
    (linked / "__0_0.distcp").unlink()
    (linked / "__0_0.distcp").symlink_to(tmp_path / "elsewhere.distcp")
    _refused_everywhere(linked, r"storage file '__0_0\.distcp': not a plain file inside")

    huge = _folder(tmp_path / "huge_meta.ckpt", table={**TABLE, "rows": 10 ** 12})
    _refused_everywhere(huge, rf"table '{TABLE['key']}': meta.pt says \(1000000000000, 2\)")

    def grow(metadata):  # the index itself claims 10**12 rows
        entry = metadata.state_dict_metadata[TABLE["key"]]
        entry.size = torch.Size([10 ** 12, 2])
        entry.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([10 ** 12, 2]))]

    huge_index = _folder(tmp_path / "huge_index.ckpt", table={**TABLE, "rows": 10 ** 12})
    _rewrite_index(huge_index, grow)
    _refused_everywhere(huge_index, rf"index entry '{TABLE['key']}': its chunk at \(0, 0\) of \(1000000000000, 2\) "
                                    "needs 8000000000000 bytes")

    bad_meta = _folder(tmp_path / "bad_meta.ckpt", table={**TABLE, "dtype": "complex128"})
    _refused_everywhere(bad_meta, rf"meta.pt table 0 \({TABLE['key']}\) dtype: 'complex128' is not among")
    bad_index = _folder(tmp_path / "bad_index.ckpt", stored={TABLE["key"]: torch.zeros(4, 2, dtype=torch.complex64)})
    _refused_everywhere(bad_index, rf"index entry '{TABLE['key']}': dtype torch.complex64 is not among")
    rows = _folder(tmp_path / "rows.ckpt", table={**TABLE, "rows": True})
    _refused_everywhere(rows, r"meta.pt table 0 'rows': True is not a int")


def test_a_torchrec_folder_under_another_strategy_says_what_it_is(tmp_path, tiny_paths, quiet_trainer):
    folder = _folder(tmp_path / "last.ckpt")
    said = rf"checkpoint {folder} is a TorchRecStrategy checkpoint folder .* Trainer\(strategy=TorchRecStrategy"
    with pytest.raises(ValueError, match=said):
        SafeCheckpointIO().load_checkpoint(folder)
    with pytest.raises(ValueError, match=said):  # a plain Trainer: SafeCheckpointIO comes with the module
        quiet_trainer(max_epochs=1).validate(_small_module(), _tiny_data(tiny_paths), ckpt_path=folder)
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path} is a folder, not a checkpoint file"):
        check_checkpoint_file(tmp_path)


def test_cli_model_file_with_a_bad_class_path_is_named(tiny_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for class_path, said in [("mtl_lightning.architectures.NoSuchArch", "'mtl_lightning.architectures' has no "
                                                                        "'NoSuchArch'"),
                             ("nosuchpkg.Arch", "cannot import module 'nosuchpkg'"),
                             ("subprocess.run", "is a function, not a subclass")]:
        model = tmp_path / "model.yaml"
        model.write_text(yaml.safe_dump({"model": {"class_path": class_path, "init_args": {}}}))
        with pytest.raises(SystemExit):
            build_cli(["fit", *MMOE_CONFIG, "--model", str(model), *_data_args(tiny_paths), *QUIET])
        err = capsys.readouterr().err
        assert f"--model {model}: model.model: class_path '{class_path}'" in err and said in err, err
        assert "linked_targets" not in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("key", ["model", "weighting"])
def test_cli_yaml_naming_a_function_is_refused_and_runs_nothing(key, tiny_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump({"model": {key: _evil(marker)}}))
    for configs in ([*MMOE_CONFIG, "--config", str(evil)], ["--config", str(evil)]):
        with pytest.raises(SystemExit):
            build_cli([*configs, *_data_args(tiny_paths), *QUIET], run=False)
        assert f"model.{key}: class_path 'subprocess.run' is a function, not a subclass" in capsys.readouterr().err
    evil.write_text(yaml.safe_dump({"fit": {"model": {key: _evil(marker)}}}))  # a config at the subcommand level
    with pytest.raises(SystemExit):
        build_cli(["--config", str(evil), "fit", *MMOE_CONFIG, *_data_args(tiny_paths), *QUIET])
    assert f"fit.model.{key}: class_path 'subprocess.run'" in capsys.readouterr().err
    flag = f"--model.{key}" if key == "model" else f"--model.{key}.class_path"
    for args in ([f"{flag}=subprocess.run"], [f"--model.{key}", yaml.safe_dump(_evil(marker), default_flow_style=True)]):
        with pytest.raises(SystemExit):
            build_cli([*MMOE_CONFIG, *args, *_data_args(tiny_paths), *QUIET], run=False)
        assert f"model.{key}: class_path 'subprocess.run'" in capsys.readouterr().err
    assert not marker.exists()


def test_cli_keeps_class_path_dicts_in_free_form_values_as_data(tiny_paths, tmp_path, monkeypatch):
    """jsonargparse would import and call a class_path found in a value of type Any (optimizer_kwargs ...)."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump({"model": {"optimizer_kwargs": {"x": _evil(marker)},
                                              "lr_scheduler_kwargs": {"y": _evil(marker)}}}))
    cli = build_cli([*MMOE_CONFIG, "--config", str(evil), *_data_args(tiny_paths), *QUIET], run=False)
    assert cli.model.hparams.optimizer_kwargs == {"x": _evil(marker)}
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["model", "weighting"])
def test_cli_ckpt_path_naming_a_function_is_refused_and_runs_nothing(key, tiny_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    path = _save(_small_module(), tmp_path / "evil.ckpt", **{key: _evil(marker)})
    with pytest.raises(SystemExit):
        build_cli(["predict", *MMOE_CONFIG, *_data_args(tiny_paths), f"--data.predict={tiny_paths['test']}",
                   f"--ckpt_path={path}", *QUIET])
    err = capsys.readouterr().err
    assert f"checkpoint {path}: hyper_parameters model.{key}: class_path 'subprocess.run' is a function" in err
    assert not marker.exists()


def test_cli_truncated_ckpt_path_is_named(tiny_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = _save(_small_module(), tmp_path / "good.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        build_cli(["validate", *MMOE_CONFIG, *_data_args(tiny_paths), f"--ckpt_path={cut}", *QUIET])
    assert f"checkpoint {cut} is truncated or corrupt (1000 bytes" in capsys.readouterr().err


def test_static_weighting_is_still_the_default_from_a_checkpoint(tmp_path):
    loaded = MultiTaskLightningModule.load_from_checkpoint(_save(_small_module(), tmp_path / "m.ckpt"))
    assert type(loaded.weighting) is Static
