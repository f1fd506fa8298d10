"""The second wave of the zoo (AdaTT, DSelect-k, MSSM, DBMTL, STEM): each paper's computation against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_lightning import DenseFeature, SparseFeature, Task
from mtl_lightning.architectures import DBMTL, MSSM, STEM, AdaTT, DSelectK
from mtl_lightning.architectures.dselect_k import DSelectKGate, binary_codes, smooth_step

FEATURES = [SparseFeature("user", 30, 4), SparseFeature("item", 20, 4), DenseFeature("price")]
TASKS = [Task("click"), Task("conversion")]


def batch(size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"user": torch.randint(0, 30, (size,), generator=g), "item": torch.randint(0, 20, (size,), generator=g),
            "price": torch.randn(size, generator=g)}


def has_gradient(parameters) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters)


# ---------------------------------------------------------------------------------------------------- DSelect-k
def test_smooth_step_values_and_slopes():
    t = torch.tensor([-0.6, -0.5, -0.25, 0.0, 0.25, 0.5, 0.6], requires_grad=True)
    s = smooth_step(t, gamma=1.0)
    # -2 t^3 + 1.5 t + 0.5 inside [-1/2, 1/2]: S(0.25) = -0.03125 + 0.375 + 0.5
    torch.testing.assert_close(s, torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0]))
    s.sum().backward()  # S'(t) = -6 t^2 + 1.5 inside, 0 outside (and at the ends)
    torch.testing.assert_close(t.grad, torch.tensor([0.0, 0.0, 1.125, 1.5, 1.125, 0.0, 0.0]))
    # gamma = 2: S(0.5) = -2/8 * 0.125 + 3/4 * 0.5 + 0.5
    assert smooth_step(torch.tensor(0.5), gamma=2.0).item() == pytest.approx(0.84375)


def test_binary_codes_most_significant_bit_first():
    assert binary_codes(3).tolist() == [[0, 0], [0, 1], [1, 0]]
    assert binary_codes(4).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert binary_codes(5).shape == (5, 3)


def test_static_gate_selector_and_entropy_by_hand():
    gate = DSelectKGate(input_dim=3, num_experts=4, num_selected=2, per_example=False)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[0.25, -0.25], [0.6, -0.6]]))
        gate.alpha_logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax -> (1/4, 3/4)
    weights, selectors = gate(torch.zeros(5, 3))
    s1, s2 = 0.84375, 0.15625  # S(0.25), S(-0.25)
    # codes 00, 01, 10, 11: (1-S1)(1-S2), (1-S1) S2, S1 (1-S2), S1 S2
    first = torch.tensor([(1 - s1) * (1 - s2), (1 - s1) * s2, s1 * (1 - s2), s1 * s2])
    second = torch.tensor([0.0, 0.0, 1.0, 0.0])  # saturated logits: expert 2 (code 10) alone
    torch.testing.assert_close(selectors[0], torch.stack([first, second]))
    torch.testing.assert_close(weights, (0.25 * first + 0.75 * second).expand(5, 4))
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    entropy = -(first * torch.log(first + 1e-6)).sum() - math.log(1 + 1e-6)  # the one-hot selector: ~0
    torch.testing.assert_close(gate.regularizer(selectors, 0.1), 0.1 * entropy)


def test_unreachable_codes_are_penalised_when_experts_are_not_a_power_of_two():
    gate = DSelectKGate(input_dim=3, num_experts=3, num_selected=1, per_example=False)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[0.25, 0.25]]))
    _, selectors = gate(torch.zeros(2, 3))
    s = 0.84375
    reachable = torch.tensor([(1 - s) ** 2, (1 - s) * s, s * (1 - s)])  # code 11 (s^2) is no expert
    torch.testing.assert_close(selectors[0, 0], reachable)
    entropy = -(reachable * torch.log(reachable + 1e-6)).sum()
    torch.testing.assert_close(gate.regularizer(selectors, 0.5), 0.5 * entropy + 1 / reachable.sum())


def test_dselect_k_model_mixes_experts_and_returns_its_regulariser_in_training_only():
    torch.manual_seed(0)
    model = DSelectK(FEATURES, TASKS, num_experts=4, num_selected=2, expert_hidden=(6,), tower_hidden=(),
                     entropy_weight=0.3)
    x = batch(12)
    outputs = model(x)
    emb = model.embedding(x)
    experts = model.experts(emb)
    expected_aux = 0.0
    for name in model.task_names:  # per-example gate: z = W x + b, alpha = A x + c
        gate = model.gates[name]
        z = gate.z(emb).view(12, 2, 2)
        r = gate.selector_outputs(z)
        q = torch.einsum("bk,bkn->bn", torch.softmax(gate.alpha(emb), -1), r)
        torch.testing.assert_close(outputs[name], model.towers[name]((q.unsqueeze(-1) * experts).sum(1)).squeeze(-1))
        expected_aux = expected_aux + 0.3 * (-(r * torch.log(r + 1e-6)).sum((1, 2))).mean()
    aux = model.auxiliary_loss(outputs, {})
    torch.testing.assert_close(aux, expected_aux)
    assert aux > 0
    aux.backward()  # the regulariser trains the gates' z layers
    assert all(gate.z.weight.grad.abs().sum() > 0 for gate in model.gates.values())
    model.eval()
    assert model.auxiliary_loss(model(x), {}) is None  # a training signal only


def test_dselect_k_gates_become_sparse_under_the_entropy_regulariser():
    """Minimising the entropy alone drives each selector to one expert: at most k non-zero weights."""
    torch.manual_seed(0)
    gate = DSelectKGate(input_dim=4, num_experts=8, num_selected=2, per_example=False)
    optimizer = torch.optim.SGD(gate.parameters(), lr=0.5)
    x = torch.zeros(1, 4)
    for _ in range(300):
        optimizer.zero_grad()
        gate.regularizer(gate(x)[1], 1.0).backward()
        optimizer.step()
    weights, selectors = gate(x)
    assert int((weights > 1e-6).sum()) <= 2
    assert torch.allclose(selectors.max(-1).values, torch.ones(1, 2))
    with pytest.raises(ValueError, match="num_selected"):
        DSelectKGate(4, num_experts=3, num_selected=4)
    with pytest.raises(ValueError, match="num_experts must be >= 2"):
        DSelectKGate(4, num_experts=1, num_selected=1)
    with pytest.raises(ValueError, match="gamma"):
        DSelectKGate(4, num_experts=4, num_selected=1, gamma=0.0)
    with pytest.raises(ValueError, match="entropy_weight"):
        DSelectK(FEATURES, TASKS, entropy_weight=-1.0)


# -------------------------------------------------------------------------------------------------------- AdaTT
def test_adatt_fusion_is_gated_sum_over_all_experts_plus_native_combination():
    torch.manual_seed(0)
    model = AdaTT(FEATURES, TASKS, num_levels=1, num_task_experts=2, num_shared_experts=1, expert_hidden=(5,),
                  tower_hidden=())
    x = batch(9)
    emb = model.embedding(x)
    level = model.levels[0]
    own = {t: level.task_experts[t](emb) for t in model.task_names}  # (B, 2, 5)
    everything = torch.cat([own["click"], own["conversion"], level.shared_experts(emb)], dim=1)  # (B, 5, 5)
    fused = model.fused(x)
    for t in model.task_names:
        g = torch.softmax(level.gates[t].linear(emb), dim=-1)  # over all 5 experts
        v = level.residuals[t].weights
        expected = (g.unsqueeze(-1) * everything).sum(1) + v[0] * own[t][:, 0] + v[1] * own[t][:, 1]
        torch.testing.assert_close(fused[t], expected)
        torch.testing.assert_close(model(x)[t], model.towers[t](expected).squeeze(-1))
    assert level.shared_gate is None  # the last level has no shared fusion unit
    bound = 1 / math.sqrt(2)
    assert all(((r.weights > -bound) & (r.weights < bound)).all() for r in level.residuals.values())


def test_adatt_sp_single_expert_residual_and_levels_feed_each_other():
    torch.manual_seed(0)
    model = AdaTT(FEATURES, TASKS, num_levels=2, num_task_experts=1, num_shared_experts=0, expert_hidden=(6,),
                  tower_hidden=())
    assert model.levels[0].shared_experts is None and model.levels[0].residuals["click"].weights is None
    x = batch(7)
    emb = model.embedding(x)
    first, second = model.levels
    inputs = {}
    for t in model.task_names:  # level 1: every unit reads the embedding; one native expert enters as is
        everything = torch.cat([first.task_experts[n](emb) for n in model.task_names], dim=1)
        inputs[t] = (torch.softmax(first.gates[t].linear(emb), -1).unsqueeze(-1) * everything).sum(1) \
            + first.task_experts[t](emb)[:, 0]
    everything = torch.cat([second.task_experts[n](inputs[n]) for n in model.task_names], dim=1)
    for t in model.task_names:  # level 2: task t's experts and gate read task t's level-1 output
        expected = (torch.softmax(second.gates[t].linear(inputs[t]), -1).unsqueeze(-1) * everything).sum(1) \
            + second.task_experts[t](inputs[t])[:, 0]
        torch.testing.assert_close(model.fused(x)[t], expected)
    with_shared = AdaTT(FEATURES, TASKS, num_levels=2, num_task_experts=1, num_shared_experts=2, expert_hidden=(6,))
    assert with_shared.levels[0].shared_gate is not None and with_shared.levels[1].shared_gate is None
    with pytest.raises(ValueError, match="num_shared_experts"):
        AdaTT(FEATURES, TASKS, num_shared_experts=-1)


# --------------------------------------------------------------------------------------------------------- STEM
def test_stem_gate_reads_every_expert_forward_and_its_own_backward():
    torch.manual_seed(0)
    model = STEM(FEATURES, TASKS, num_levels=1, num_specific_experts=1, num_shared_experts=1, expert_hidden=(6,),
                 tower_hidden=())
    assert set(model.task_embeddings) == {"click", "conversion"}  # one embedding per task beside the shared one
    x = batch(10)
    e_s, e_c, e_v = model.embedding(x), model.task_embeddings["click"](x), model.task_embeddings["conversion"](x)
    level = model.levels[0]
    experts = torch.cat([level.specific["click"](e_c), level.specific["conversion"](e_v), level.shared(e_s)], 1)
    gate = torch.softmax(level.task_gates["click"].mlp(e_c + e_s), -1)  # the gate reads x_t + x_s
    expected = model.towers["click"]((gate.unsqueeze(-1) * experts).sum(1)).squeeze(-1)
    out = model(x)
    torch.testing.assert_close(out["click"], expected)
    # all forward: the other task's experts change the click output ...
    with torch.no_grad():
        level.specific["conversion"].biases[0].add_(1.0)
    assert not torch.allclose(model(x)["click"], out["click"])
    # ... task-specific backward: the click loss never reaches the conversion embedding or experts
    model.zero_grad()
    model(x)["click"].sum().backward()
    conversion_table = model.task_embeddings["conversion"].table_grad("user")
    assert conversion_table is None or conversion_table.abs().sum() == 0
    assert not has_gradient(level.specific["conversion"].parameters())
    assert model.task_embeddings["click"].table_grad("user").abs().sum() > 0
    assert model.embedding.table_grad("user").abs().sum() > 0 and has_gradient(level.shared.parameters())
    assert has_gradient(level.specific["click"].parameters())
    assert level.shared_gate is None


def test_stem_shared_gate_mixes_without_stop_gradient_between_levels():
    """With two levels the shared gate of level 1 feeds level 2's shared experts: every task's level-1 experts learn
    from every task there (the authors' code does the same); the last level keeps the stop-gradient."""
    torch.manual_seed(0)
    model = STEM(FEATURES, TASKS, num_levels=2, expert_hidden=(8,), tower_hidden=())
    model(batch(16))["click"].sum().backward()
    first, last = model.levels
    assert first.shared_gate is not None and last.shared_gate is None
    assert has_gradient(first.specific["conversion"].parameters())
    assert not has_gradient(last.specific["conversion"].parameters())
    private = {id(p) for p in model.task_embeddings.parameters()}
    assert private <= {id(p) for p in model.shared_parameters()}  # with 2 levels they reach every task
    one = STEM(FEATURES, TASKS, num_levels=1, expert_hidden=(8,))
    assert not ({id(p) for p in one.task_embeddings.parameters()} & {id(p) for p in one.shared_parameters()})


# -------------------------------------------------------------------------------------------------------- DBMTL
def test_dbmtl_towers_read_their_parents_relation_outputs():
    torch.manual_seed(0)
    tasks = [Task("click"), Task("conversion"), Task("dwell", kind="regression")]
    model = DBMTL(FEATURES, tasks, dependencies={"conversion": ["click"], "dwell": ["conversion", "click"]},
                  bottom_hidden=(8,), tower_hidden=(6,), relation_hidden=(4,))
    x = batch(11)
    h = model.bottom(model.embedding(x))
    task = {t: model.task_mlps[t](h) for t in model.task_names}
    r_click = model.relation_mlps["click"](task["click"])
    r_conv = model.relation_mlps["conversion"](torch.cat([task["conversion"], r_click], -1))
    r_dwell = model.relation_mlps["dwell"](torch.cat([task["dwell"], r_conv, r_click], -1))
    out = model(x)
    for name, r in (("click", r_click), ("conversion", r_conv), ("dwell", r_dwell)):
        torch.testing.assert_close(out[name], model.outputs[name](r).squeeze(-1))
    # a child's loss trains its parents' towers; a parent's loss never its children's
    model(x)["conversion"].sum().backward()
    assert has_gradient(model.task_mlps["click"].parameters())
    assert not has_gradient(model.task_mlps["dwell"].parameters())
    model.zero_grad()
    model(x)["click"].sum().backward()
    assert not has_gradient(model.task_mlps["conversion"].parameters())
    # default: every task depends on the tasks before it
    chain = DBMTL(FEATURES, tasks, bottom_hidden=(8,), relation_hidden=(4,))
    assert chain.dependencies == {"click": [], "conversion": ["click"], "dwell": ["click", "conversion"]}


def test_dbmtl_order_and_bad_dependencies():
    tasks = [Task("click"), Task("conversion")]
    model = DBMTL(FEATURES, tasks, dependencies={"click": ["conversion"]}, bottom_hidden=(8,))
    assert model.order == ["conversion", "click"]  # parents first, whatever the task order
    with pytest.raises(ValueError, match="cycle"):
        DBMTL(FEATURES, tasks, dependencies={"click": ["conversion"], "conversion": ["click"]})
    with pytest.raises(ValueError, match="unknown tasks"):
        DBMTL(FEATURES, tasks, dependencies={"click": ["purchase"]})
    with pytest.raises(ValueError, match="unknown task 'purchase'"):
        DBMTL(FEATURES, tasks, dependencies={"purchase": ["click"]})
    with pytest.raises(ValueError, match="itself"):
        DBMTL(FEATURES, tasks, dependencies={"click": ["click"]})
    with pytest.raises(ValueError, match="shared layer"):
        DBMTL(FEATURES, tasks, bottom_hidden=(), num_experts=0)


# --------------------------------------------------------------------------------------------------------- MSSM
def test_mssm_field_masks_are_relu_tanh_of_g_dot_e_and_drop_fields_per_task():
    torch.manual_seed(0)
    model = MSSM(FEATURES, TASKS, num_levels=1, num_task_cells=1, num_shared_cells=1, cell_hidden=(5,),
                 transform_dim=3, tower_hidden=())
    x = batch(8)
    flat = model.embedding(x)  # user: columns 0-3, item 4-7, price 8
    g = model.fields.g  # (T + 1, D)
    fields = [slice(0, 4), slice(4, 8), slice(8, 9)]
    masks = model.fields.masks(flat)  # (B, T + 1, F)
    for j in range(3):
        for i, cols in enumerate(fields):  # w_ij = relu(tanh(g_ij . e_i)), per example
            torch.testing.assert_close(masks[:, j, i], torch.relu(torch.tanh(flat[:, cols] @ g[j, cols])))
        expected = torch.cat([masks[:, j, i:i + 1] * flat[:, cols] for i, cols in enumerate(fields)], dim=-1)
        torch.testing.assert_close(model.fields(flat)[:, j], expected)  # E_j = [w_1j e_1, ..., w_nj e_n]
    assert (masks == 0).any() and (masks > 0).any()  # the relu gives exact zeros: sparse per example
    with torch.no_grad():  # g = 0 for the item field closes it (w = relu(tanh(0)) = 0) for click and shared ...
        g[0, 4:8] = 0.0
        g[2, 4:8] = 0.0
        model.levels[0].routing.log_alpha[0, 1] = -20.0  # ... and click routes around conversion's cell
    model.eval()
    other_item = dict(x, item=(x["item"] + 1) % 20)
    assert torch.equal(model(other_item)["click"], model(x)["click"])  # click no longer reads the item
    assert not torch.equal(model(other_item)["conversion"], model(x)["conversion"])  # conversion still does


def test_mssm_cells_are_routed_through_coding_variables_and_transformations():
    torch.manual_seed(0)
    model = MSSM(FEATURES, TASKS, num_levels=2, num_task_cells=1, num_shared_cells=2, cell_hidden=(5,),
                 transform_dim=3, tower_hidden=(), l0_weight=0.01)
    first, last = model.levels
    assert first.routing.log_alpha.shape == (3, 4) and last.routing.log_alpha.shape == (2, 4)  # (I, C)
    assert first.transforms.shape == (3, 4, 5, 3)  # W_ij: (I, C, H, K)
    model.eval()
    x = batch(6)
    units = model.fields(model.embedding(x))
    inputs = {"click": units[:, 0], "conversion": units[:, 1]}
    u = first.cells(inputs, units[:, 2])  # (B, 4, 5): click's cell, conversion's, 2 shared
    z = (torch.sigmoid(first.routing.log_alpha) * 1.2 - 0.1).clamp(0, 1)  # deterministic at evaluation
    v = [sum(z[i, j] * u[:, j] @ first.transforms[i, j] for j in range(4)) for i in range(3)]  # v_i
    out, shared = first(inputs, units[:, 2])
    torch.testing.assert_close(out["click"], v[0])
    torch.testing.assert_close(out["conversion"], v[1])
    torch.testing.assert_close(shared, v[2])
    u2 = last.cells({"click": v[0], "conversion": v[1]}, v[2])
    z2 = (torch.sigmoid(last.routing.log_alpha) * 1.2 - 0.1).clamp(0, 1)
    click = sum(z2[0, j] * u2[:, j] @ last.transforms[0, j] for j in range(4))
    torch.testing.assert_close(model(x)["click"], model.towers["click"](click).squeeze(-1))
    penalty = sum(torch.sigmoid(level.routing.log_alpha + (2 / 3) * math.log(1.1 / 0.1)).sum()
                  for level in model.levels)
    torch.testing.assert_close(model.auxiliary_loss({}, {}), 0.01 * penalty)
    model.train()
    torch.manual_seed(1)
    a = model(x)["click"]
    assert not torch.equal(a, model(x)["click"])  # coding variables are sampled in training
    with pytest.raises(ValueError, match="transform_dim"):
        MSSM(FEATURES, TASKS, transform_dim=0)
