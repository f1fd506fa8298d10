"""Multi-scenario architectures of the second wave (MetaHeac, M2M, HiNet): their computations against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_lightning import DenseFeature, SparseFeature, Task
from mtl_lightning.architectures import M2M, HiNet, MetaHeac
from mtl_lightning.architectures.m2m import MetaUnit

FEATURES = [SparseFeature("user", 30, 4), SparseFeature("domain", 3, 2), DenseFeature("price")]
TASKS = [Task("click"), Task("dwell", kind="regression")]


def batch(size: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"user": torch.randint(0, 30, (size,), generator=g), "domain": torch.arange(size) % 3,
            "price": torch.randn(size, generator=g)}


def set_gate(gate, bias: list[float]) -> None:
    """A gate that ignores its input: softmax(bias)."""
    with torch.no_grad():
        gate.linear.weight.zero_()
        gate.linear.bias.copy_(torch.tensor(bias))


# ------------------------------------------------------------------------------------------------------ MetaHeac
def test_metaheac_mixes_experts_then_critics_with_scenario_gates():
    torch.manual_seed(0)
    model = MetaHeac(FEATURES, TASKS, num_experts=2, expert_hidden=(5,), num_critics=2, critic_hidden=())
    set_gate(model.expert_gates["click"], [0.0, math.log(3)])  # experts 0.25 / 0.75
    set_gate(model.critic_gates["click"], [math.log(4), 0.0])  # critics 0.8 / 0.2
    x = batch()
    flat = model.embedding(x)
    w, b = model.experts.weights[0], model.experts.biases[0]
    experts = [torch.relu(flat @ w[i] + b[i]) for i in range(2)]  # expert_i(x), by hand
    representation = 0.25 * experts[0] + 0.75 * experts[1]
    critics = [model.critics["click"][j][0] for j in range(2)]  # critic_hidden=(): one linear layer each
    expected = 0.8 * (representation @ critics[0].weight.T + critics[0].bias) \
        + 0.2 * (representation @ critics[1].weight.T + critics[1].bias)
    torch.testing.assert_close(model(x)["click"], expected.squeeze(-1))
    # the gates read the scenario's embedding only: the same user in another scenario changes the other task's
    # gates (which still have their random weights), the same scenario with another user does not
    t = flat[:, model.task_slice]
    torch.testing.assert_close(t, model.embedding.table_weight("domain")[x["domain"]])
    gates = model.expert_gates["dwell"](t)
    assert not torch.allclose(gates[0], gates[1]) and torch.allclose(gates[0], gates[3])  # domains 0, 1, 0


# ----------------------------------------------------------------------------------------------------------- M2M
def test_meta_unit_generates_weight_and_bias_from_the_scenario():
    unit = MetaUnit(scenario_dim=1, in_dim=2, out_dim=1)
    with torch.no_grad():
        unit.weight_generator.weight.copy_(torch.tensor([[1.0], [2.0]]))  # W(s) = [1, 2] s + [0, 1]
        unit.weight_generator.bias.copy_(torch.tensor([0.0, 1.0]))
        unit.bias_generator.weight.copy_(torch.tensor([[0.5]]))  # b(s) = 0.5 s - 1
        unit.bias_generator.bias.copy_(torch.tensor([-1.0]))
    s = torch.tensor([[3.0], [1.0]])  # W = [3, 7], b = 0.5 ; W = [1, 3], b = -0.5
    z = torch.tensor([[2.0, 1.0], [1.0, -1.0]])
    # row 0: relu(2*3 + 1*7 + 0.5) = 13.5 ; row 1: relu(1*1 - 1*3 - 0.5) = 0
    torch.testing.assert_close(unit(z, s), torch.tensor([[13.5], [0.0]]))
    # (B, N, in): each example's generated layer on its N rows, both rows of z for both examples:
    # example 0 (W = [3, 7], b = 0.5): 13.5, relu(3 - 7 + 0.5) = 0; example 1 (W = [1, 3], b = -0.5): 4.5, 0
    torch.testing.assert_close(unit(torch.stack([z, z]), s), torch.tensor([[[13.5], [0.0]], [[4.5], [0.0]]]))


def test_m2m_with_neutral_meta_parts_is_the_mean_expert_through_the_output_layer():
    torch.manual_seed(0)
    model = M2M(FEATURES, TASKS, num_experts=3, expert_hidden=(6,), scenario_hidden=(4,), attention_dim=3,
                tower_layers=2)
    x = batch()
    assert model.attention_weights(model.experts(model.embedding(x)), model.scenario_knowledge(
        model.embedding(x)), 0).sum(-1).allclose(torch.ones(9))
    with torch.no_grad():  # zero generators: uniform attention, meta layers output relu(0) = 0 (residual only)
        for unit in [model.attention, *model.towers["click"], *model.towers["dwell"]]:
            for p in unit.parameters():
                p.zero_()
    experts = model.experts(model.embedding(x))  # (B, K, H)
    for task in ("click", "dwell"):
        layer = model.outputs[task]
        torch.testing.assert_close(model(x)[task], (experts.mean(1) @ layer.weight.T + layer.bias).squeeze(-1))
    # the scenario knowledge reads only the scenario features (here the domain), not the user
    other_user = {**x, "user": (x["user"] + 1) % 30}
    torch.testing.assert_close(model.scenario_knowledge(model.embedding(x)),
                               model.scenario_knowledge(model.embedding(other_user)))


# --------------------------------------------------------------------------------------------------------- HiNet
def test_hinet_san_attends_to_the_other_scenarios_and_builds_shared_own_other():
    torch.manual_seed(0)
    model = HiNet(FEATURES, TASKS, num_shared_experts=2, num_scenario_experts=2, scenario_expert_hidden=(5,),
                  task_expert_hidden=(4,), tower_hidden=())
    with torch.no_grad():
        model.san.weight.zero_()
        model.san.bias.copy_(torch.tensor([0.0, math.log(2), math.log(3)]))  # scores 1 : 2 : 3
    x = batch()
    flat = model.embedding(x)
    domain = x["domain"]
    weights = model.san_weights(flat[:, model.scenario_slice], domain)
    hand = {0: [0, 2 / 5, 3 / 5], 1: [1 / 4, 0, 3 / 4], 2: [1 / 3, 2 / 3, 0]}  # own scenario left out
    torch.testing.assert_close(weights, torch.tensor([hand[int(d)] for d in domain]))
    c = model.scenario_layer(flat, domain, flat[:, model.scenario_slice])  # [G ; S_d ; A]
    every = model.scenario_representations(flat)  # (B, S, H)
    rows = torch.arange(9)
    torch.testing.assert_close(c[:, 5:10], every[rows, domain])
    torch.testing.assert_close(c[:, 10:], torch.einsum("bs,bsh->bh", weights, every))
    # G: the shared experts mixed by the example's own scenario's gate
    for d in range(3):
        set_gate(model.shared_gates[d], [0.0, math.log(d + 1)])  # second expert's weight (d + 1) / (d + 2)
    shared = model.shared_experts(flat)  # (B, 2, H)
    share = (domain + 1).float() / (domain + 2).float()
    expected = (1 - share)[:, None] * shared[:, 0] + share[:, None] * shared[:, 1]
    torch.testing.assert_close(model.scenario_layer(flat, domain, flat[:, model.scenario_slice])[:, :5], expected)
    # scenario j's representation uses scenario j's experts and gate only
    experts = model.scenario_experts(flat).view(9, 3, 2, 5)
    torch.testing.assert_close(every[:, 1], torch.einsum("be,beh->bh", model.scenario_gates[1](flat), experts[:, 1]))


def test_hinet_with_one_scenario_has_no_other_scenarios():
    model = HiNet(FEATURES, TASKS, num_domains=1, scenario_expert_hidden=(5,), task_expert_hidden=(4,))
    x = {**batch(), "domain": torch.zeros(9, dtype=torch.long)}
    flat = model.embedding(x)
    c = model.scenario_layer(flat, x["domain"], flat[:, model.scenario_slice])
    assert torch.equal(c[:, 10:], torch.zeros(9, 5))
    with pytest.raises(ValueError, match=r"domain feature 'domain' has id 2, outside \[0, 1\)"):
        model(batch())
