"""The architecture zoo: each paper's characteristic computation, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_lightning import DenseFeature, SparseFeature, Task, registry
from mtl_lightning.architectures import APG, HMoE, PEPNet, POSOMLP, POSOMMoE, STAR, CrossStitch, SNRAver, SNRTrans
from mtl_lightning.architectures.apg import APGLinear
from mtl_lightning.architectures.star import StarLinear
from mtl_lightning.layers import HardConcreteGate, PartitionedNorm

FEATURES = [SparseFeature("user", 30, 4), SparseFeature("item", 20, 4), SparseFeature("domain", 3, 4),
            DenseFeature("price")]
TASKS = [Task("click"), Task("conversion")]


def gets_gradient(parameter: torch.Tensor) -> bool:
    return parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)


def table_gets_gradient(embedding, name: str) -> bool:
    """Whether any row of feature ``name``'s table (its block of the fused weight) got a nonzero gradient."""
    grad = embedding.table_grad(name)
    return grad is not None and bool(grad.abs().sum() > 0)


def batch(size: int = 32, domain: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    domains = torch.arange(size) % 3 if domain is None else torch.full((size,), domain)
    return {"user": torch.randint(0, 30, (size,), generator=g), "item": torch.randint(0, 20, (size,), generator=g),
            "domain": domains, "price": torch.randn(size, generator=g)}


# ----------------------------------------------------------------------------------- hard-concrete gates / SNR
def test_hard_concrete_gate_formulas_and_l0_closed_form():
    gate = HardConcreteGate((2,))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, 1.0]))
    # L0 = sum sigmoid(log_alpha - beta log(-gamma/zeta)); beta log(-gamma/zeta) = (2/3) log(0.1/1.1) = -1.598597
    assert gate.l0_penalty().item() == pytest.approx(0.831822 + 0.930771, abs=1e-5)
    gate.eval()  # deterministic: clip(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)
    expected = torch.tensor([0.5 * 1.2 - 0.1, 0.7310586 * 1.2 - 0.1])
    torch.testing.assert_close(gate(3), expected.expand(3, 2))
    gate.train()
    torch.manual_seed(7)
    sample = gate(1000)
    torch.manual_seed(7)
    u = torch.rand(1000, 2).clamp(torch.finfo(torch.float32).eps, 1 - torch.finfo(torch.float32).eps)
    s = torch.sigmoid((u.log() - (1 - u).log() + gate.log_alpha) / (2 / 3))
    torch.testing.assert_close(sample, (s * 1.2 - 0.1).clamp(0, 1))
    assert (sample == 0).any() and (sample == 1).any()  # exact zeros and ones occur in training
    with pytest.raises(ValueError, match="gamma < 0"):
        HardConcreteGate((1,), gamma=0.1)


@pytest.mark.parametrize("cls", [SNRTrans, SNRAver])
def test_snr_routing_gates_and_penalty(cls):
    torch.manual_seed(0)
    model = cls(FEATURES, TASKS, num_experts=3, expert_hidden=(6,), tower_hidden=(), l0_weight=0.01)
    x = batch(16)
    model.eval()
    first = model(x)
    for name, value in model(x).items():  # deterministic at evaluation
        torch.testing.assert_close(value, first[name])
    u = model.experts(model.embedding(x))  # (B, E, H)
    z = (torch.sigmoid(model.gates.log_alpha) * 1.2 - 0.1).clamp(0, 1)  # (T, E)
    for k in range(len(TASKS)):
        if cls is SNRTrans:  # v_k = sum_e z_ke W_ke u_e
            manual = sum(z[k, e] * u[:, e] @ model.transforms[k, e] for e in range(3))
        else:  # v_k = sum_e z_ke u_e
            manual = sum(z[k, e] * u[:, e] for e in range(3))
        torch.testing.assert_close(model.routed(x)[:, k], manual)
    model.train()
    torch.manual_seed(1)
    a = model(x)["click"]
    b = model(x)["click"]
    assert not torch.equal(a, b)  # gates are sampled in training
    penalty = torch.sigmoid(model.gates.log_alpha + (2 / 3) * math.log(1.1 / 0.1)).sum()
    torch.testing.assert_close(model.auxiliary_loss(a, {}), 0.01 * penalty)
    model.auxiliary_loss(a, {}).backward()
    assert model.gates.log_alpha.grad.abs().min() > 0  # the penalty trains every gate


# ------------------------------------------------------------------------------------------------- cross-stitch
def test_cross_stitch_identity_is_independent_columns_and_init_is_near_identity():
    torch.manual_seed(0)
    model = CrossStitch(FEATURES, TASKS, column_hidden=(8, 5), tower_hidden=(), self_weight=1.0)
    x = batch(10)
    emb = model.embedding(x)
    out = model(x)
    for k, name in enumerate(model.task_names):  # each task is its own MLP column
        h = emb
        for w, b in zip(model.weights, model.biases):
            h = torch.relu(h @ w[k] + b[k])
        torch.testing.assert_close(out[name], model.towers[name](h).squeeze(-1))
    near = CrossStitch(FEATURES, [Task("a"), Task("b"), Task("c")], column_hidden=(4,), self_weight=0.9)
    torch.testing.assert_close(near.stitches[0], torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                                               [0.05, 0.05, 0.9]]))
    # mixing: the stitched activation of task k is sum_j alpha_kj h_j
    h = torch.relu(torch.einsum("bi,tio->bto", near.embedding(x), near.weights[0]) + near.biases[0])
    torch.testing.assert_close(near.columns(x)[:, 0], 0.9 * h[:, 0] + 0.05 * h[:, 1] + 0.05 * h[:, 2])


# --------------------------------------------------------------------------------------------------------- HMoE
def test_hmoe_mixes_scenario_probabilities_in_label_space():
    torch.manual_seed(0)
    tasks = [Task("click"), Task("dwell", kind="regression")]
    model = HMoE(FEATURES, tasks, num_experts=2, expert_hidden=(6,), tower_hidden=(4,))
    x = batch(12)
    emb = model.embedding(x)
    experts = model.experts(emb)
    out = model(x)
    for task in tasks:
        predictions = model.scenario_predictions(emb, experts, task.name)  # (B, S)
        weights = torch.stack([model.stacked_gates[task.name][d](emb[i:i + 1])[0]
                               for i, d in enumerate(x["domain"].tolist())])
        torch.testing.assert_close(weights.sum(-1), torch.ones(12))
        if task.kind == "binary":
            p = (weights * torch.sigmoid(predictions)).sum(-1)
            torch.testing.assert_close(out[task.name], torch.log(p) - torch.log1p(-p), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(out[task.name], (weights * predictions).sum(-1))
    gate = model.stacked_gates["click"][1].linear
    assert gate.bias.tolist() == [0.0, 2.0, 0.0]  # starts favouring its own scenario


# ------------------------------------------------------------------------------------------------------- PEPNet
def test_pepnet_gates_lie_in_zero_two_and_stop_gradients_hold():
    torch.manual_seed(0)
    model = PEPNet(FEATURES, TASKS, prior_features=("user",), tower_hidden=(8, 4), gate_hidden=8)
    x = batch(32)
    flat = model.embedding(x)
    with torch.no_grad():  # push the gates towards saturation: still strictly inside (0, 2)
        model.epnet.mlp.last_linear().weight.mul_(10)
    delta = model.epnet_gate(flat, flat)
    assert delta.shape == (32, 4 * 3 + 1) and (delta > 0).all() and (delta < 2).all()
    assert delta.max() > 1.9 and delta.min() < 0.2  # a wide spread, yet bounded
    # EPNet: the gate reads sg(E): its gradient reaches the domain embedding only
    model.zero_grad()
    delta.sum().backward()
    embedding = model.embedding
    assert table_gets_gradient(embedding, "domain")
    assert not table_gets_gradient(embedding, "user") and not table_gets_gradient(embedding, "item")
    # PPNet: gates read the prior features and sg(O_ep): no gradient into EPNet or non-prior tables
    model.zero_grad()
    flat = model.embedding(x)
    o_ep = model.epnet_gate(flat, flat) * flat
    gates = model.ppnet_gates(flat, o_ep)
    assert [g.shape for g in gates] == [(32, 2, 13), (32, 2, 8), (32, 2, 4)]
    assert all(((g > 0) & (g < 2)).all() for g in gates)
    sum(g.sum() for g in gates).backward()
    assert not any(gets_gradient(p) for p in model.epnet.parameters())
    assert table_gets_gradient(embedding, "user")
    assert not table_gets_gradient(embedding, "item") and not table_gets_gradient(embedding, "domain")
    # the tower: every layer's input is scaled by its task's PPNet gate
    model.zero_grad()
    with torch.no_grad():
        gates = model.ppnet_gates(flat, o_ep)
        h = o_ep
        layers = model.towers["conversion"]
        for i, (linear, gate) in enumerate(zip(layers, gates)):
            h = linear(gate[:, 1] * h)
            h = torch.relu(h) if i < len(layers) - 1 else h
        torch.testing.assert_close(model(x)["conversion"], h.squeeze(-1))


# --------------------------------------------------------------------------------------------------------- POSO
def test_poso_gates_scale_modules_and_a_neutral_gate_is_the_plain_network():
    torch.manual_seed(0)
    x = batch(16)
    mlp = POSOMLP(FEATURES, TASKS, personalization_features=("user",), bottom_hidden=(8, 6), tower_hidden=(),
                  gate_hidden=4)
    code = mlp.code(mlp.embedding(x))
    assert code.shape == (16, 4)  # x_pc is the user embedding only
    for gate in mlp.gates:
        g = gate(code)
        assert ((g > 0) & (g < 2)).all()
    for gate in mlp.gates:  # logit 0 -> 2 * sigmoid(0) = 1: the plain MLP
        torch.nn.init.zeros_(gate.mlp.last_linear().weight), torch.nn.init.zeros_(gate.mlp.last_linear().bias)
    h = mlp.embedding(x)
    for layer in mlp.layers:
        h = torch.relu(layer(h))
    torch.testing.assert_close(mlp.bottom(x), h)

    mmoe = POSOMMoE(FEATURES, TASKS, personalization_features=("user", "domain"), num_experts=3, expert_hidden=(5,),
                    tower_hidden=(), gate_hidden=4)
    flat = mmoe.embedding(x)
    scale = mmoe.personal_gate(mmoe.code(flat))  # one value per expert, in (0, 2)
    assert scale.shape == (16, 3) and ((scale > 0) & (scale < 2)).all()
    torch.testing.assert_close(mmoe.personalized_experts(flat, flat), scale.unsqueeze(-1) * mmoe.experts(flat))
    mixed = torch.einsum("be,beh->bh", mmoe.gates["click"](flat), scale.unsqueeze(-1) * mmoe.experts(flat))
    torch.testing.assert_close(mmoe(x)["click"], mmoe.towers["click"](mixed).squeeze(-1))


# ---------------------------------------------------------------------------------------------------------- APG
@pytest.mark.parametrize("overparam_dim", [0, 7])
def test_apg_layer_is_x_times_u_s_v(overparam_dim):
    torch.manual_seed(0)
    layer = APGLinear(6, 5, condition_dim=3, rank=4, generator_hidden=8, overparam_dim=overparam_dim)
    with torch.no_grad():
        layer.bias.normal_()
    x, z = torch.randn(9, 6), torch.randn(9, 3)
    S = layer.generator(z).view(9, 4, 4)
    U = layer.u_factors[0] if not overparam_dim else layer.u_factors[0] @ layer.u_factors[1]
    V = layer.v_factors[0] if not overparam_dim else layer.v_factors[0] @ layer.v_factors[1]
    assert U.shape == (6, 4) and V.shape == (4, 5)
    for i in range(9):  # instance-specific weight W_i = U S_i V
        torch.testing.assert_close(layer(x, z)[i], x[i] @ (U @ S[i] @ V) + layer.bias, atol=1e-5, rtol=1e-5)
    fresh = APGLinear(6, 5, condition_dim=3, rank=4, generator_hidden=8)
    torch.testing.assert_close(fresh.generator.last_linear().bias, torch.eye(4).flatten())  # S starts near I
    with pytest.raises(ValueError, match="overparam_dim"):
        APGLinear(6, 5, 3, rank=4, generator_hidden=8, overparam_dim=3)


def test_apg_condition_from_named_features_or_the_input():
    torch.manual_seed(0)
    x = batch(8)
    scenario = APG(FEATURES, TASKS, condition_features=("domain",), hidden=(6,), rank=3, generator_hidden=4,
                   tower_hidden=())
    flat = scenario.embedding(x)
    expected = torch.relu(scenario.layers[0](flat, flat[:, 8:12]))  # domain embedding sits after user and item
    torch.testing.assert_close(scenario.bottom(x), expected)
    itself = APG(FEATURES, TASKS, hidden=(6, 5), rank=3, generator_hidden=4, tower_hidden=())
    flat = itself.embedding(x)
    h = torch.relu(itself.layers[0](flat, flat))
    torch.testing.assert_close(itself.bottom(x), torch.relu(itself.layers[1](h, h)))


# --------------------------------------------------------------------------------------------------------- STAR
def test_star_effective_weight_is_the_elementwise_product():
    torch.manual_seed(0)
    layer = StarLinear(4, 3, num_domains=2)
    with torch.no_grad():
        layer.domain_weight.normal_(), layer.domain_bias.normal_()
    x, domain = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    out = layer(x, domain)
    for i, p in enumerate(domain.tolist()):
        w = layer.domain_weight[p] * layer.weight
        torch.testing.assert_close(out[i], x[i] @ w + layer.bias + layer.domain_bias[p])
    torch.testing.assert_close(layer.effective_weight()[1], layer.domain_weight[1] * layer.weight)


def test_partitioned_norm_uses_each_domains_statistics():
    torch.manual_seed(0)
    norm = PartitionedNorm(3, num_domains=3, momentum=0.5)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_(), norm.domain_weight.normal_(), norm.domain_bias.normal_()
    x = torch.randn(10, 3) * 2 + 1
    domain = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])  # no row of domain 2
    out = norm(x, domain)
    for p in (0, 1):
        rows = domain == p
        mu, var = x[rows].mean(0), x[rows].var(0, unbiased=False)
        expected = (norm.weight * norm.domain_weight[p]) * (x[rows] - mu) / torch.sqrt(var + 1e-5) \
            + norm.bias + norm.domain_bias[p]
        torch.testing.assert_close(out[rows], expected)
        # moving statistics: 0.5 * initial + 0.5 * batch (unbiased variance)
        torch.testing.assert_close(norm.running_mean[p], 0.5 * mu)
        torch.testing.assert_close(norm.running_var[p], 0.5 + 0.5 * x[rows].var(0, unbiased=True))
    torch.testing.assert_close(norm.running_mean[2], torch.zeros(3))  # absent domain unchanged
    torch.testing.assert_close(norm.running_var[2], torch.ones(3))
    norm.eval()  # evaluation: that domain's moving statistics
    y, d = torch.randn(4, 3), torch.tensor([2, 1, 0, 1])
    expected = torch.stack([
        (norm.weight * norm.domain_weight[p]) * (y[i] - norm.running_mean[p]) / torch.sqrt(norm.running_var[p] + 1e-5)
        + norm.bias + norm.domain_bias[p] for i, p in enumerate(d.tolist())])
    torch.testing.assert_close(norm(y, d), expected)


def test_star_logit_is_star_output_plus_auxiliary_network():
    torch.manual_seed(0)
    model = STAR(FEATURES, TASKS, star_hidden=(6,), auxiliary_hidden=(3,))
    model.eval()
    x = batch(9)
    flat = model.embedding(x)
    h = torch.relu(model.layers[0](model.norm(flat, x["domain"]), x["domain"]))
    aux = model.auxiliary["click"](flat[:, 8:12])  # the auxiliary network reads the domain embedding
    torch.testing.assert_close(model(x)["click"], (model.outputs["click"](h, x["domain"]) + aux).squeeze(-1))


# ------------------------------------------------------------------------------------------- multi-scenario rules
def per_domain_gradients(model, d: int) -> list[tuple[str, torch.Tensor]]:
    """(name, gradient) of everything that belongs to domain ``d`` alone (zeros where no gradient reached it)."""

    def grad(parameter: torch.Tensor, index: int | None = None) -> torch.Tensor:
        g = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
        return g if index is None else g[index]

    table = model.embedding.table_grad("domain")  # the domain table's rows of the fused weight
    parts = [("domain embedding row", torch.zeros(4) if table is None else table[d])]
    if isinstance(model, STAR):
        for name, module in model.named_modules():
            if isinstance(module, (StarLinear, PartitionedNorm)):
                parts += [(f"{name}.domain_weight[{d}]", grad(module.domain_weight, d)),
                          (f"{name}.domain_bias[{d}]", grad(module.domain_bias, d))]
    if isinstance(model, HMoE):
        parts += [(f"scenario {d} parameter {i}", grad(p)) for i, p in enumerate(model.domain_parameters(d))]
    return parts


MULTI_SCENARIO = {
    "star": lambda: STAR(FEATURES, TASKS, star_hidden=(8, 6), auxiliary_hidden=(4,)),
    "hmoe": lambda: HMoE(FEATURES, TASKS, num_experts=2, expert_hidden=(8,), tower_hidden=(4,)),
    "pepnet": lambda: PEPNet(FEATURES, TASKS, prior_features=("user",), tower_hidden=(8,), gate_hidden=4),
    "apg": lambda: APG(FEATURES, TASKS, condition_features=("domain",), hidden=(8,), rank=3, generator_hidden=4,
                       tower_hidden=()),
}


@pytest.mark.parametrize("name", sorted(MULTI_SCENARIO))
def test_per_domain_parameters_learn_only_from_their_domain(name):
    torch.manual_seed(0)
    model = MULTI_SCENARIO[name]()
    for d in range(3):
        model.zero_grad()
        outputs = model(batch(24, domain=d, seed=d))
        sum(o.sum() for o in outputs.values()).backward()
        for other in range(3):
            for label, grad_view in per_domain_gradients(model, other):
                if other == d:
                    assert grad_view.abs().sum() > 0, f"{name}: {label} gets no gradient from its own domain"
                else:
                    assert grad_view.abs().sum() == 0, f"{name}: {label} gets gradient from domain {d}"


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).multi_scenario])
def test_domain_feature_is_checked(name):
    cls = registry.get(name)
    model = cls(FEATURES, TASKS, num_domains=2)
    x = batch(6)  # ids 0, 1, 2
    with pytest.raises(ValueError, match=r"domain feature 'domain' has id 2, outside \[0, 2\)"):
        model(x)
    with pytest.raises(ValueError, match="no domain feature 'domain'"):
        model({k: v for k, v in x.items() if k != "domain"})
    with pytest.raises(ValueError, match="domain_feature='scene' is not one of the features"):
        cls(FEATURES, TASKS, domain_feature="scene")
    with pytest.raises(ValueError, match="must be a SparseFeature"):
        cls(FEATURES, TASKS, domain_feature="price")
    with pytest.raises(ValueError, match="exceeds the vocab_size 3"):
        cls(FEATURES, TASKS, num_domains=4)
    assert cls(FEATURES, TASKS).num_domains == 3  # default: the domain feature's vocabulary


def test_scenario_dataset_has_three_domains_with_their_own_signal():
    from datamodules.synthetic_scenarios import make_scenario_table, scenario_features

    table = make_scenario_table(6000, seed=3).to_pandas()
    shares = table["domain"].value_counts(normalize=True).sort_index().tolist()
    assert shares == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    assert set(table.columns) >= {f.name for f in scenario_features()} | {"click", "conversion"}
    assert (table.loc[table.click == 0, "conversion"] == -1).all()
    assert set(table.loc[table.click == 1, "conversion"]) == {0.0, 1.0}
    # each dense feature drives clicks in its own domain only
    for d in range(3):
        rows = table[table.domain == d]
        corr = [rows[f"dense_{j}"].corr(rows["click"]) for j in range(3)]
        assert corr[d] > 0.2 and all(abs(c) < 0.1 for j, c in enumerate(corr) if j != d), (d, corr)
