"""Creating and registering strategies, every registered strategy with sparse embeddings, and what a strategy reads
(declared in its class), from which TorchRecStrategy's refusal follows."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.architectures import MMoE
from mtl_lightning.config import build
from mtl_lightning.features import DenseFeature, SequenceFeature
from mtl_lightning.weighting import (
    STRATEGIES, GradientStrategy, GradNorm, Static, WeightingStrategy,
    create_weighting,
    register_weighting,
)

from tests.weighting.toys import tasks


# ------------------------------------------------------------------ the factory
def test_create_weighting_by_name_dict_or_object():
    for name, cls in STRATEGIES.items():
        assert type(create_weighting(name)) is cls
    strategy = create_weighting({"name": "gradnorm", "alpha": 0.5})
    assert isinstance(strategy, GradNorm) and strategy.alpha == 0.5
    assert isinstance(create_weighting(strategy.config()), GradNorm)
    assert create_weighting(strategy) is strategy
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        create_weighting("nope")
    with pytest.raises(ValueError, match="needs 'name'"):
        create_weighting({"alpha": 1.0})
    with pytest.raises(TypeError, match="weighting must be"):
        create_weighting(3)
    static = Static()
    static.setup(tasks(2), nn.Module())
    with pytest.raises(ValueError, match="one loss per task"):
        static(torch.ones(3))



def test_a_strategy_registers_itself_with_the_decorator():
    import mtl_lightning.weighting as package

    assert {"static", "gradnorm", "uncertainty", "dwa", "rlw", "pcgrad", "scheduled", "dbmtl"} <= set(STRATEGIES)
    for name, cls in STRATEGIES.items():  # every registered class is importable from the package, under its name
        assert cls.registry_name == name and getattr(package, cls.__name__) is cls and cls.__name__ in package.__all__

    @register_weighting("halved")
    class Halved(WeightingStrategy):
        def total_loss(self, losses, per_task):
            return self._weighted_sum(torch.full_like(losses, 0.5), losses)

    try:
        assert STRATEGIES["halved"] is Halved and isinstance(create_weighting("halved"), Halved)
        built = build({"class_path": "halved"}, WeightingStrategy, "weighting", registered=STRATEGIES)
        assert isinstance(built, Halved)
        with pytest.raises(ValueError, match="'halved' is already registered by Halved"):
            register_weighting("halved")(type("Other", (Halved,), {}))
        with pytest.raises(TypeError, match="decorates WeightingStrategy subclasses"):
            register_weighting("module")(nn.Linear)
    finally:
        del STRATEGIES["halved"]



def test_every_registered_strategy_runs_with_sparse_embeddings():
    """``needs_embedding_gradients`` is false for every built-in strategy, and that is true: each takes a
    training step with sparse table gradients (the gradient strategies densify, combine and hand back sparse)."""
    features = synthetic_features(4)
    batch = {}
    generator = torch.Generator().manual_seed(0)
    for f in features:
        if isinstance(f, SequenceFeature):
            batch[f.name] = torch.randint(0, f.vocab_size, (16, f.max_len), generator=generator)
        elif isinstance(f, DenseFeature):
            batch[f.name] = torch.randn(16, generator=generator)
        else:
            batch[f.name] = torch.randint(0, f.vocab_size, (16,), generator=generator)
    labels = {"click": torch.tensor([0.0, 1.0] * 8), "conversion": torch.tensor([1.0, -1.0, 0.0, -1.0] * 4),
              "dwell": torch.randn(16, generator=generator)}
    for name in sorted(STRATEGIES):
        torch.manual_seed(0)
        model = MMoE(features, synthetic_tasks(), num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
        module = MultiTaskLightningModule(model, weighting=name, sparse_embeddings=True)
        assert not module.weighting.needs_embedding_gradients
        losses = module.compute_losses(model(batch), labels)
        module.weighting([losses[t.name] for t in module.tasks]).backward()
        (table,) = model.embedding.embedding_parameters()
        assert table.grad.is_sparse and torch.isfinite(table.grad.coalesce().values()).all(), name
        assert table.grad.coalesce().values().abs().sum() > 0, name



# ---------------------------------------------------- per-task gradients of the shared parameters
# what each strategy reads is declared in its own file (or by its base class): ``reads``, from which
# ``takes_shared_gradients`` and the TorchRec refusal are derived; no list of names is kept here


def test_what_a_strategy_reads_is_declared_and_the_torchrec_advice_derived_from_it():
    """A new strategy declares ``reads`` in its own class; the refusal message of TorchRecStrategy lists it among the
    runnable ones (loss-only) or not (per-task shared gradients) without any list being edited."""
    from mtl_lightning.distributed import refused_weighting
    from mtl_lightning.weighting.base import READS

    assert all(cls.reads in READS for cls in STRATEGIES.values())
    assert STRATEGIES["pcgrad"].reads == "shared_gradients" and STRATEGIES["static"].reads == "losses"
    assert STRATEGIES["gradnorm"].reads == "last_shared_gradients" and STRATEGIES["modo"].reads == "sampled_gradients"
    with pytest.raises(TypeError, match="reads must be one of"):
        type("Wrong", (WeightingStrategy,), {"reads": "everything", "total_loss": lambda self, l, p: l.sum()})

    class Halves(WeightingStrategy):  # loss-only
        def total_loss(self, losses, per_task):
            return self._weighted_sum(torch.full_like(losses, 0.5), losses)

    class Projects(GradientStrategy):  # per-task gradients of the shared parameters, by its base class
        def combine(self, gradients, losses=None):
            return gradients.sum(dim=0)

    model = MMoE(synthetic_features(4), synthetic_tasks(), num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    register_weighting("halves_test")(Halves)
    register_weighting("projects_test")(Projects)
    try:
        projects = Projects()
        projects.setup(synthetic_tasks(), model)
        assert projects.takes_shared_gradients and not Halves().takes_shared_gradients
        reason = refused_weighting(projects, model)
        runnable = reason.split("reads no per-task table gradient (")[1].split(")")[0].split(", ")
        assert "halves_test" in runnable and "static" in runnable and "gradnorm" in runnable
        assert "projects_test" not in runnable and "pcgrad" not in runnable and "modo" not in runnable
        assert "mgda(upper_bound=True, representation='<submodule>')" in reason
        assert refused_weighting(Halves(), model) is None
    finally:
        del STRATEGIES["halves_test"], STRATEGIES["projects_test"]



@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_takes_shared_gradients_is_true_of_the_code_and_decides_the_torchrec_refusal(name, monkeypatch):
    """For every registered strategy: a spy on torch.autograd.grad records whether a step takes per-task gradients
    with respect to an embedding table (at least one call per task); that must equal ``takes_shared_gradients``,
    derived from the ``reads`` the strategy declares, and ``refused_weighting`` (TorchRecStrategy's check) refuses
    exactly those. MGDA-UB and GradDrop on a representation, and IMTL-L alone, take no table gradient and are not
    refused; a step that reads a representation takes a gradient of it."""
    from mtl_lightning.distributed import refused_weighting

    features = synthetic_features(4)
    generator = torch.Generator().manual_seed(0)
    batch = {f.name: (torch.randint(0, f.vocab_size, (16, f.max_len), generator=generator)
                      if isinstance(f, SequenceFeature) else torch.randn(16, generator=generator)
                      if isinstance(f, DenseFeature) else torch.randint(0, f.vocab_size, (16,), generator=generator))
             for f in features}
    labels = {"click": torch.tensor([0.0, 1.0] * 8), "conversion": torch.tensor([1.0, 0.0, 0.0, 1.0] * 4),
              "dwell": torch.randn(16, generator=generator)}
    specs = {name: name}
    if name == "mgda":
        specs["mgda_ub"] = {"name": "mgda", "upper_bound": True, "representation": "experts"}
    if name == "graddrop":
        specs["graddrop_z"] = {"name": "graddrop", "representation": "experts"}
    if name == "imtl":
        specs["imtl_l"] = {"name": "imtl", "mode": "loss"}
    for label, spec in specs.items():
        torch.manual_seed(0)
        model = MMoE(features, synthetic_tasks(), num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
        module = MultiTaskLightningModule(model, weighting=spec)
        tables = {id(p) for p in model.embedding.embedding_parameters()}
        parameters = {id(p) for p in model.parameters()}
        seen, of_activations = [], []
        real_grad = torch.autograd.grad

        def spy(outputs, inputs, *args, **kwargs):
            listed = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
            seen.append(any(id(t) in tables for t in listed))
            of_activations.append(not any(id(t) in parameters for t in listed))
            return real_grad(outputs, inputs, *args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", spy)
        losses = module.compute_losses(model(batch), labels)
        module.weighting([losses[t.name] for t in module.tasks]).backward()
        monkeypatch.setattr(torch.autograd, "grad", real_grad)
        takes = module.weighting.takes_shared_gradients
        per_task = sum(seen) >= len(module.tasks)  # one gradient per task (GradNorm: one of its weighted total)
        assert takes == per_task, (label, module.weighting.reads, seen)
        assert (module.weighting.reads == "representation_gradients") == (label in ("mgda_ub", "graddrop_z")), label
        if module.weighting.reads in ("representation_gradients", "sampled_gradients"):
            assert sum(of_activations) >= len(module.tasks), label  # gradients of activations / outputs, per task
        if module.weighting.reads == "losses":
            assert not any(seen), label
        reason = refused_weighting(module.weighting, model)
        assert (reason is not None) == takes, label
        if takes:
            assert "per-task gradients" in reason and type(module.weighting).__name__ in reason
