"""Extension is one file: the packages discover their modules, and a new architecture meets the parametrised suites.

``docs/contributing.md`` promises that an architecture (or a weighting strategy)
is one new file that registers itself. These tests hold the library to it: every
module file of ``mtl_lightning.architectures`` / ``mtl_lightning.weighting`` is
imported by importing the package, a package laid out the same way picks up a
file it has never seen, and an architecture defined here (registered only for
the test) passes the parametrised suites' checks and trains from the CLI.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import yaml
from torch import Tensor, nn

from tests.architectures import test_architectures as architecture_suite
from tests.export import test_export as export_suite
from mtl_lightning import registry
from mtl_lightning.architectures import MultiTaskArchitecture
from mtl_lightning.architectures.base import parameters_of, squeeze_logit
from mtl_lightning.features import Feature
from mtl_lightning.layers import MLP
from mtl_lightning.tasks import Task

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _package_files(package) -> set[str]:
    return {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__"}


@pytest.mark.parametrize("package_name", ["mtl_lightning.architectures", "mtl_lightning.weighting",
                                          "mtl_lightning.interactions"])
def test_importing_a_package_imports_every_module_file(package_name):
    package = sys.modules.get(package_name) or __import__(package_name, fromlist=["_"])
    files = _package_files(package)
    assert len(files) > 5 or package_name.endswith("interactions")  # interactions: base.py alone so far
    missing = sorted(f for f in files if f"{package_name}.{f}" not in sys.modules)
    assert not missing, f"{package_name}: module files not imported by the package: {missing}"
    registries = {"architectures": "ARCHITECTURES", "weighting": "STRATEGIES", "interactions": "INTERACTIONS"}
    classes = list(getattr(package, registries[package_name.rpartition(".")[2]]).values())
    for cls in classes:  # every registered class lives in a file of the package and is importable from it
        assert cls.__module__.rpartition(".")[0] == package_name and cls.__module__.rpartition(".")[2] in files
        assert getattr(package, cls.__name__) is cls


@pytest.fixture
def private_registry():
    """The architecture registry for one test: what the test registers is unregistered afterwards."""
    before = set(registry.ARCHITECTURES)
    yield registry.ARCHITECTURES
    for name in set(registry.ARCHITECTURES) - before:
        registry.ARCHITECTURES.unregister(name)


def test_a_new_file_in_a_package_is_discovered(tmp_path, monkeypatch, private_registry):
    """A package whose ``__init__`` is laid out like ``architectures/__init__.py`` imports a file it never named."""
    package = tmp_path / "zoo_extension"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from mtl_lightning.registry import import_submodules
        import_submodules(__name__, __path__)
    """))
    (package / "newcomer.py").write_text(textwrap.dedent("""
        from mtl_lightning.architectures.shared_bottom import SharedBottom
        from mtl_lightning.registry import register

        @register("newcomer_for_test")
        class Newcomer(SharedBottom):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "newcomer_for_test" not in private_registry
    import zoo_extension  # noqa: F401

    assert registry.get("newcomer_for_test").__name__ == "Newcomer"
    assert "newcomer_for_test" in registry.names()
    for name in [m for m in sys.modules if m.startswith("zoo_extension")]:
        monkeypatch.delitem(sys.modules, name)


class PerTaskLinear(MultiTaskArchitecture):
    """A throwaway architecture (not registered at import): shared ReLU layer, then one linear tower per task."""

    def __init__(self, features: Sequence[Feature | dict], tasks: Sequence[Task | dict], hidden: int = 16,
                 interaction: str | Mapping[str, Any] | None = None) -> None:
        super().__init__(features, tasks, interaction)
        self.embedding = self.input_layer()  # sequence encoders and the interaction come with it
        self.bottom = MLP(self.embedding.output_dim, (hidden,))
        self.towers = self._towers(hidden, ())

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        h = self.bottom(self.embedding(features))  # (B, H)
        return {name: squeeze_logit(self.towers[name](h)) for name in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.embedding, self.bottom)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return parameters_of(self.bottom.last_linear())


@pytest.fixture
def throwaway(private_registry) -> str:
    registry.register("per_task_linear")(PerTaskLinear)
    return "per_task_linear"


def test_a_throwaway_architecture_meets_the_parametrised_suites(throwaway, tmp_path):
    assert throwaway in registry.names() and registry.get(throwaway) is PerTaskLinear
    for inputs in architecture_suite.INPUTS:
        architecture_suite.test_every_architecture_forward_and_backward(throwaway, inputs)
        architecture_suite.test_every_architecture_rebuilds_from_its_config(throwaway, inputs)
    export_suite.test_onnx_and_torchscript_match_pytorch(throwaway, tmp_path)
    for inputs in ("din_group", "dcn_v2"):
        (tmp_path / inputs).mkdir()
        export_suite.test_exports_with_a_din_group_and_with_an_interaction(throwaway, inputs, tmp_path / inputs)


def test_a_throwaway_architecture_trains_from_a_config(throwaway, tmp_path, monkeypatch):
    """The config checklist item: a small YAML naming the registered name trains through ``mtl-lightning fit``."""
    from datamodules.synthetic import write_synthetic
    from mtl_lightning.cli import build_cli

    paths = write_synthetic(tmp_path / "data", (4000, 1000, 10))

    # the architecture's own file, as configs/<name>.yaml: the model; the rest is configs/base.yaml and the data
    config = {"model": {"model": {"class_path": throwaway, "init_args": {"hidden": 16}}, "lr": 0.02}}
    path = tmp_path / f"{throwaway}.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", f"--config={CONFIGS / 'base.yaml'}", f"--config={CONFIGS / 'data' / 'synthetic.yaml'}",
                     f"--config={path}",
                     f"--data.train={paths['train']}", f"--data.val={paths['val']}", "--data.test=null",
                     "--data.batch_size=200", "--trainer.max_epochs=1",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    assert type(cli.model.model) is PerTaskLinear
    auc = float(cli.trainer.callback_metrics["val/click/auc"])
    print(f"{throwaway}: val click AUC {auc:.4f}")
    assert auc > 0.6, auc  # it learnt the synthetic click signal (chance is 0.5)
