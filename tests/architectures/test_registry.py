"""The one registry class, held to the same behaviour for architectures, weighting strategies and interactions.

Each registry gets a throwaway subclass of its base (defined here, so its
import path is real) registered for one test and unregistered afterwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import mtl_lightning.registry as registry_module
from mtl_lightning import SparseFeature, Task, registry
from mtl_lightning.architectures import ARCHITECTURES, MultiTaskArchitecture
from mtl_lightning.architectures.shared_bottom import SharedBottom
from mtl_lightning.config import build
from mtl_lightning.interactions import INTERACTIONS, Interaction, create_interaction, register_interaction
from mtl_lightning.registry import Registry
from mtl_lightning.weighting import STRATEGIES, Static, WeightingStrategy, create_weighting, register_weighting


class ThrowawayArchitecture(SharedBottom):
    """SharedBottom under another name."""


class ThrowawayStrategy(Static):
    """Static weighting under another name."""


class ThrowawayInteraction(Interaction):
    """Scales the flat input by one learnable number (output_dim == input_dim)."""

    def __init__(self, input_dim: int, num_fields: int = 1, field_dim: int | None = None, scale: float = 1.0) -> None:
        super().__init__(input_dim, num_fields, field_dim)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale  # (B, D)


class FieldSum(Interaction):
    """Sums the per-field vectors: ``(B, F, d) -> (B, d)``."""

    view = "field"

    def __init__(self, input_dim: int, num_fields: int = 1, field_dim: int | None = None) -> None:
        super().__init__(input_dim, num_fields, field_dim)
        self.output_dim = self.field_dim

    def forward(self, x: Tensor) -> Tensor:
        return x.sum(dim=1)  # (B, d)


# (registry, its base, a throwaway subclass, a registered name, a class of another registry)
CASES = {
    "architecture": (ARCHITECTURES, MultiTaskArchitecture, ThrowawayArchitecture, "mmoe", Static),
    "weighting": (STRATEGIES, WeightingStrategy, ThrowawayStrategy, "gradnorm", SharedBottom),
    "interaction": (INTERACTIONS, Interaction, ThrowawayInteraction, None, Static),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    kind = request.param
    reg, _, cls, _, _ = CASES[kind]
    name = f"throwaway_{kind}"
    yield kind, name, *CASES[kind]
    if name in reg:
        reg.unregister(name)
    assert name not in reg and "registry_name" not in cls.__dict__


def test_every_registry_has_the_same_decorator_lookup_errors_and_class_path_checks(case):
    kind, name, reg, base, cls, builtin, foreign = case
    assert isinstance(reg, Registry) and reg.kind == kind and reg.base is base
    # the decorator registers, sets registry_name and returns the class itself
    assert name not in reg and name not in reg.names()
    assert reg.register(name)(cls) is cls
    assert reg.register(name)(cls) is cls  # the same class under the same name again: nothing happens
    assert cls.registry_name == name and reg.get(name) is cls and reg[name] is cls and name in reg.names()
    assert reg.names() == sorted(reg) and len(reg) == len(reg.names()) and dict(reg.items())[name] is cls
    if builtin is not None:
        assert reg.get(builtin).registry_name == builtin

    # a name is one class's, a class has one name, and only subclasses of the base are taken
    other = type("Other", (cls,), {})
    with pytest.raises(ValueError, match=f"{kind} name '{name}' is already registered by {cls.__name__}"):
        reg.register(name)(other)
    with pytest.raises(ValueError, match=f"already registered as {kind} '{name}'"):
        reg.register(f"{name}_again")(cls)
    with pytest.raises(TypeError, match=f"decorates {base.__name__} subclasses"):
        reg.register("not_a_subclass")(nn.Linear)
    with pytest.raises(ValueError, match="without dots"):
        reg.register("with.dot")
    assert "not_a_subclass" not in reg and f"{name}_again" not in reg

    # an unknown name: the closest registered one and every registered one
    with pytest.raises(ValueError, match=f"unknown {kind} '{name}x' \\(did you mean '{name}'\\?\\); registered "
                                         f"names: {', '.join(reg.names())}$"):
        reg.get(f"{name}x")
    with pytest.raises(ValueError, match=f"unknown {kind} 'zzzzzz'; registered names: "):  # nothing close
        reg.create("zzzzzz")
    with pytest.raises(KeyError, match=f"did you mean '{name}'"):
        reg[f"{name}x"]

    # class paths from configs and checkpoints: a registered name, a class name or an import path of a subclass
    path = f"{__name__}.{cls.__qualname__}"
    assert reg.resolve(name, "key") is cls and reg.resolve(cls.__name__, "key") is cls and reg.resolve(path, "key") is cls
    for outside in ("subprocess.run", "torch.nn.Linear", f"{foreign.__module__}.{foreign.__qualname__}"):
        with pytest.raises(TypeError, match=f"key: class_path '{outside}' is .*not a subclass of "
                                            f".*{base.__qualname__}"):
            reg.resolve(outside, "key")
        with pytest.raises(TypeError, match="not a subclass"):
            reg.build({"class_path": outside, "init_args": {"args": ["echo", "called"]}}, "key")
    with pytest.raises(ValueError, match=f"key: class_path '{foreign.registry_name}' is not a registered name"):
        reg.resolve(foreign.registry_name, "key")  # another registry's name

    # unregistering removes the name everywhere, class paths by name included
    reg.unregister(name)
    assert name not in reg and "registry_name" not in cls.__dict__
    with pytest.raises(ValueError, match="is not a registered name"):
        reg.resolve(name, "key")


class Widget(nn.Module):
    pass


class Gadget(Widget):
    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.size = size


def test_a_registry_needs_its_base_class_once():
    fresh: Registry[Widget] = Registry("widget")
    with pytest.raises(TypeError, match="the widget registry has no base class yet"):
        fresh.register("gadget")(Gadget)
    assert fresh.base_class(Widget) is Widget and fresh.base_class(Widget) is Widget
    with pytest.raises(TypeError, match="already has the base class Widget"):
        fresh.base_class(Gadget)
    fresh.register("gadget")(Gadget)
    assert fresh.create("gadget", size=3).size == 3 and repr(fresh) == "Registry('widget': gadget)"
    del fresh["gadget"]
    assert len(fresh) == 0 and "registry_name" not in Gadget.__dict__


def test_module_functions_and_decorators_are_the_registries():
    """``registry.register/names/get/create`` are the architecture registry's; ``register_weighting`` and
    ``register_interaction`` are their registries' ``register``."""
    assert registry.names() == ARCHITECTURES.names() and registry.get("mmoe") is ARCHITECTURES["mmoe"]
    model = registry.create("mmoe", features=[SparseFeature("user", 5, 2)], tasks=[Task("click")], num_experts=2)
    assert type(model) is registry.get("mmoe") and model.experts.num_experts == 2
    try:
        assert registry.register("throwaway_architecture")(ThrowawayArchitecture) is ThrowawayArchitecture
        assert ARCHITECTURES.get("throwaway_architecture") is ThrowawayArchitecture
        assert register_weighting("throwaway_weighting")(ThrowawayStrategy) is ThrowawayStrategy
        assert type(create_weighting("throwaway_weighting")) is ThrowawayStrategy
        assert type(build({"class_path": "throwaway_weighting"}, WeightingStrategy, "weighting",
                          registered=STRATEGIES)) is ThrowawayStrategy
        assert register_interaction("throwaway_interaction")(ThrowawayInteraction) is ThrowawayInteraction
        assert INTERACTIONS.get("throwaway_interaction") is ThrowawayInteraction
    finally:
        for reg, name in ((ARCHITECTURES, "throwaway_architecture"), (STRATEGIES, "throwaway_weighting"),
                          (INTERACTIONS, "throwaway_interaction")):
            if name in reg:
                reg.unregister(name)


def test_create_interaction_builds_for_the_input_shape():
    """By name, ``{"name": ..., **options}`` or ``class_path`` dict; the shape comes from the caller."""
    x = torch.arange(12.0).view(3, 4)
    try:
        register_interaction("throwaway_scale")(ThrowawayInteraction)
        register_interaction("throwaway_field_sum")(FieldSum)
        assert create_interaction(None, input_dim=4) is None
        by_name = create_interaction("throwaway_scale", input_dim=4)
        assert isinstance(by_name, ThrowawayInteraction) and by_name.output_dim == 4
        assert torch.equal(by_name(x), x)
        halved = create_interaction({"name": "throwaway_scale", "scale": 0.5}, input_dim=4)
        assert torch.equal(halved(x), x / 2)
        by_path = create_interaction({"class_path": f"{__name__}.ThrowawayInteraction", "init_args": {"scale": 3}},
                                     input_dim=4)
        assert torch.equal(by_path(x), 3 * x)
        fields = create_interaction("throwaway_field_sum", input_dim=6, num_fields=3, field_dim=2)
        assert fields.output_dim == 2
        assert torch.equal(fields(torch.ones(5, 3, 2)), torch.full((5, 2), 3.0))

        with pytest.raises(ValueError, match=r"needs field_dim with num_fields \* field_dim == input_dim"):
            create_interaction("throwaway_field_sum", input_dim=6, num_fields=2, field_dim=2)
        with pytest.raises(ValueError, match=r"model.interaction: \['input_dim'\] are set from the input layer"):
            create_interaction({"name": "throwaway_scale", "input_dim": 9}, input_dim=4, key="model.interaction")
        with pytest.raises(ValueError, match="unknown interaction 'throwaway_scal' \\(did you mean 'throwaway_scale'"):
            create_interaction("throwaway_scal", input_dim=4)
        with pytest.raises(TypeError, match="'torch.nn.Linear' is a class that is not a subclass of "
                                            ".*interactions.base.Interaction"):
            create_interaction({"class_path": "torch.nn.Linear", "init_args": {"in_features": 1}}, input_dim=4)
        with pytest.raises(ValueError, match="needs 'name'"):
            create_interaction({"scale": 2.0}, input_dim=4)
        with pytest.raises(ValueError, match=r"unknown entries \['dict_kwargs'\]"):
            create_interaction({"class_path": "throwaway_scale", "dict_kwargs": {}}, input_dim=4)
        with pytest.raises(TypeError, match="must be a name or a dict"):
            create_interaction(3, input_dim=4)
        with pytest.raises(TypeError, match="view must be one of"):
            type("Sideways", (ThrowawayInteraction,), {"view": "diagonal"})
    finally:
        for name in ("throwaway_scale", "throwaway_field_sum"):
            if name in INTERACTIONS:
                INTERACTIONS.unregister(name)


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module an ``import`` statement of ``path`` names (functions' bodies included), made absolute."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = f"{base}.{node.module}" if base and node.module else (node.module or base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_registry_module_imports_none_of_the_packages_it_serves():
    """``registry.py`` never imports ``architectures`` / ``weighting`` / ``interactions``; they import it."""
    imported = _imported_modules(Path(registry_module.__file__), "mtl_lightning")
    served = ("mtl_lightning.architectures", "mtl_lightning.weighting", "mtl_lightning.interactions")
    assert not [m for m in imported if m.startswith(served)], sorted(imported)
    assert "mtl_lightning.config.resolve_class" in imported  # class paths are checked by config.resolve_class
