"""One test over every registered architecture, plus per-architecture properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtl_lightning import DenseFeature, SequenceFeature, SparseFeature, Task, registry
from mtl_lightning.architectures import MMoE, PLE, MultiTaskArchitecture, SharedBottom
from mtl_lightning.layers import FeatureEmbedding

FEATURES = [
    SparseFeature("user", 50, 8),
    SparseFeature("item", 40, 8),
    DenseFeature("price"),
    DenseFeature("vector", dim=3),
    SequenceFeature("history", 40, max_len=5, embedding_dim=8, shared_with="item"),
]
TASKS = [Task("click"), Task("conversion"), Task("dwell", kind="regression")]
SMALL = {
    "shared_bottom": dict(bottom_hidden=(16,), tower_hidden=(8,)),
    "mmoe": dict(num_experts=3, expert_hidden=(16,), tower_hidden=(8,)),
    "ple": dict(num_levels=2, expert_hidden=(16,), tower_hidden=(8,)),
    "esmm": dict(bottom_hidden=(16,), tower_hidden=(8,)),
    "escm": dict(bottom_hidden=(16,), tower_hidden=(8,)),
    "aitm": dict(bottom_hidden=(16,), tower_hidden=(8,)),
    "snr_trans": dict(num_experts=3, expert_hidden=(16,), transform_dim=8, tower_hidden=(8,)),
    "snr_aver": dict(num_experts=3, expert_hidden=(16,), tower_hidden=(8,)),
    "cross_stitch": dict(column_hidden=(16, 8), tower_hidden=(8,)),
    "hmoe": dict(num_experts=3, expert_hidden=(16,), tower_hidden=(8,)),
    "pepnet": dict(prior_features=("user", "item"), tower_hidden=(16, 8), gate_hidden=8),
    "poso_mlp": dict(personalization_features=("user",), bottom_hidden=(16, 8), tower_hidden=(8,), gate_hidden=8),
    "poso_mmoe": dict(personalization_features=("user",), num_experts=3, expert_hidden=(16,), tower_hidden=(8,),
                      gate_hidden=8),
    "apg": dict(hidden=(16, 8), rank=4, generator_hidden=8, overparam_dim=6, tower_hidden=(8,)),
    "star": dict(star_hidden=(16, 8), auxiliary_hidden=(4,)),
    "adatt": dict(num_levels=2, num_task_experts=2, num_shared_experts=1, expert_hidden=(16,), tower_hidden=(4,)),
    "dselect_k": dict(num_experts=3, num_selected=2, expert_hidden=(8,), tower_hidden=(4,)),
    "mssm": dict(num_levels=2, num_task_cells=1, num_shared_cells=2, cell_hidden=(8,), transform_dim=6,
                 tower_hidden=(4,)),
    "dbmtl": dict(bottom_hidden=(16,), num_experts=2, expert_hidden=(8,), tower_hidden=(8,), relation_hidden=(4,)),
    "stem": dict(num_levels=2, expert_hidden=(8,), gate_hidden=(8,), tower_hidden=(4,)),
    "metaheac": dict(num_experts=3, expert_hidden=(8,), num_critics=2, critic_hidden=(4,)),
    "m2m": dict(scenario_features=("user",), num_experts=3, expert_hidden=(8,), scenario_hidden=(6,),
                attention_dim=5, tower_layers=2),
    "hinet": dict(num_shared_experts=2, num_scenario_experts=2, scenario_expert_hidden=(8,), num_task_experts=1,
                  num_task_shared_experts=1, task_expert_hidden=(8,), tower_hidden=(4,)),
    "dcmt": dict(bottom_hidden=(16,), tower_hidden=(8,)),
}
# Architectures whose tasks are fixed by their structure (CVR funnels: binary steps only).
TASKS_FOR = {
    "esmm": [Task("ctr", label="click"), Task("ctcvr", label="purchase")],
    "escm": [Task("ctr", label="click"), Task("cvr", label="conversion"), Task("ctcvr", label="purchase")],
    "aitm": [Task("click"), Task("purchase"), Task("repurchase")],
    "dcmt": [Task("ctr", label="click"), Task("cvr", label="conversion"), Task("ctcvr", label="purchase")],
}
# Multi-scenario architectures (``multi_scenario = True``) get a 3-domain sparse feature.
DOMAIN = SparseFeature("domain", 3, 4)
# The inputs every architecture is run with: the plain flat input; a DIN-encoded group of two aligned behaviour
# sequences (the item history sharing the item table, a category history with its own) read with the candidate's
# item and category; and a DCN-v2 interaction in front of the bottom (MSSM refuses one, saying why).
GROUP_FEATURES = [
    *FEATURES[:4], SparseFeature("cat", 6, 8),
    SequenceFeature("history", 40, max_len=5, embedding_dim=8, shared_with="item", pooling="din", query="item",
                    group="clicks", pooling_options={"attention_hidden": (8,)}),
    SequenceFeature("history_cat", 6, max_len=5, embedding_dim=8, pooling="din", query="cat", group="clicks",
                    pooling_options={"attention_hidden": (8,)}),
]
INPUTS = ["plain", "din_group", "dcn_v2"]


def arguments(name: str, inputs: str = "plain") -> dict:
    """Features, tasks and small hyper-parameters for the registered architecture ``name``."""
    features = GROUP_FEATURES if inputs == "din_group" else FEATURES
    kwargs = dict(features=features, tasks=TASKS_FOR.get(name, TASKS), **SMALL.get(name, {}))
    if inputs == "dcn_v2":
        kwargs["interaction"] = {"name": "dcn_v2", "num_layers": 2}
        if name == "adatt":  # 4 ReLU tower units can all be dead on the crossed input at this seed: 8 are not
            kwargs["tower_hidden"] = (8,)
    if registry.get(name).multi_scenario:
        kwargs.update(features=[*features, DOMAIN], domain_feature="domain", num_domains=3)
    return kwargs


def feature_batch(batch_size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 40, (batch_size, 5), generator=g)
    history[0] = 0  # an all-padding row
    return {
        "user": torch.randint(0, 50, (batch_size,), generator=g),
        "item": torch.randint(0, 40, (batch_size,), generator=g),
        "price": torch.randn(batch_size, generator=g),
        "vector": torch.randn(batch_size, 3, generator=g),
        "history": history,
        "cat": torch.randint(0, 6, (batch_size,), generator=g),
        "history_cat": torch.where(history > 0, history % 5 + 1, 0),  # aligned with history: the same clicks
        "domain": torch.arange(batch_size) % 3,  # read only by multi-scenario architectures
    }


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("name", registry.names())
def test_every_architecture_forward_and_backward(name, inputs):
    torch.manual_seed(0)
    if inputs == "dcn_v2" and registry.get(name).interaction_refused:
        with pytest.raises(ValueError, match="takes no interaction="):
            registry.create(name, **arguments(name, inputs))
        return
    model = registry.create(name, **arguments(name, inputs))
    assert isinstance(model, MultiTaskArchitecture)
    x = feature_batch(64)
    outputs = model(x)
    assert set(outputs) >= {t.name for t in model.tasks}
    assert set(outputs) == set(model.output_names)  # extra outputs are declared
    for task in model.tasks:
        assert outputs[task.name].shape == (64,), task.name
        assert torch.isfinite(outputs[task.name]).all(), task.name
    total = sum(out.sum() for out in outputs.values())
    aux = model.auxiliary_loss(outputs, {})
    if aux is not None:
        total = total + aux
    total.backward()
    for pname, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"{name}: no gradient reaches {pname}"
            assert torch.isfinite(parameter.grad).all(), f"{name}: non-finite gradient in {pname}"
            assert parameter.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"
    # declared parameter groups are real parameters of the model; GradNorm's W is shared, never an embedding
    own = {id(p) for p in model.parameters()}
    shared = {id(p) for p in model.shared_parameters()}
    last = model.last_shared_parameters()
    assert shared <= own and len(shared) > 0
    assert last and {id(p) for p in last} <= shared
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert not ({id(p) for p in last} & embeddings)
    # the sequence encoder and the interaction are shared parameters (gradient strategies act on them)
    input_layers = [m for m in model.modules() if isinstance(m, FeatureEmbedding)]
    extra = [p for layer in input_layers for p in [*layer.encoders.parameters(),
                                                   *(layer.interaction.parameters() if layer.interaction else [])]]
    if inputs != "plain":
        assert extra, f"{name}: the {inputs} input is missing"
    if name != "stem":  # STEM's task embeddings (and their encoders) are task-specific by design
        assert {id(p) for p in extra} <= shared, f"{name}: encoder/interaction parameters are not shared"


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("name", registry.names())
def test_every_architecture_rebuilds_from_its_config(name, inputs):
    if inputs == "dcn_v2" and registry.get(name).interaction_refused:
        pytest.skip(f"{name} refuses interactions")
    torch.manual_seed(0)
    model = registry.create(name, **arguments(name, inputs))
    from mtl_lightning.config import build

    clone = build(model.config(), MultiTaskArchitecture, "model")
    assert type(clone) is type(model)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = feature_batch(8)
    for task, out in model(x).items():
        torch.testing.assert_close(clone(x)[task], out)


MULTI_SCENARIO_NAMES = [n for n in registry.names() if registry.get(n).multi_scenario]


@pytest.mark.parametrize("name", MULTI_SCENARIO_NAMES)
def test_multi_scenario_architectures_keep_and_read_their_domain(name):
    torch.manual_seed(0)
    model = registry.create(name, **arguments(name)).eval()
    assert (model.domain_feature, model.num_domains) == ("domain", 3)
    x = feature_batch(12)
    shifted = {**x, "domain": (x["domain"] + 1) % 3}  # the same rows in another scenario
    with torch.no_grad():
        before, after = model(x), model(shifted)
    assert any(not torch.allclose(before[t], after[t]) for t in model.task_names), f"{name} ignores its domain"


def test_multi_scenario_flag_needs_domain_arguments():
    assert {"star", "hmoe", "pepnet"} <= set(MULTI_SCENARIO_NAMES) and not SharedBottom.multi_scenario
    with pytest.raises(TypeError, match=r"must take domain_feature= and num_domains=; it lacks \['num_domains'\]"):
        class NoDomainCount(SharedBottom):  # noqa: F841
            multi_scenario = True

            def __init__(self, features, tasks, domain_feature: str = "domain") -> None:
                super().__init__(features, tasks)


def test_registry_names_and_unknown_name():
    assert {"shared_bottom", "mmoe", "ple"} <= set(registry.names())
    with pytest.raises(ValueError, match="registered names: .*mmoe"):
        registry.create("mmoee", features=FEATURES, tasks=TASKS)
    assert registry.get("mmoe") is MMoE and registry.get("ple") is PLE and registry.get("shared_bottom") is SharedBottom


def test_mmoe_gates_mix_experts_as_in_the_paper():
    torch.manual_seed(0)
    model = MMoE(FEATURES, TASKS[:2], num_experts=3, expert_hidden=(6,), tower_hidden=())
    x = feature_batch(4)
    emb = model.embedding(x)
    experts = model.experts(emb)  # (B, E, H)
    assert experts.shape == (4, 3, 6)
    for e in range(3):  # expert e is relu(x W_e + b_e)
        manual = torch.relu(emb @ model.experts.weights[0][e] + model.experts.biases[0][e])
        torch.testing.assert_close(experts[:, e], manual)
    gate = torch.softmax(model.gates["click"].linear(emb), dim=-1)
    mixed = (gate.unsqueeze(-1) * experts).sum(1)
    torch.testing.assert_close(model(x)["click"], model.towers["click"](mixed).squeeze(-1))


def test_ple_levels_and_gates():
    model = PLE(FEATURES, TASKS[:2], num_levels=3, num_specific_experts=2, num_shared_experts=1,
                expert_hidden=(8,), tower_hidden=())
    assert [level.shared_gate is not None for level in model.levels] == [True, True, False]
    # a task gate mixes its own experts and the shared ones; the shared gate mixes all of them
    assert model.levels[0].task_gates["click"].linear.out_features == 3
    assert model.levels[0].shared_gate.linear.out_features == 2 * 2 + 1
    # the last level's task experts are private: not among the shared parameters
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) not in shared for p in model.levels[-1].specific.parameters())
    assert all(id(p) in shared for p in model.levels[0].specific.parameters())


def test_sequence_pooling_ignores_padding():
    from mtl_lightning.layers import FeatureEmbedding

    for pooling in ("mean", "sum", "max"):
        seq = SequenceFeature("s", 10, max_len=4, embedding_dim=3, pooling=pooling)
        layer = FeatureEmbedding([seq])
        ids = torch.tensor([[2, 5, 0, 0], [0, 0, 0, 0]])
        out = layer({"s": ids})
        table = layer.table_weight("s")
        expected = {"mean": (table[2] + table[5]) / 2, "sum": table[2] + table[5],
                    "max": torch.maximum(table[2], table[5])}[pooling]
        torch.testing.assert_close(out[0], expected)
        torch.testing.assert_close(out[1], torch.zeros(3))


def test_field_view_and_bad_specs():
    from mtl_lightning.layers import FeatureEmbedding

    layer = FeatureEmbedding(FEATURES, field_view=True)
    x = feature_batch(5)
    assert layer(x, view="field").shape == (5, len(FEATURES), 8)
    assert layer(x).shape == (5, layer.output_dim) and layer.output_dim == 8 + 8 + 1 + 3 + 8
    with pytest.raises(ValueError, match="no feature 'price'"):
        layer({k: v for k, v in x.items() if k != "price"})
    with pytest.raises(ValueError, match="one embedding_dim"):
        FeatureEmbedding([SparseFeature("a", 5, 4), SparseFeature("b", 5, 8)], field_view=True)
    with pytest.raises(ValueError, match="shared_with='nope'"):
        FeatureEmbedding([SequenceFeature("s", 5, 3, shared_with="nope")])
    with pytest.raises(ValueError, match="pooling"):
        SequenceFeature("s", 5, 3, pooling="median")
    with pytest.raises(ValueError, match="kind"):
        Task("t", kind="ranking")
    with pytest.raises(ValueError, match="unique"):
        SharedBottom(FEATURES, [Task("a"), Task("a")])


def test_ple_with_one_level_is_cgc():
    """CGC (Tang et al., RecSys 2020) is PLE with ``num_levels=1``: task gates over own + shared experts, no shared gate."""
    torch.manual_seed(0)
    model = PLE(FEATURES, TASKS[:2], num_levels=1, num_specific_experts=2, num_shared_experts=1, expert_hidden=(6,),
                tower_hidden=())
    assert len(model.levels) == 1 and model.levels[0].shared_gate is None
    x = feature_batch(7)
    emb = model.embedding(x)
    level = model.levels[0]
    shared = level.shared(emb)  # (B, 1, 6)
    for name in model.task_names:
        experts = torch.cat([level.specific[name](emb), shared], dim=1)  # own experts first, then the shared one
        gate = torch.softmax(level.task_gates[name].linear(emb), dim=-1)  # (B, 3)
        mixed = (gate.unsqueeze(-1) * experts).sum(1)
        torch.testing.assert_close(model(x)[name], model.towers[name](mixed).squeeze(-1))


def test_mmoe_with_one_gate_is_omoe():
    """OMoE (the one-gate baseline of Ma et al., KDD 2018) is MMoE with ``single_gate=True``."""
    torch.manual_seed(0)
    model = MMoE(FEATURES, TASKS[:2], num_experts=3, expert_hidden=(6,), tower_hidden=(), single_gate=True)
    assert list(model.gates) == ["shared"]
    x = feature_batch(5)
    emb = model.embedding(x)
    mixed = (torch.softmax(model.gates["shared"].linear(emb), -1).unsqueeze(-1) * model.experts(emb)).sum(1)
    for name in model.task_names:  # every tower reads the same mixture
        torch.testing.assert_close(model(x)[name], model.towers[name](mixed).squeeze(-1))
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.gates.parameters())  # the one gate serves every task
    multi = MMoE(FEATURES, TASKS[:2], num_experts=3, expert_hidden=(6,), tower_hidden=())
    assert sorted(multi.gates) == ["click", "conversion"]
    assert not any(id(p) in {id(q) for q in multi.shared_parameters()} for p in multi.gates.parameters())


# state_dict keys and shapes of every architecture built by ``arguments(name)``, written by the code of 807107a
STATE_DICTS = Path(__file__).with_name("architecture_state_dicts.json")


@pytest.mark.parametrize("name", sorted(json.loads(STATE_DICTS.read_text())))
def test_checkpoints_written_before_still_fit(name):
    """The parameter and buffer names and shapes are those earlier checkpoints hold, so they load (strict)."""
    recorded = json.loads(STATE_DICTS.read_text())[name]
    torch.manual_seed(0)
    model = registry.create(name, **arguments(name))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == recorded
    model.load_state_dict({k: torch.zeros(shape) for k, shape in recorded.items()})
