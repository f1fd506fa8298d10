"""The optimizer's weight-decay groups (``mtl_lightning.optim``): which parameters decay, and by how much."""

from __future__ import annotations

import pytest
import torch

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, registry
from mtl_lightning.optim import CombinedOptimizer, build_optimizers, no_weight_decay


def module(name: str = "shared_bottom", **kwargs) -> MultiTaskLightningModule:
    torch.manual_seed(0)
    size = {"shared_bottom": dict(bottom_hidden=(8,), tower_hidden=(4,), batch_norm=True),
            "mmoe": dict(num_experts=2, expert_hidden=(8,), tower_hidden=(4,))}[name]
    model = registry.create(name, features=synthetic_features(4), tasks=synthetic_tasks(), **size)
    return MultiTaskLightningModule(model, **kwargs)


def group_names(m: MultiTaskLightningModule, optimizer: torch.optim.Optimizer) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in m.named_parameters()}
    return [(g.get("weight_decay"), {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


TOWER_WEIGHTS = {f"model.towers.{t}.{k}.weight" for t in ("click", "conversion", "dwell") for k in (0, 2)}


def test_only_weight_matrices_decay():
    m = module(weighting="uncertainty", weight_decay=0.1, optimizer="adamw")
    (decay, decayed), (zero, rest) = group_names(m, m.configure_optimizers())
    assert (decay, zero) == (0.1, 0.0)
    assert decayed == {"model.bottom.0.weight"} | TOWER_WEIGHTS
    # biases, the BatchNorm's scale and shift, the embedding table and the strategy's log sigma^2 do not decay
    assert {"model.bottom.0.bias", "model.bottom.1.weight", "model.bottom.1.bias", "model.embedding.fused.dim4.weight",
            "weighting.log_variances"} <= rest
    assert decayed | rest == {n for n, _ in m.named_parameters()} and not decayed & rest
    # the expert bank's batched weights (E, in, out) decay, its batched biases (E, out) do not
    m = module("mmoe", weight_decay=0.1)
    (_, decayed), (_, rest) = group_names(m, m.configure_optimizers())
    gates = {f"model.gates.{t}.linear.weight" for t in ("click", "conversion", "dwell")}
    assert decayed == {"model.experts.weights.0"} | gates | TOWER_WEIGHTS
    assert "model.experts.biases.0" in rest
    m = module("mmoe", weight_decay=0.1, decay_embeddings=True)
    assert "model.embedding.fused.dim4.weight" in group_names(m, m.configure_optimizers())[0][1]


def test_decay_shrinks_only_the_decayed_group_by_the_sgd_factor():
    """SGD with lr=1, weight_decay=0.25 and zero gradients: p <- p - (0 + 0.25 p) = 0.75 p for the decayed group."""
    m = module(optimizer="sgd", lr=1.0, weight_decay=0.25)
    optimizer = m.configure_optimizers()
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in m.named_parameters():
        expected = 0.75 * before[n] if id(p) in decayed else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=n)


def test_zero_decay_keeps_one_group_and_sparse_tables_stay_apart():
    m = module(weight_decay=0.0)
    assert [g["weight_decay"] for g in m.configure_optimizers().param_groups] == [0.0]
    sparse = module("mmoe", weight_decay=0.1, sparse_embeddings=True)
    optimizer = sparse.configure_optimizers()
    assert isinstance(optimizer, CombinedOptimizer)
    groups = group_names(sparse, optimizer)
    assert groups[0][1] == {"model.embedding.fused.dim4.weight"} and [d for d, _ in groups[1:]] == [0.1, 0.0]
    with pytest.raises(ValueError, match="decay_embeddings=True cannot apply with sparse_embeddings=True"):
        module(decay_embeddings=True, sparse_embeddings=True)
    with pytest.raises(ValueError, match="optimizer_kwargs may not hold lr or weight_decay"):
        module(optimizer_kwargs={"weight_decay": 0.1})
    with pytest.raises(ValueError, match=r"optimizer_kwargs \['lr'\]"):
        build_optimizers(list(m.parameters()), optimizer_kwargs={"lr": 0.1})
    # the GradNorm weights are never the model optimizer's; strategy parameters never decay
    g = module(weighting="gradnorm", weight_decay=0.1)
    assert all(p is not g.weighting.weights for grp in g.configure_optimizers().param_groups for p in grp["params"])
    assert id(g.weighting.weights) in no_weight_decay(g, exclude=[g.weighting])
