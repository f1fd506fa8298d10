"""Weighting strategies as plain modules: formulas against hand-computed numbers, gradients, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import MMoE
from mtl_lightning.config import build
from mtl_lightning.features import DenseFeature, SequenceFeature
from mtl_lightning.weighting import (
    DBMTL, DWA, RLW, STRATEGIES, GradientStrategy, GradNorm, PCGrad, Scheduled, Static, Uncertainty, WeightingStrategy,
    create_weighting,
    register_weighting,
)
from mtl_lightning.weighting.dwa import dwa_weights
from mtl_lightning.weighting.moco import project_to_simplex
from mtl_lightning.weighting.pcgrad import project_conflicting


class Toy(nn.Module):
    """A shared layer ``W`` (the last and only shared layer) and one linear head per task."""

    def __init__(self, num_tasks: int = 2, width: int = 8, hidden: int = 4) -> None:
        super().__init__()
        self.shared = nn.Linear(width, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.shared(x))
        return [head(h).squeeze(-1) for head in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared.parameters())


def tasks(n: int = 2, kinds: tuple[str, ...] | None = None) -> list[Task]:
    kinds = kinds or ("regression",) * n
    return [Task(f"t{i}", kind=k) for i, k in enumerate(kinds)]


def flat_grad(parameters) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in parameters])


# --------------------------------------------------------------------- GradNorm
def test_gradnorm_balances_gradient_norms_of_a_loss_scaled_by_100():
    torch.manual_seed(0)
    model = Toy()
    gradnorm = GradNorm(alpha=1.5, lr=0.01)
    gradnorm.setup(tasks(2), model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 8)
    y = [x[:, :4].sum(1) + torch.randn(256), x[:, 4:].sum(1) + torch.randn(256)]  # noisy: losses plateau
    ratios = []
    for _ in range(150):
        outputs = model(x)
        losses = torch.stack([((outputs[0] - y[0]) ** 2).mean(), 100 * ((outputs[1] - y[1]) ** 2).mean()])
        optimizer.zero_grad()
        gradnorm(losses).backward()
        gradnorm.before_optimizer_step()
        optimizer.step()
        norms = gradnorm.last_grad_norms
        ratios.append(float(norms[1] / norms[0]))
        assert torch.isclose(gradnorm.weights.sum(), torch.tensor(2.0))  # always sums to T
    assert 50 < ratios[0] < 200  # the scaled task dominates W's gradient at the start ...
    assert max(ratios[-20:]) < 2  # ... and no longer at the end
    assert gradnorm.weights[1] < 0.1 < 1.9 < gradnorm.weights[0]


def _manual_gradnorm_step(w, adam, g1, g2, l_now, l0, alpha):
    """One GradNorm update written out: G_i, r_i, the gradient of L_grad, Adam, renormalisation."""
    n = torch.stack([g1.norm(), g2.norm()])
    G = w.detach() * n
    ratio = l_now / l0
    r = ratio / ratio.mean()
    target = G.mean() * r ** alpha
    w.grad = torch.sign(G - target) * n  # d/dw_i sum_j |w_j n_j - target_j|
    adam.step()
    with torch.no_grad():
        w.mul_(2 / w.sum())


def test_gradnorm_update_equals_manual_computation():
    W = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    model = nn.Module()
    model.W = W
    model.last_shared_parameters = lambda: [W]
    gradnorm = GradNorm(alpha=1.5, lr=0.1)
    gradnorm.setup(tasks(2), model)
    w_manual = nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([w_manual], lr=0.1)
    l0 = None
    for step, (c1, c2) in enumerate([(1.0, 1.0), (0.5, 2.0), (0.25, 3.0)]):
        L1 = c1 * (W ** 2).sum()  # grad 2 c1 W
        L2 = c2 * W.sum() ** 2 * 0.1  # grad 0.2 c2 sum(W)
        losses = torch.stack([L1, L2])
        weights_before = gradnorm.weights.detach().clone()
        W.grad = None
        total = gradnorm(losses)
        torch.testing.assert_close(total, (weights_before * losses).sum())  # value: the weighted loss
        total.backward()
        g1, g2 = 2 * c1 * W.detach(), 0.2 * c2 * W.detach().sum() * torch.ones(2, 2)
        torch.testing.assert_close(W.grad, weights_before[0] * g1 + weights_before[1] * g2)  # model: w fixed
        gradnorm.before_optimizer_step()
        l_now = losses.detach()
        l0 = l_now if l0 is None else l0
        _manual_gradnorm_step(w_manual, adam, g1, g2, l_now, l0, 1.5)
        torch.testing.assert_close(gradnorm.weights.detach(), w_manual.detach())
        torch.testing.assert_close(gradnorm.initial_losses, l0)
        assert int(gradnorm.num_steps) == step + 1
    assert not torch.allclose(w_manual.detach(), torch.ones(2))


@pytest.mark.parametrize("alpha, expected", [(0.5, (1.826189, 3.652378)), (2.0, (0.461993, 7.391894))])
def test_gradnorm_target_is_mean_norm_times_inverse_rate_to_the_alpha(alpha, expected):
    """``target_i = G_bar * r_i^alpha`` by hand (the weights stay 1: no optimizer step in between).

    W = [[1, -2], [0.5, 3]]: L1 = c1 sum(W^2) (||grad|| = 2 c1 ||W|| = 2 c1 sqrt(14.25)) and
    L2 = 0.1 c2 sum(W)^2 (grad 0.2 c2 * 2.5 everywhere, ||grad|| = c2). Step 1 (c = 1, 1) gives L(0) =
    (14.25, 0.625); step 2 (c = 0.5, 2): L / L(0) = (0.5, 2), r = (0.4, 1.6), G = (sqrt(14.25), 2).
    """
    W = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    model = nn.Module()
    model.W = W
    model.last_shared_parameters = lambda: [W]
    gradnorm = GradNorm(alpha=alpha)
    gradnorm.setup(tasks(2), model)
    for c1, c2 in [(1.0, 1.0), (0.5, 2.0)]:
        gradnorm(torch.stack([c1 * (W ** 2).sum(), 0.1 * c2 * W.sum() ** 2]))
    g_bar = (math.sqrt(14.25) + 2.0) / 2
    torch.testing.assert_close(gradnorm.last_grad_norms, torch.tensor([math.sqrt(14.25), 2.0]))
    torch.testing.assert_close(gradnorm.last_targets, torch.tensor([g_bar * 0.4 ** alpha, g_bar * 1.6 ** alpha]))
    torch.testing.assert_close(gradnorm.last_targets, torch.tensor(expected))


class SparseToy(Toy):
    """``Toy`` reading a sparse-gradient embedding of ids (a shared parameter that is not ``W``)."""

    def __init__(self) -> None:
        super().__init__(num_tasks=3)
        self.embedding = nn.Embedding(20, 8, sparse=True)

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return super().forward(self.embedding(ids))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.weight, *self.shared.parameters()]


@pytest.mark.parametrize("strategy_class", [GradNorm, PCGrad])
def test_model_gradient_equals_plain_backward_and_stays_sparse(strategy_class):
    torch.manual_seed(0)
    model = SparseToy()
    strategy = strategy_class()
    strategy.setup(tasks(3), model)
    ids = torch.randint(0, 20, (32,))
    targets = torch.randn(3, 32)

    def losses():
        return torch.stack([((o - y) ** 2).mean() for o, y in zip(model(ids), targets)])

    losses().sum().backward()  # all weights are 1 at the start: the plain gradient of sum_i L_i
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    strategy(losses()).backward()
    assert model.embedding.weight.grad.is_sparse  # a sparse optimizer still gets sparse gradients
    if strategy_class is GradNorm:  # GradNorm's model gradient is exactly sum_i w_i grad L_i
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.to_dense(), expected[name].to_dense(), msg=name)
    else:  # PCGrad changes the shared gradient only
        for name in ("heads.0.weight", "heads.1.bias", "heads.2.weight"):
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, expected[name], msg=name)


def test_gradnorm_initial_loss_is_mean_of_first_k_positive_steps():
    W = nn.Parameter(torch.ones(3))
    model = nn.Module()
    model.W = W
    model.last_shared_parameters = lambda: [W]
    gradnorm = GradNorm(initial_loss_steps=2)
    gradnorm.setup(tasks(2), model)
    for c1, c2 in [(2.0, 0.0), (4.0, 3.0), (8.0, 5.0), (16.0, 7.0)]:
        gradnorm(torch.stack([c1 * W.sum(), c2 * W.sum()]))
    # W.sum() = 3. task 0: steps 1-2 -> (6 + 12) / 2; task 1: its first loss was 0, so steps 2-3 -> (9 + 15) / 2
    torch.testing.assert_close(gradnorm.initial_losses, torch.tensor([9.0, 12.0]))


def test_gradnorm_state_round_trips_through_state_dict():
    torch.manual_seed(0)
    model = Toy()
    first = GradNorm(lr=0.1)
    first.setup(tasks(2), model)
    x = torch.randn(32, 8)
    for _ in range(3):
        out = model(x)
        first(torch.stack([(out[0] ** 2).mean(), (out[1] - 1).pow(2).mean()])).backward()
        first.before_optimizer_step()
    state = first.state_dict()
    assert {"weights", "initial_loss_sum", "initial_loss_count", "num_steps", "_extra_state"} <= set(state)
    second = GradNorm(lr=0.1)
    second.setup(tasks(2), model)
    second.load_state_dict(state)
    for strategy in (first, second):
        out = model(x)
        strategy(torch.stack([(out[0] ** 2).mean(), (out[1] - 1).pow(2).mean()])).backward()
        strategy.before_optimizer_step()
    torch.testing.assert_close(first.weights, second.weights, rtol=0, atol=0)  # Adam state restored too


def test_gradnorm_rejects_a_model_without_last_shared_layer():
    model = nn.Module()
    model.last_shared_parameters = lambda: []
    with pytest.raises(ValueError, match="last_shared_parameters"):
        GradNorm().setup(tasks(2), model)
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(alpha=-1)


# ------------------------------------------------------------------ Uncertainty
def test_uncertainty_matches_kendall_formula_and_gradient():
    strategy = Uncertainty()
    strategy.setup(tasks(2, ("binary", "regression")), nn.Module())
    with torch.no_grad():
        strategy.log_variances.copy_(torch.tensor([math.log(2.0), 0.0]))
    total = strategy(torch.tensor([0.5, 2.0]))
    # binary: exp(-s) L + s/2 = 0.5 * 0.5 + log(2)/2; regression: 0.5 exp(-s) L + s/2 = 0.5 * 2
    assert total.item() == pytest.approx(0.25 + 1.0 + 0.5 * math.log(2.0))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.5, 0.5]))
    total.backward()
    # d/ds: -exp(-s) L + 1/2 = -0.25 + 0.5 ; -0.5 exp(-s) L + 1/2 = -1 + 0.5
    torch.testing.assert_close(strategy.log_variances.grad, torch.tensor([0.25, -0.5]))


# -------------------------------------------------------------------------- DWA
def test_dwa_weights_follow_the_previous_two_epoch_means():
    strategy = DWA(temperature=2.0)
    strategy.setup(tasks(3), nn.Module())
    dummy = nn.Parameter(torch.ones(()))
    epochs = [[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [[0.25, 2.0, 1.0], [0.75, 2.0, 2.0]]]
    for epoch, steps in enumerate(epochs):
        strategy.begin_epoch(epoch)
        for losses in steps:
            strategy(torch.tensor(losses) * dummy)
            torch.testing.assert_close(strategy.last_weights, torch.ones(3))  # first two epochs: 1
    strategy.begin_epoch(2)
    strategy(torch.tensor([1.0, 1.0, 1.0]) * dummy)
    # epoch means (1, 2, 3) then (0.5, 2, 1.5): r = (0.5, 1, 0.5); w = 3 softmax(r / 2)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = torch.tensor([3 * e1, 3 * e2, 3 * e1]) / (2 * e1 + e2)
    torch.testing.assert_close(strategy.last_weights, expected)
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.913512, 1.172977, 0.913512]))
    torch.testing.assert_close(dwa_weights(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), 2.0),
                               torch.ones(2))  # a zero epoch mean gives ratio 1, not inf


# -------------------------------------------------------------------------- RLW
def test_rlw_draws_softmax_of_normal_weights_reproducibly():
    strategy = RLW(seed=3)
    strategy.setup(tasks(3), nn.Module())
    dummy = nn.Parameter(torch.ones(()))
    z = torch.randn(3, generator=torch.Generator().manual_seed(3))
    expected = [math.exp(v) / sum(math.exp(u) for u in z.tolist()) for v in z.tolist()]
    losses = torch.tensor([1.0, 2.0, 4.0]) * dummy
    total = strategy(losses)
    torch.testing.assert_close(strategy.last_weights, torch.tensor(expected))
    assert total.item() == pytest.approx(expected[0] + 2 * expected[1] + 4 * expected[2], rel=1e-6)
    restored = RLW(seed=3)
    restored.setup(tasks(3), nn.Module())
    restored.load_state_dict(strategy.state_dict())  # the generator continues where it was
    strategy(losses), restored(losses)
    torch.testing.assert_close(restored.last_weights, strategy.last_weights, rtol=0, atol=0)
    assert not torch.allclose(strategy.last_weights, torch.tensor(expected))


# ----------------------------------------------------------------------- PCGrad
def test_pcgrad_projects_conflicting_gradients_exactly():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1 . g2 = -1: g1 - (-1 / 2) g2 = (0.5, 0.5); g2 - (-1 / 1) g1 = (0, 1); sum (0.5, 1.5)
    torch.testing.assert_close(project_conflicting(g), torch.tensor([0.5, 1.5]))
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(project_conflicting(agreeing), agreeing.sum(0))  # passes unchanged
    three = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    # task 0 against 1 then 2: (1,0) -> (0.5,0.5) -> conflicts with (0,-1): (0.5,0); task 1: (0,1) then
    # against 2: dot -1 -> (0,0); task 2: against 0 no conflict, against 1: dot -1 -> (-0.5,-0.5)
    orders = [[1, 2], [0, 2], [0, 1]]
    torch.testing.assert_close(project_conflicting(three, orders), torch.tensor([0.0, -0.5]))


def test_pcgrad_sets_projected_shared_gradient_and_own_task_gradients():
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():  # identical heads pulled towards +1 and -1: conflicting shared gradients
        model.heads[1].load_state_dict(model.heads[0].state_dict())
    strategy = PCGrad()
    strategy.setup(tasks(2), model)
    x = torch.randn(64, 8)
    out = model(x)
    losses = torch.stack([((out[0] - 1) ** 2).mean(), ((out[1] + 1) ** 2).mean()])
    shared = model.shared_parameters()
    per_task = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)])
                for l in losses]
    head_grads = [torch.autograd.grad(losses[i], list(model.heads[i].parameters()), retain_graph=True)
                  for i in range(2)]
    assert per_task[0] @ per_task[1] < 0  # the two targets pull the shared layer apart
    total = strategy(losses)
    assert total.item() == pytest.approx(losses.sum().item())
    total.backward()
    torch.testing.assert_close(flat_grad(shared), project_conflicting(torch.stack(per_task)))
    for i in range(2):
        for p, g in zip(model.heads[i].parameters(), head_grads[i]):
            torch.testing.assert_close(p.grad, g)


# ----------------------------------------------------------------------- DB-MTL
def test_dbmtl_combination_matches_hand_computation():
    model = nn.Module()
    model.shared = nn.Parameter(torch.zeros(2))
    model.shared_parameters = lambda: [model.shared]
    strategy = DBMTL(beta=0.5, beta_sigma=0.5)
    strategy.setup(tasks(2), model)
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    # step 1: h = g + 0.5 (0 - g) = (1.5, 2), (0, 0.5); norms 2.5, 0.5 -> scales 1, 5
    torch.testing.assert_close(strategy.combine(g), torch.tensor([1.5, 4.5]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([1.0, 5.0]))
    # step 2: decay 0.5 / sqrt(2); h1 = (3, 4) - d (1.5, 2), h2 = (0, 1 - 0.5 d); scales 1, 5
    torch.testing.assert_close(strategy.combine(g), torch.tensor([2.469670, 7.409010]))


def test_dbmtl_backpropagates_log_losses_to_task_parameters():
    torch.manual_seed(0)
    model = Toy()
    strategy = DBMTL()
    strategy.setup(tasks(2), model)
    out = model(torch.randn(16, 8))
    losses = torch.stack([((out[0] - 1) ** 2).mean(), ((out[1] + 1) ** 2).mean()])
    expected = torch.autograd.grad(torch.log(losses[1] + 1e-8), list(model.heads[1].parameters()),
                                   retain_graph=True)
    strategy(losses).backward()
    for p, g in zip(model.heads[1].parameters(), expected):
        torch.testing.assert_close(p.grad, g)


# -------------------------------------------------------------------- Scheduled
def test_scheduled_weights_decay_geometrically():
    strategy = Scheduled(gamma={"t0": 0.5}, initial={"t2": 2.0})
    strategy.setup(tasks(3), nn.Module())
    strategy.begin_epoch(2)
    total = strategy(torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.25, 1.0, 2.0]))
    assert total.item() == pytest.approx(3.25)
    by_step = Scheduled(gamma=0.5, unit="step")
    by_step.setup(tasks(2), nn.Module())
    for _ in range(3):
        by_step.before_optimizer_step()
    by_step(torch.ones(2))
    torch.testing.assert_close(by_step.last_weights, torch.tensor([0.125, 0.125]))
    assert "progress" in by_step.state_dict()
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]"):
        Scheduled(gamma={"nope": 0.9}).setup(tasks(2), nn.Module())
    with pytest.raises(ValueError, match="unit"):
        Scheduled(unit="batch")


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


# ------------------------------------------------------------------------- MGDA
def assert_kkt(gram: torch.Tensor, alpha: torch.Tensor, tol: float = 1e-10) -> None:
    """KKT conditions of ``min_{alpha in simplex} alpha^T M alpha``: with ``v = alpha^T M alpha``,
    ``(M alpha)_i = v`` where ``alpha_i > 0`` and ``(M alpha)_i >= v`` everywhere."""
    gram, alpha = gram.double(), alpha.double()
    value, m_alpha = alpha @ gram @ alpha, gram @ alpha
    scale = gram.diagonal().max()
    assert alpha.min() >= 0 and abs(float(alpha.sum()) - 1) <= max(tol, 1e-12)
    assert (m_alpha >= value - tol * scale).all(), (m_alpha, value)
    assert ((m_alpha - value).abs()[alpha > 0] <= tol * scale).all(), (m_alpha, value, alpha)


def test_mgda_min_norm_point_of_two_conflicting_gradients():
    from mtl_lightning.weighting.mgda import MGDA

    strategy = MGDA()
    strategy.setup(tasks(2), Toy())
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # alpha_1 = (g2.g2 - g1.g2) / |g1 - g2|^2 = (2 + 1) / 5: d = 0.6 (1, 0) + 0.4 (-1, 1) = (0.2, 0.4),
    # and d.g1 = d.g2 = 0.2 = |d|^2 (the min-norm point is equally far along both)
    torch.testing.assert_close(strategy.combine(g), torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.6, 0.4]))
    # one gradient inside the other's half-space: the shorter one is the min-norm point, alpha = (0, 1)
    torch.testing.assert_close(strategy.combine(torch.tensor([[2.0, 0.0], [1.0, 1.0]])), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.0, 1.0]))
    # l2 normalisation: unit vectors (1, 0) and (-1, 1)/sqrt 2 weigh 1/2 each; the raw gradients are combined
    l2 = MGDA(normalization="l2")
    l2.setup(tasks(2), Toy())
    torch.testing.assert_close(l2.combine(torch.tensor([[2.0, 0.0], [-1.0, 1.0]])), torch.tensor([0.5, 0.5]))
    loss = MGDA(normalization="loss")  # g / L: (1, 0) and (-1, 1) again, so 0.6 and 0.4 of the raw (2, 0), (-2, 2)
    loss.setup(tasks(2), Toy())
    torch.testing.assert_close(loss.combine(torch.tensor([[2.0, 0.0], [-2.0, 2.0]]), torch.tensor([2.0, 2.0])),
                               torch.tensor([0.4, 0.8]))


@pytest.mark.parametrize("num_tasks, dim", [(3, 5), (4, 3), (6, 2), (5, 40)])
def test_mgda_weights_satisfy_the_kkt_conditions(num_tasks, dim):
    from mtl_lightning.weighting.mgda import min_norm_weights

    generator = torch.Generator().manual_seed(num_tasks * dim)
    for trial in range(20):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
        if trial % 2:  # a common component: the min-norm point is away from 0, often on a face
            g += 3 * torch.randn(1, dim, generator=generator, dtype=torch.float64)
        if trial % 5 == 0:
            g[1] = 2 * g[0]  # parallel gradients: a degenerate Gram matrix
        gram = g @ g.T
        assert_kkt(gram, min_norm_weights(gram))


def test_mgda_sets_the_combined_shared_gradient_and_own_task_gradients():
    from mtl_lightning.weighting.mgda import MGDA, min_norm_weights

    torch.manual_seed(0)
    model = Toy(num_tasks=3)
    strategy = MGDA()
    strategy.setup(tasks(3), model)
    x = torch.randn(64, 8)
    out = model(x)
    losses = [((out[0] - 1) ** 2).mean(), ((out[1] + 1) ** 2).mean(), ((out[2] - x[:, 0]) ** 2).mean()]
    shared = model.shared_parameters()
    per_task = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)])
                            for l in losses])
    heads = [torch.autograd.grad(losses[i], list(model.heads[i].parameters()), retain_graph=True) for i in range(3)]
    total = strategy(losses)
    assert total.item() == pytest.approx(sum(l.item() for l in losses))
    total.backward()
    alpha = min_norm_weights(per_task @ per_task.T)
    assert_kkt(per_task @ per_task.T, strategy.last_weights.double(), tol=1e-6)
    torch.testing.assert_close(flat_grad(shared), alpha.float() @ per_task)
    for i in range(3):
        for p, g in zip(model.heads[i].parameters(), heads[i]):
            torch.testing.assert_close(p.grad, g)


def test_mgda_upper_bound_weighs_the_representation_gradients():
    """MGDA-UB on Toy's shared layer output Z: the shared layer gets J_Z^T sum_i alpha_i grad_Z L_i with alpha the
    min-norm weights of the grad_Z L_i; every head gets its own loss's gradient."""
    from mtl_lightning.weighting.mgda import MGDA, min_norm_weights

    torch.manual_seed(0)
    model = Toy(num_tasks=3)
    strategy = MGDA(upper_bound=True, representation="shared")
    strategy.setup(tasks(3), model)
    x = torch.randn(32, 8)

    def losses_and_z():
        z = model.shared(x)
        h = torch.relu(z)
        outs = [head(h).squeeze(-1) for head in model.heads]
        return [((outs[0] - 1) ** 2).mean(), ((outs[1] + 1) ** 2).mean(), ((outs[2] - x[:, 0]) ** 2).mean()], z

    losses, z = losses_and_z()
    rows = [torch.autograd.grad(l, z, retain_graph=True)[0] for l in losses]
    flat = torch.stack([r.reshape(-1) for r in rows])
    alpha = min_norm_weights(flat @ flat.T).float()
    combined = sum(a * r for a, r in zip(alpha, rows))
    expected_shared = torch.autograd.grad(z, model.shared_parameters(), grad_outputs=combined, retain_graph=True)
    heads = [torch.autograd.grad(losses[i], list(model.heads[i].parameters()), retain_graph=True) for i in range(3)]
    model.zero_grad()
    out = model(x)  # the forward hook captures Z
    strategy([((out[0] - 1) ** 2).mean(), ((out[1] + 1) ** 2).mean(), ((out[2] - x[:, 0]) ** 2).mean()]).backward()
    torch.testing.assert_close(strategy.last_weights, alpha)
    for p, g in zip(model.shared_parameters(), expected_shared):
        torch.testing.assert_close(p.grad, g)
    for i in range(3):
        for p, g in zip(model.heads[i].parameters(), heads[i]):
            torch.testing.assert_close(p.grad, g)
    with pytest.raises(ValueError, match="needs representation"):
        MGDA(upper_bound=True)
    with pytest.raises(ValueError, match="not a submodule"):
        MGDA(upper_bound=True, representation="nope").setup(tasks(3), model)


# ----------------------------------------------------------------------- CAGrad
def test_cagrad_update_of_two_conflicting_gradients_by_hand():
    """g1 = (1, 0), g2 = (-1, 1), c = 0.5: g0 = (0, 0.5), ||g0|| = 0.5. With w = (x, 1 - x),
    F(x) = 0.5 (1 - x) + 0.25 sqrt(5x^2 - 6x + 2) has F'(x) = 0 at x = 1 (the other root, 0.2, is spurious):
    g_w = g1, lambda = c ||g0|| / ||g_w|| = 0.25, d = g0 + 0.25 g1 = (0.25, 0.5), and d.g1 = d.g2 = 0.25."""
    from mtl_lightning.weighting.cagrad import CAGrad

    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    for rescale, divisor in ((0, 1.0), (1, 1.25), (2, 1.5)):
        strategy = CAGrad(c=0.5, rescale=rescale)
        strategy.setup(tasks(2), Toy())
        torch.testing.assert_close(strategy.combine(g), torch.tensor([0.25, 0.5]) / divisor)
        torch.testing.assert_close(strategy.last_weights, torch.tensor([0.75, 0.5]) / divisor)  # 1/2 + 0.25 w
    plain = CAGrad(c=0.0, rescale=0)  # c = 0: gradient descent on the average loss
    plain.setup(tasks(2), Toy())
    torch.testing.assert_close(plain.combine(g), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)


@pytest.mark.parametrize("num_tasks, dim", [(3, 5), (4, 3), (6, 2), (5, 40)])
def test_cagrad_weights_satisfy_the_kkt_conditions(num_tasks, dim):
    """``grad F(w)_i = lambda`` where ``w_i > 0`` and ``>= lambda`` everywhere, for
    ``F(w) = w^T M b + c ||g0|| sqrt(w^T M w + 1e-8)``, on random (and degenerate) gradients."""
    from mtl_lightning.weighting.cagrad import cagrad_weights

    generator = torch.Generator().manual_seed(num_tasks * dim)
    for trial in range(12):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
        if trial % 2:
            g += 3 * torch.randn(1, dim, generator=generator, dtype=torch.float64)
        if trial % 5 == 0:
            g[1] = 2 * g[0]
        gram = g @ g.T
        for c in (0.1, 0.4, 0.9):
            w = cagrad_weights(gram, c)
            b = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
            coefficient = c * math.sqrt(float(b @ gram @ b) + 1e-8) + 1e-8
            gradient = gram @ b + coefficient * (gram @ w) / math.sqrt(float(w @ gram @ w) + 1e-8)
            level, scale = float(gradient @ w), float(gram.diagonal().max())
            assert w.min() >= 0 and abs(float(w.sum()) - 1) < 1e-12
            assert (gradient >= level - 1e-7 * scale).all()
            assert ((gradient - level).abs()[w > 1e-9] <= 1e-7 * scale).all(), (c, w, gradient)


# ------------------------------------------------------------------------- IMTL
def test_imtl_g_weights_of_two_conflicting_gradients_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): D = g1 - g2 = (2, -1), U = u1 - u2 = (1 + 1/sqrt2, -1/sqrt2);
    alpha_2 = g1.U / D.U = (1 + 1/sqrt2) / (2 + 3/sqrt2) = sqrt2 - 1, alpha_1 = 2 - sqrt2;
    g = (3 - 2 sqrt2, sqrt2 - 1), whose projections on u1 and u2 are both 3 - 2 sqrt2."""
    from mtl_lightning.weighting.imtl import IMTL

    strategy = IMTL(mode="gradient")
    strategy.setup(tasks(2), Toy())
    r = math.sqrt(2)
    combined = strategy.combine(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    torch.testing.assert_close(combined, torch.tensor([3 - 2 * r, r - 1]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([2 - r, r - 1]))
    torch.testing.assert_close(combined @ torch.tensor([-1.0, 1.0]) / r, torch.tensor(3 - 2 * r))


def test_imtl_g_projections_on_every_unit_gradient_are_equal():
    from mtl_lightning.weighting.imtl import imtl_g_weights

    generator = torch.Generator().manual_seed(0)
    for num_tasks, dim in ((3, 6), (4, 10), (5, 5)):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
        alpha = imtl_g_weights(g @ g.T)
        combined = alpha @ g
        projections = (g / g.norm(dim=1, keepdim=True)) @ combined
        torch.testing.assert_close(projections, projections[0].expand(num_tasks), rtol=1e-10, atol=1e-12)
        assert abs(float(alpha.sum()) - 1) < 1e-12


def test_imtl_l_value_and_scale_gradient_by_hand():
    from mtl_lightning.weighting.imtl import IMTL

    strategy = IMTL(mode="loss")
    strategy.setup(tasks(2), Toy())
    with torch.no_grad():
        strategy.log_scales.copy_(torch.tensor([math.log(2.0), 0.0]))
    losses = torch.tensor([0.5, 2.0], requires_grad=True)
    total = strategy(losses)
    assert total.item() == pytest.approx(2 * 0.5 - math.log(2.0) + 2.0)  # sum_t e^s L - s
    total.backward()
    torch.testing.assert_close(strategy.log_scales.grad, torch.tensor([0.0, 1.0]))  # e^s L - 1
    torch.testing.assert_close(losses.grad, torch.tensor([2.0, 1.0]))  # e^s


def test_imtl_h_combines_gradients_of_the_scaled_losses():
    from mtl_lightning.weighting.imtl import IMTL, imtl_g_weights

    torch.manual_seed(0)
    model = Toy(num_tasks=3)
    strategy = IMTL()
    strategy.setup(tasks(3), model)
    with torch.no_grad():
        strategy.log_scales.copy_(torch.tensor([0.5, -0.3, 0.1]))
    scales = torch.exp(strategy.log_scales.detach())
    x = torch.randn(64, 8)
    out = model(x)
    losses = [((out[0] - 1) ** 2).mean(), ((out[1] + 1) ** 2).mean(), ((out[2] - x[:, 0]) ** 2).mean()]
    shared = model.shared_parameters()
    per_task = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(scales[i] * l, shared,
                                                                                  retain_graph=True)])
                            for i, l in enumerate(losses)])
    heads = [torch.autograd.grad(scales[i] * losses[i], list(model.heads[i].parameters()), retain_graph=True)
             for i in range(3)]
    total = strategy(losses)
    value = sum(float(s) * l.item() for s, l in zip(scales, losses)) - strategy.log_scales.sum().item()
    assert total.item() == pytest.approx(value, rel=1e-6)
    total.backward()
    alpha = imtl_g_weights(per_task @ per_task.T)
    torch.testing.assert_close(flat_grad(shared), alpha.float() @ per_task)
    torch.testing.assert_close(strategy.last_weights, (alpha * scales.double()).float())
    for i in range(3):
        for p, g in zip(model.heads[i].parameters(), heads[i]):
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(strategy.log_scales.grad, scales * torch.stack([l.detach() for l in losses]) - 1)


# --------------------------------------------------------------------- GradDrop
def test_graddrop_keeps_the_sign_drawn_per_coordinate():
    """g1 = (1, 0, 2, -1), g2 = (-1, 1, -1, -1): sum (0, 1, 1, -2), sum of |.| (2, 1, 3, 2), so the purity
    P = (1/2, 1, 2/3, 0). The seed-0 float64 draws are U = (0.9701, 0.7078, 0.4594, 0.9207): coordinate 0
    keeps the negative gradients (P < U), 1 and 2 the positive ones, 3 the negative ones."""
    from mtl_lightning.weighting.graddrop import GradDrop, sign_dropout_masks

    g = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, 1.0, -1.0, -1.0]])
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(uniform, torch.tensor([0.9701, 0.7078, 0.4594, 0.9207], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    masks = sign_dropout_masks(g, uniform.float())
    assert masks.tolist() == [[False, False, True, True], [True, True, False, True]]
    strategy = GradDrop(seed=0)
    strategy.setup(tasks(2), Toy())
    torch.testing.assert_close(strategy.combine(g), torch.tensor([-1.0, 1.0, 2.0, -2.0]))
    leaky = GradDrop(leak=0.5, seed=0)  # half of every dropped gradient passes
    leaky.setup(tasks(2), Toy())
    torch.testing.assert_close(leaky.combine(g), torch.tensor([-0.5, 1.0, 1.5, -2.0]))
    restored = GradDrop(seed=0)  # the generator continues where it was
    restored.setup(tasks(2), Toy())
    restored.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(restored.combine(g), strategy.combine(g), rtol=0, atol=0)


def test_graddrop_on_the_representation_masks_each_unit_for_the_whole_batch():
    from mtl_lightning.weighting.graddrop import GradDrop, sign_dropout_masks

    torch.manual_seed(0)
    model = Toy(num_tasks=2)
    strategy = GradDrop(representation="shared", seed=3)
    strategy.setup(tasks(2), model)
    x = torch.randn(16, 8)
    z = model.shared(x)
    h = torch.relu(z)
    losses = [((model.heads[0](h).squeeze(-1) - 1) ** 2).mean(), ((model.heads[1](h).squeeze(-1) + 1) ** 2).mean()]
    rows = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0] for l in losses])  # (2, 16, 4)
    signed = (rows * torch.sign(z.detach())).sum(dim=1)  # (2, 4): the batch sums with the sign correction
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    new = (sign_dropout_masks(signed, uniform)[:, None].float() * rows).sum(dim=0)  # (16, 4)
    assert not torch.allclose(new, rows.sum(dim=0))  # some unit dropped a sign
    expected = torch.autograd.grad(z, model.shared_parameters(), grad_outputs=new, retain_graph=True)
    heads = [torch.autograd.grad(losses[i], list(model.heads[i].parameters()), retain_graph=True) for i in range(2)]
    model.zero_grad()
    out = model(x)
    strategy([((out[0] - 1) ** 2).mean(), ((out[1] + 1) ** 2).mean()]).backward()
    for p, g in zip(model.shared_parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    for i in range(2):
        for p, g in zip(model.heads[i].parameters(), heads[i]):
            torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------- FAMO
def test_famo_weights_and_logit_update_by_hand():
    """xi = (0, log 3): z = (1/4, 3/4); L = (0.5, 2): c = 0.25/0.5 + 0.75/2 = 0.875 and
    w = z / (c L) = (4/7, 3/7), the gradient of sum_i z_i log L_i / c. Next step L = (0.25, 1.8):
    delta = (log 2, log(2/1.8)), J^T delta = z (delta - z.delta) = (0.110210, -0.110210); Adam's first
    step (lr 0.025, weight decay 0.01 adds 0.01 xi to the gradient) moves each logit by -lr sign(g)."""
    from mtl_lightning.weighting.famo import FAMO

    strategy = FAMO()
    strategy.setup(tasks(2), Toy())
    with torch.no_grad():
        strategy.logits.copy_(torch.tensor([0.0, math.log(3.0)]))
    first = torch.tensor([0.5, 2.0], requires_grad=True)
    total = strategy(first)
    total.backward()
    torch.testing.assert_close(first.grad, torch.tensor([4 / 7, 3 / 7]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([4 / 7, 3 / 7]))
    assert total.item() == pytest.approx(1 / 0.875, rel=1e-6)
    z = torch.tensor([0.25, 0.75])
    delta = torch.tensor([math.log(2.0), math.log(2.0 / 1.8)])
    torch.testing.assert_close(z * (delta - z @ delta), torch.tensor([0.110210, -0.110210]), atol=1e-6, rtol=0)
    strategy.before_optimizer_step()  # the first step only records L(theta_1)
    torch.testing.assert_close(strategy.logits.detach(), torch.tensor([0.0, math.log(3.0)]))
    strategy(torch.tensor([0.25, 1.8], requires_grad=True)).backward()
    strategy.before_optimizer_step()
    torch.testing.assert_close(strategy.logits.detach(), torch.tensor([-0.025, math.log(3.0) + 0.025]))
    # a task without a valid row (exact-zero loss) gets weight 0 and is left out of c: c = z_2 / L_2, w_2 = 1
    strategy(torch.tensor([0.0, 2.0], requires_grad=True))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------- GradVac
def test_gradvac_raises_the_similarity_to_its_moving_target():
    """g1 = (1, 0), g2 = (-1, 1), beta = 0.5. Step 1 (targets 0): PCGrad's projection, (0.5, 0.5) + (0, 1), and
    the targets become 0.5 cos(g1, g2) = -0.353553. Step 2: rho = -0.707107 < -0.353553, so
    g1 += g2 |g1| (phi sqrt(1 - rho^2) - rho sqrt(1 - phi^2)) / (|g2| sqrt(1 - phi^2)) = 0.311018 g2 and
    g2 += g1 * 0.622036: (0.688982, 0.311018) + (-0.377964, 1); each now has cosine phi with the other."""
    from mtl_lightning.weighting.gradvac import GradVac

    strategy = GradVac(beta=0.5)
    strategy.setup(tasks(2), Toy())
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(strategy.combine(g), torch.tensor([0.5, 1.5]))
    phi = -0.5 / math.sqrt(2)
    torch.testing.assert_close(strategy.targets[:, :, 0], torch.tensor([[0.0, phi], [phi, 0.0]]))
    combined = strategy.combine(g)
    torch.testing.assert_close(combined, torch.tensor([0.688982 - 0.377964, 0.311018 + 1.0]), atol=1e-6, rtol=0)
    g1 = torch.tensor([0.688982, 0.311018])
    assert float(g1 @ g[1] / (g1.norm() * g[1].norm())) == pytest.approx(phi, abs=1e-6)
    torch.testing.assert_close(strategy.targets[0, 1, 0], torch.tensor(0.5 * phi - 0.5 / math.sqrt(2)))
    agreeing = GradVac()  # similarities above the target: nothing changes
    agreeing.setup(tasks(2), Toy())
    torch.testing.assert_close(agreeing.combine(torch.tensor([[1.0, 0.0], [1.0, 1.0]])), torch.tensor([2.0, 1.0]))


def test_gradvac_per_parameter_keeps_one_target_per_tensor():
    from mtl_lightning.weighting.gradvac import GradVac

    model = Toy()  # shared: weight (4 x 8) and bias (4)
    strategy = GradVac(granularity="parameter")
    strategy.setup(tasks(2), model)
    assert strategy.targets.shape == (2, 2, 2)
    weight = torch.zeros(2, 32)
    weight[0, 0], weight[1, 0] = 1.0, 1.0  # the weight gradients agree ...
    bias = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]])  # ... the bias gradients conflict
    combined = strategy.combine(torch.cat([weight, bias], dim=1))
    torch.testing.assert_close(combined[:32], weight.sum(0))
    torch.testing.assert_close(combined[32:], torch.tensor([0.5, 1.5, 0.0, 0.0]))
    torch.testing.assert_close(strategy.targets[0, 1], torch.tensor([0.5, -0.5 / math.sqrt(2)]))


# --------------------------------------------------------------------- Nash-MTL
def test_nash_mtl_bargaining_solution_of_two_gradients_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): M = [[1, -1], [-1, 2]]. alpha1 (alpha1 - alpha2) = 1 and
    alpha2 (2 alpha2 - alpha1) = 1 give alpha1 = sqrt2 alpha2, alpha2 = 1 / sqrt(2 - sqrt2) = 1.306563:
    d = (alpha1 - alpha2, alpha2) = (0.541196, 1.306563), with d.g_i = 1 / alpha_i and |d|^2 = T = 2."""
    from mtl_lightning.weighting.nash_mtl import NashMTL

    strategy = NashMTL()
    strategy.setup(tasks(2), Toy())
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    alpha2 = 1 / math.sqrt(2 - math.sqrt(2))
    d = strategy.combine(g)
    torch.testing.assert_close(strategy.last_weights, torch.tensor([math.sqrt(2) * alpha2, alpha2]))
    torch.testing.assert_close(d, torch.tensor([0.541196, 1.306563]), atol=1e-6, rtol=0)
    torch.testing.assert_close(g @ d, 1 / strategy.last_weights)
    scaled = NashMTL()  # a task's gradient ten times larger: its alpha ten times smaller, the same update
    scaled.setup(tasks(2), Toy())
    torch.testing.assert_close(scaled.combine(g * torch.tensor([[10.0], [1.0]])), d)


def test_nash_mtl_solves_the_bargaining_condition_and_reuses_weights():
    from mtl_lightning.weighting.nash_mtl import NashMTL, nash_weights

    generator = torch.Generator().manual_seed(0)
    for num_tasks, dim in ((3, 5), (4, 4), (5, 30)):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
        gram = g @ g.T
        alpha = nash_weights(gram)
        assert (alpha > 0).all()
        torch.testing.assert_close(gram @ alpha, 1 / alpha, rtol=1e-9, atol=1e-9)
    strategy = NashMTL(update_weights_every=2)
    strategy.setup(tasks(2), Toy())
    first = strategy.combine(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    weights = strategy.last_weights.clone()
    strategy.combine(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # step 2: alpha reused
    torch.testing.assert_close(strategy.last_weights, weights)
    strategy.combine(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # step 3: solved again, alpha_i = 1 / |g_i|
    torch.testing.assert_close(strategy.last_weights, torch.tensor([1 / 3, 1.0]))
    assert first.norm().item() == pytest.approx(math.sqrt(2), rel=1e-6)


# ------------------------------------------------------------------ Aligned-MTL
def test_aligned_mtl_update_of_two_gradients_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): G G^T = [[1, -1], [-1, 2]] has eigenvalues (3 +- sqrt5) / 2 = 2.618034, 0.381966;
    B = sqrt(0.381966) (v1 v1^T / sqrt(2.618034) + v2 v2^T / sqrt(0.381966)) = [[0.829180, 0.276393],
    [0.276393, 0.552786]], alpha = B 1 = (1.105573, 0.829180), update (0.276393, 0.829180). The aligned rows
    B G = (0.552786, 0.276393), (-0.276393, 0.552786) are orthogonal, both of norm sqrt(0.381966)."""
    from mtl_lightning.weighting.aligned_mtl import AlignedMTL, alignment_matrix

    strategy = AlignedMTL()
    strategy.setup(tasks(2), Toy())
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(strategy.combine(g), torch.tensor([0.276393, 0.829180]), atol=1e-6, rtol=0)
    torch.testing.assert_close(strategy.last_weights, torch.tensor([1.105573, 0.829180]), atol=1e-6, rtol=0)
    aligned = alignment_matrix(g @ g.T).float() @ g
    torch.testing.assert_close(aligned, torch.tensor([[0.552786, 0.276393], [-0.276393, 0.552786]]), atol=1e-6, rtol=0)
    # Task.weight weighs the aligned gradients: w = (2, 1) gives B w applied to the raw gradients
    weighted = AlignedMTL()
    weighted.setup([Task("t0", kind="regression", weight=2.0), Task("t1", kind="regression")], Toy())
    expected = (torch.tensor([[0.829180, 0.276393], [0.276393, 0.552786]]) @ torch.tensor([2.0, 1.0])) @ g
    torch.testing.assert_close(weighted.combine(g * torch.tensor([[2.0], [1.0]])), expected, atol=1e-5, rtol=0)


def test_aligned_mtl_equalises_the_singular_values():
    from mtl_lightning.weighting.aligned_mtl import alignment_matrix

    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([[1.0], [5.0], [0.2], [3.0]], dtype=torch.float64)  # badly conditioned on purpose
    for num_tasks, dim in ((3, 8), (4, 20)):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64) * scales[:num_tasks]
        aligned = alignment_matrix(g @ g.T) @ g
        smallest = torch.linalg.eigvalsh(g @ g.T).min()
        torch.testing.assert_close(aligned @ aligned.T, smallest * torch.eye(num_tasks, dtype=torch.float64))
    rank_one = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # parallel gradients: rank 1
    aligned = alignment_matrix(rank_one @ rank_one.T) @ rank_one
    torch.testing.assert_close(aligned, rank_one, atol=1e-9, rtol=0)  # B projects onto the one direction, scale kept


# -------------------------------------------------------------------------- GLS
def test_gls_is_the_geometric_mean_with_its_gradient():
    """L = (0.5, 2, 4): (0.5 * 2 * 4)^(1/3) = 4^(1/3) = 1.587401, dL/dL_i = L / (3 L_i) = (1.058267, 0.264567,
    0.132283). Task weights (2, 1, 1) make the exponents (1/2, 1/4, 1/4): 0.5^0.5 2^0.25 4^0.25 = 1.189207."""
    from mtl_lightning.weighting.gls import GLS

    strategy = GLS()
    strategy.setup(tasks(3), nn.Module())
    losses = torch.tensor([0.5, 2.0, 4.0], requires_grad=True)
    total = strategy(losses)
    assert total.item() == pytest.approx(4 ** (1 / 3), rel=1e-6)
    total.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([1.058267, 0.264567, 0.132283]), atol=1e-6, rtol=0)
    torch.testing.assert_close(strategy.last_weights, losses.grad)
    weighted = GLS()
    weighted.setup([Task("a", weight=2.0), Task("b"), Task("c")], nn.Module())
    losses = torch.tensor([0.5, 2.0, 4.0], requires_grad=True)
    total = weighted(losses)
    assert total.item() == pytest.approx(0.5 ** 0.5 * 2 ** 0.25 * 4 ** 0.25, rel=1e-6)
    total.backward()
    torch.testing.assert_close(losses.grad, total.detach() * torch.tensor([0.5 / 0.5, 0.25 / 2, 0.25 / 4]))
    # an exact-zero loss (no valid row) is left out: sqrt(2 * 4), finite gradients, and 0 for the empty task
    losses = torch.tensor([0.0, 2.0, 4.0], requires_grad=True)
    total = strategy(losses)
    assert total.item() == pytest.approx(8 ** 0.5, rel=1e-6)
    total.backward()
    assert torch.isfinite(losses.grad).all() and losses.grad[0] == 0


# ------------------------------------------------------------------------- STCH
def test_stch_warmup_nadir_and_smooth_tchebycheff_by_hand():
    """warmup_epochs=1. Epoch 0: sum log L; L = (0.5, 3) gives log 0.5 + log 3 = 0.405465, weights 1/L.
    Epoch 1: the same, while the nadir is measured: mean of (1, 2) and (1, 2) -> n = (1, 2).
    Epoch 2, mu = 1: l = log(L / n) = (log 0.5, log 1.5); 2 log(e^l1 + e^l2) = 2 log 2 and the weights
    2 softmax(l) / L = 2 (0.25, 0.75) / (0.5, 3) = (1, 0.5). mu = 0.5: log(0.25 + 2.25) = log 2.5,
    softmax(l / mu) = (0.1, 0.9), weights 2 (0.1 / 0.5, 0.9 / 3) = (0.4, 0.6)."""
    from mtl_lightning.weighting.stch import STCH

    for mu, value, weights in ((1.0, 2 * math.log(2.0), (1.0, 0.5)), (0.5, math.log(2.5), (0.4, 0.6))):
        strategy = STCH(mu=mu, warmup_epochs=1)
        strategy.setup(tasks(2), nn.Module())
        strategy.begin_epoch(0)
        first = torch.tensor([0.5, 3.0], requires_grad=True)
        assert strategy(first).item() == pytest.approx(math.log(0.5) + math.log(3.0), rel=1e-6)
        torch.testing.assert_close(strategy.last_weights, torch.tensor([2.0, 1 / 3]))
        strategy.begin_epoch(1)
        for _ in range(2):
            strategy(torch.tensor([1.0, 2.0], requires_grad=True))
        strategy.begin_epoch(2)
        torch.testing.assert_close(strategy.nadir, torch.tensor([1.0, 2.0]))
        losses = torch.tensor([0.5, 3.0], requires_grad=True)
        total = strategy(losses)
        assert total.item() == pytest.approx(value, rel=1e-6)
        total.backward()
        torch.testing.assert_close(losses.grad, torch.tensor(weights))
        torch.testing.assert_close(strategy.last_weights, torch.tensor(weights))
        state = strategy.state_dict()
        assert {"epoch", "nadir_sum", "nadir_count", "nadir"} <= set(state)


# --------------------------------------------------------------------- FairGrad
def test_fairgrad_allocation_by_hand_and_its_condition():
    """g1 = (1, 0), g2 = (0, 2): M = diag(1, 4), so M w = w^(-1/alpha) decouples: w_i = M_ii^(-alpha/(alpha+1)).
    alpha = 1: w = (1, 1/2), d = (1, 1), both tasks gain 1 (Nash-MTL's solution too); alpha = 2:
    w = (1, 4^(-2/3)) = (1, 0.396850), d = (1, 0.793701): the gains (1, 1.587401) = w^(-1/2)."""
    from mtl_lightning.weighting.fairgrad import FairGrad, fair_weights

    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    for alpha, weights in ((1.0, (1.0, 0.5)), (2.0, (1.0, 4 ** (-2 / 3)))):
        strategy = FairGrad(alpha=alpha)
        strategy.setup(tasks(2), Toy())
        d = strategy.combine(g)
        torch.testing.assert_close(strategy.last_weights, torch.tensor(weights))
        torch.testing.assert_close(g @ d, strategy.last_weights ** (-1 / alpha))
    generator = torch.Generator().manual_seed(1)
    for alpha in (0.5, 1.0, 3.0):
        h = torch.randn(4, 7, generator=generator, dtype=torch.float64)
        w = fair_weights(h @ h.T, alpha)
        assert (w > 0).all()
        torch.testing.assert_close((h @ h.T) @ w, w ** (-1 / alpha), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------- UPGrad
def test_upgrad_projections_of_two_conflicting_gradients_by_hand():
    """g1 = (1, 0), g2 = (-1, 1). g1/2 = (0.5, 0) has <g2, .> = -0.5: projected onto <g2, x> = 0 it becomes
    (0.25, 0.25) = 0.5 g1 + 0.25 g2; g2/2 = (-0.5, 0.5) has <g1, .> = -0.5: (0, 0.5) = 0.5 g1 + 0.5 g2.
    w = (1, 0.75), update (0.25, 0.75), which conflicts with neither task (gains 0.25 and 0.5)."""
    from mtl_lightning.weighting.upgrad import UPGrad

    strategy = UPGrad(reg_eps=1e-12)
    strategy.setup(tasks(2), Toy())
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(strategy.combine(g), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([1.0, 0.75]))
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # no conflict: the average
    torch.testing.assert_close(strategy.combine(agreeing), agreeing.mean(0))


def test_upgrad_update_conflicts_with_no_task_and_nnls_meets_its_kkt_conditions():
    from mtl_lightning.weighting.upgrad import nonnegative_least_squares, upgrad_weights

    generator = torch.Generator().manual_seed(0)
    for num_tasks, dim in ((3, 5), (5, 4), (6, 30)):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
        weights = upgrad_weights(g @ g.T, reg_eps=1e-12)
        assert (g @ (weights @ g) >= -1e-9).all()  # every task gains (or keeps) from the update
        assert (weights >= 1 / num_tasks - 1e-12).all()
        A, b = torch.randn(7, num_tasks, generator=generator, dtype=torch.float64), torch.randn(7, generator=generator,
                                                                                                dtype=torch.float64)
        x = nonnegative_least_squares(A, b)
        gradient = A.T @ (A @ x - b)  # KKT: x >= 0, gradient >= 0, and gradient = 0 where x > 0
        assert (x >= 0).all() and (gradient >= -1e-9).all() and (gradient[x > 0].abs() <= 1e-9).all()


# ------------------------------------------------------------------ MetaBalance
def test_metabalance_scales_auxiliary_gradients_towards_the_target_norm():
    """One shared tensor (a 2-vector), target t0, r = 0.7, beta = 0.9. Step 1: g_t = (3, 4), g_a = (0, 1):
    averages 0.1 * 5 = 0.5 and 0.1; g_a <- 0.7 * 5 g_a + 0.3 g_a = (0, 3.8); sum (3, 7.8). Step 2 with
    g_a = (0, 2): averages 0.95 and 0.29, ratio 3.275862: g_a <- (0.7 * 3.275862 + 0.3) (0, 2) = (0, 5.186207)."""
    from mtl_lightning.weighting.metabalance import MetaBalance

    model = nn.Module()
    model.shared = nn.Parameter(torch.zeros(2))
    model.shared_parameters = lambda: [model.shared]
    strategy = MetaBalance()
    strategy.setup(tasks(2), model)
    torch.testing.assert_close(strategy.combine(torch.tensor([[3.0, 4.0], [0.0, 1.0]])), torch.tensor([3.0, 7.8]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([1.0, 3.8]))
    combined = strategy.combine(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(combined, torch.tensor([3.0, 4.0 + 5.186207]), atol=1e-5, rtol=0)
    torch.testing.assert_close(strategy.norm_averages[:, 0], torch.tensor([0.95, 0.29]))
    # the target may be any task; per shared tensor (Toy's weight and bias) the averages are kept apart
    toy = Toy()
    by_name = MetaBalance(target="t1", relax_factor=1.0)
    by_name.setup(tasks(2), toy)
    g = torch.zeros(2, 36)
    g[0, 0], g[1, 0], g[0, 32], g[1, 32] = 4.0, 1.0, 1.0, 2.0  # weight block: norms 4, 1; bias block: 1, 2
    combined = by_name.combine(g)
    assert combined[0].item() == pytest.approx(4.0 * 0.25 + 1.0) and combined[32].item() == pytest.approx(2.0 + 2.0)
    with pytest.raises(ValueError, match="target 'nope' is not a task"):
        MetaBalance(target="nope").setup(tasks(2), toy)


# ------------------------------------------------------------------------- MoCo
def test_moco_tracks_gradients_and_takes_one_projected_step():
    """g1 = (1, 0), g2 = (-1, 1). Step 1: beta_1 = 0.5, y = g / 2; Y Y^T lambda0 = [[0.25, -0.25], [-0.25, 0.5]]
    (0.5, 0.5) = (0, 0.125); lambda0 - 0.1 (0, 0.125) = (0.5, 0.4875), projected (+0.00625 each) = (0.50625,
    0.49375); update Y^T lambda = (0.00625, 0.246875). Step 2: beta_2 = 0.5 / sqrt2: y = g/2 + 0.353553 g/2."""
    from mtl_lightning.weighting.moco import MoCo, project_to_simplex

    strategy = MoCo()
    strategy.setup(tasks(2), Toy())
    strategy.tracked = torch.zeros(2, 2)  # Toy's shared layer has 36 parameters; this test uses 2-vectors
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(strategy.combine(g), torch.tensor([0.00625, 0.246875]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.50625, 0.49375]))
    strategy.combine(g)
    torch.testing.assert_close(strategy.tracked, g * (0.5 + 0.5 * 0.5 / math.sqrt(2)))
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.5, 2.0, -1.0])), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.4, 0.3, 0.1])),
                               torch.tensor([0.4667, 0.3667, 0.1667]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------- ExcessMTL
def test_excess_mtl_risks_and_exponentiated_weights_by_hand():
    """Two tasks on a 2-vector, eta = 0.5. Step 1: g1 = (2, 0), g2 = (0, 1): S = g^2, e = g^2 / sqrt(g^2 + 1e-7)
    summed: e(0) = (2, 1) (to 1e-7), weights stay 1. Step 2: g1 = (2, 0), g2 = (0, 2): S1 = (8, 0), S2 = (0, 5),
    e = (4 / sqrt8, 4 / sqrt5) = (1.414214, 1.788854), ratios (0.707107, 1.788854); lambda = exp(0.5 ratio)
    = (1.424119, 2.445934), normalised to sum 2: (0.735969, 1.264031)."""
    from mtl_lightning.weighting.excess_mtl import ExcessMTL

    model = nn.Module()
    model.shared = nn.Parameter(torch.zeros(2))
    model.shared_parameters = lambda: [model.shared]
    strategy = ExcessMTL(step_size=0.5)
    strategy.setup(tasks(2), model)
    strategy.update(strategy.excess_risks(torch.tensor([[2.0, 0.0], [0.0, 1.0]])))
    torch.testing.assert_close(strategy.initial_risks, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(strategy.weights, torch.ones(2))
    risks = strategy.excess_risks(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(risks, torch.tensor([4 / math.sqrt(8), 4 / math.sqrt(5)]))
    strategy.update(risks)
    torch.testing.assert_close(strategy.weights, torch.tensor([0.735969, 1.264031]), atol=1e-6, rtol=0)
    # in the module: the loss is sum_i lambda_i L_i, so every parameter sees the weights
    x = model.shared
    losses = [((x - torch.tensor([1.0, 0.0])) ** 2).sum(), ((x - torch.tensor([0.0, 1.0])) ** 2).sum()]
    total = strategy(losses)
    torch.testing.assert_close(total, (strategy.weights * torch.stack([l.detach() for l in losses])).sum())


def test_excess_mtl_warmup_baseline_is_the_mean_of_the_first_estimates_by_hand():
    """warmup_steps = 2, eta = 0.5, the gradients of the test above and a third step. Steps 1 and 2 only collect:
    e = (2, 1) then (4/sqrt8, 4/sqrt5) = (1.414214, 1.788854), weights stay 1; e(0) = their mean
    (1.707107, 1.394427). Step 3: g1 = (2, 0), g2 = (0, 2): S1 = (12, 0), S2 = (0, 9), e = (4/sqrt12, 4/3)
    = (1.154701, 1.333333), ratios (0.676408, 0.956187), exp(0.5 ratio) = (1.402427, 1.612996), normalised to
    sum 2: (0.930169, 1.069831). (With the default warmup_steps = 1, e(0) = (2, 1) and step 2 already moves
    the weights, to (0.735969, 1.264031) as above.)"""
    from mtl_lightning.weighting.excess_mtl import ExcessMTL

    model = nn.Module()
    model.shared = nn.Parameter(torch.zeros(2))
    model.shared_parameters = lambda: [model.shared]
    strategy = ExcessMTL(step_size=0.5, warmup_steps=2)
    strategy.setup(tasks(2), model)
    strategy.update(strategy.excess_risks(torch.tensor([[2.0, 0.0], [0.0, 1.0]])))
    strategy.update(strategy.excess_risks(torch.tensor([[2.0, 0.0], [0.0, 2.0]])))
    torch.testing.assert_close(strategy.weights, torch.ones(2))
    torch.testing.assert_close(strategy.initial_risks, torch.tensor([1.707107, 1.394427]), atol=1e-6, rtol=0)
    strategy.update(strategy.excess_risks(torch.tensor([[2.0, 0.0], [0.0, 2.0]])))
    torch.testing.assert_close(strategy.weights, torch.tensor([0.930169, 1.069831]), atol=1e-6, rtol=0)
    # a task without a positive estimate (no valid row) does not count towards its warm-up
    strategy = ExcessMTL(step_size=0.5, warmup_steps=2)
    strategy.setup(tasks(2), model)
    for rows in ([[2.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]):
        strategy.update(strategy.excess_risks(torch.tensor(rows)))
    torch.testing.assert_close(strategy.warmup_counts, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(strategy.initial_risks, torch.tensor([1.707107, 1.394427]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        ExcessMTL(warmup_steps=0)
    # a state dict written before warmup_steps existed (no warm-up sums) loads, its e(0) kept
    old = {k: v for k, v in strategy.state_dict().items() if not k.startswith("warmup_")}
    restored = ExcessMTL(step_size=0.5, warmup_steps=2)
    restored.setup(tasks(2), model)
    restored.load_state_dict(old)
    torch.testing.assert_close(restored.initial_risks, strategy.initial_risks)


# ------------------------------------------------------- double sampling (MoDo, SDMGrad)
class DictToy(Toy):
    """Toy whose forward returns ``{task: (B,)}``, as an architecture does (the sampled strategies hook it)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"t{i}": out for i, out in enumerate(super().forward(x))}


def _sample_split_case(strategy, num_rows: int = 12):
    """A DictToy step with two MSE tasks; returns the model, the losses' inputs and each row's sample."""
    torch.manual_seed(0)
    model = DictToy()
    strategy.setup(tasks(2), model)
    x, y = torch.randn(num_rows, 8), torch.randn(2, num_rows)
    step_seed = int(torch.randint(0, 2 ** 62, (), generator=torch.Generator().manual_seed(0)))  # its first draw
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(step_seed))
    groups = torch.empty(num_rows, dtype=torch.long)
    groups[order] = torch.arange(num_rows) % 3
    return model, x, y, groups


def _group_gradients(model, x, y, groups) -> torch.Tensor:
    """(3, T, P): the gradient of each task's MSE on each group's rows alone (for a mean loss, what the strategy's
    B/|s|-scaled share of the batch gradient equals)."""
    shared = model.shared_parameters()
    rows = torch.zeros(3, 2, 36)
    for s in range(3):
        out = model(x[groups == s])
        for i in range(2):
            loss = ((out[f"t{i}"] - y[i][groups == s]) ** 2).mean()
            rows[s, i] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
    return rows


def test_modo_weight_step_and_update_by_hand():
    """gamma = 0.1, rho = 0.1, lambda0 = (0.5, 0.5), G1 = [[1, 0], [0, 1]], G2 = [[1, 0], [-1, 1]], G3 = [[2, 0], [0, -1]]:
    G2^T lambda = (0, 0.5), G1 (0, 0.5) = (0, 0.5), + rho lambda = (0.05, 0.55); lambda - 0.1 (0.05, 0.55) = (0.495,
    0.445), projected (+0.03 each) = (0.525, 0.475); the update G3^T lambda = (1.05, -0.475)."""
    from mtl_lightning.weighting.modo import MoDo

    strategy = MoDo(gamma=0.1, rho=0.1)
    strategy.setup(tasks(2), DictToy())
    samples = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 1.0]], [[2.0, 0.0], [0.0, -1.0]]])
    torch.testing.assert_close(strategy.combine_samples(samples), torch.tensor([1.05, -0.475]))
    torch.testing.assert_close(strategy.weights, torch.tensor([0.525, 0.475]))
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.525, 0.475]))
    with pytest.raises(ValueError, match="gamma > 0"):
        MoDo(gamma=0.0)


def test_modo_splits_the_batch_into_three_samples_in_the_module_step():
    """In a step: the three samples are the rows of a seeded permutation cut in turn; lambda moves with the first
    two groups' gradients, the shared layer gets the third's G3^T lambda, each head its own full-batch gradient;
    the generator is extra state, so the next split is reproducible."""
    from mtl_lightning.weighting.modo import MoDo

    strategy = MoDo(gamma=0.5, rho=0.1)
    model, x, y, groups = _sample_split_case(strategy)
    samples = _group_gradients(model, x, y, groups)
    lam = torch.full((2,), 0.5)
    lam = project_to_simplex(lam - 0.5 * (samples[0] @ (samples[1].T @ lam) + 0.1 * lam))
    out = model(x)
    losses = [((out[f"t{i}"] - y[i]) ** 2).mean() for i in range(2)]
    heads = [torch.autograd.grad(losses[i], list(model.heads[i].parameters()), retain_graph=True) for i in range(2)]
    state = strategy.state_dict()
    total = strategy(losses)
    assert total.item() == pytest.approx(sum(l.item() for l in losses))
    total.backward()
    torch.testing.assert_close(strategy.weights, lam)
    assert not torch.allclose(lam, torch.full((2,), 0.5))
    torch.testing.assert_close(flat_grad(model.shared_parameters()), lam @ samples[2], atol=1e-6, rtol=1e-5)
    for i in range(2):
        for p, g in zip(model.heads[i].parameters(), heads[i]):
            torch.testing.assert_close(p.grad, g)
    again = MoDo(gamma=0.5, rho=0.1)
    again.setup(tasks(2), DictToy())
    again.load_state_dict(state)  # the generator before the step: the same split
    assert torch.equal(again.groups(12), groups)
    with pytest.raises(ValueError, match="batch of 2 rows is too small"):
        strategy.groups(2)
    again.groups(12)
    strategy.groups(13)  # a shorter or longer batch (a DDP rank's last one) moves the generator alike
    assert torch.equal(again.generator.get_state(), strategy.generator.get_state())


def test_sdmgrad_inner_steps_and_direction_by_hand():
    """g = [[1, 0], [-1, 1]] as both xi and xi': GG = [[1, -1], [-1, 2]], scale = mean(1, sqrt2)^2 = 1.457107;
    lambda = 0.3, lr = 1, momentum 0.5, w0 = (0.5, 0.5). Step 1: grad = GG w / s + 0.3 mean_j(GG)_ij / s = (0, 0.446090);
    w - grad = (0.5, 0.053910) -> projected (0.723045, 0.276955). Step 2: grad = (0.306148, -0.013131), buffer = 0.5
    (0, 0.446090) + grad = (0.306148, 0.209914), w - buffer = (0.416897, 0.067041) -> (0.674928, 0.325072).
    Direction from zeta: coefficients (w + 0.3 / 2) / 1.3."""
    from mtl_lightning.weighting.sdmgrad import SDMGrad, sdmgrad_inner

    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    start = torch.tensor([0.5, 0.5], dtype=torch.float64)
    one = sdmgrad_inner(g @ g.T, start, 0.3, num_steps=1, lr=1.0)
    torch.testing.assert_close(one, torch.tensor([0.723045, 0.276955], dtype=torch.float64), atol=1e-6, rtol=0)
    two = sdmgrad_inner(g @ g.T, start, 0.3, num_steps=2, lr=1.0)
    torch.testing.assert_close(two, torch.tensor([0.674928, 0.325072], dtype=torch.float64), atol=1e-6, rtol=0)
    strategy = SDMGrad(regularization=0.3, num_steps=2, lr=1.0)
    strategy.setup(tasks(2), DictToy())
    zeta = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    coefficients = (two.float() + 0.15) / 1.3
    torch.testing.assert_close(strategy.combine_samples(torch.stack([zeta, g.float(), g.float()])),
                               torch.tensor([2 * coefficients[0], 4 * coefficients[1]]))
    torch.testing.assert_close(strategy.last_weights, coefficients)
    torch.testing.assert_close(strategy.weights, two)  # warm start for the next step
    # lambda -> large: the average gradient; many steps with lambda = 0: MGDA's min-norm point (0.6, 0.4)
    torch.testing.assert_close(sdmgrad_inner(g @ g.T, start, 0.0, num_steps=500, lr=0.1, momentum=0.0),
                               torch.tensor([0.6, 0.4], dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="regularization >= 0"):
        SDMGrad(regularization=-1.0)


def test_sdmgrad_in_the_module_step_uses_xi_for_w_and_zeta_for_the_update():
    from mtl_lightning.weighting.sdmgrad import SDMGrad, sdmgrad_inner

    strategy = SDMGrad()
    model, x, y, groups = _sample_split_case(strategy, num_rows=15)
    samples = _group_gradients(model, x, y, groups)
    w = sdmgrad_inner((samples[1] @ samples[2].T).double(), torch.full((2,), 0.5, dtype=torch.float64), 0.3)
    coefficients = ((w + 0.15) / 1.3).float()
    out = model(x)
    strategy([((out[f"t{i}"] - y[i]) ** 2).mean() for i in range(2)]).backward()
    torch.testing.assert_close(strategy.weights, w)
    torch.testing.assert_close(flat_grad(model.shared_parameters()), coefficients @ samples[0], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------- PE-LTR
def test_pe_ltr_pec_solver_and_exact_solver_by_hand():
    """Orthogonal gradients with M = diag(1, 4, 2), c = (0, 0.5, 0). Relaxed: omega ~ 1/M_ii = (4, 1, 2)/7, so
    omega_hat = omega - c = (8, -5, 4)/14; projected onto {x >= 0, sum x = 0.5}: minus 5/28 -> (11/28, 0, 3/28); PEC:
    (11/28, 1/2, 3/28). Exact: omega_2 = 1/2 at its bound and omega_1 + omega_3 = 1/2 with omega_1 = 2 omega_3:
    (1/3, 1/2, 1/6), a smaller norm (7/6 < 1.1773) that PEC's projection misses."""
    from mtl_lightning.weighting.pe_ltr import exact_weights, pec_weights

    gram = torch.diag(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64))
    c = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(pec_weights(gram, c), torch.tensor([11 / 28, 0.5, 3 / 28], dtype=torch.float64))
    torch.testing.assert_close(exact_weights(gram, c), torch.tensor([1 / 3, 0.5, 1 / 6], dtype=torch.float64))
    # two conflicting gradients (1, 0), (-1, 1): the min-norm point (0.6, 0.4) is feasible for c = (0.1, 0.1) and both
    # solvers return it; for c = (0.1, 0.5) the relaxed omega_hat = (0.5, -0.1) is projected to (0.4, 0): (0.5, 0.5)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    for solve in (pec_weights, exact_weights):
        torch.testing.assert_close(solve(g @ g.T, torch.tensor([0.1, 0.1])), torch.tensor([0.6, 0.4], dtype=torch.float64))
        torch.testing.assert_close(solve(g @ g.T, torch.tensor([0.1, 0.5])), torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("num_tasks, dim", [(3, 5), (4, 3), (5, 40)])
def test_pe_ltr_exact_weights_satisfy_the_kkt_conditions(num_tasks, dim):
    """KKT of min ||G^T omega||^2 on {omega >= c, sum omega = 1}: with v = G G^T omega, v_i = min_j v_j wherever
    omega_i > c_i, and v_i >= min_j v_j everywhere (equivalently, MGDA's conditions on the shifted problem)."""
    from mtl_lightning.weighting.pe_ltr import exact_weights

    generator = torch.Generator().manual_seed(num_tasks * dim)
    for trial in range(10):
        g = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
        if trial % 2:
            g += 3 * torch.randn(1, dim, generator=generator, dtype=torch.float64)
        c = torch.rand(num_tasks, generator=generator, dtype=torch.float64)
        c = c / c.sum() * 0.8 * float(torch.rand((), generator=generator))
        omega = exact_weights(g @ g.T, c)
        v = g @ g.T @ omega
        scale = float((g @ g.T).diagonal().max())
        assert (omega >= c - 1e-12).all() and abs(float(omega.sum()) - 1) < 1e-12
        free = omega > c + 1e-12
        assert free.any() and (v[free] - v.min() <= 1e-9 * scale).all(), (omega, c, v)


def test_pe_ltr_steps_with_the_current_weights_then_solves_the_next():
    from mtl_lightning.weighting.pe_ltr import PELTR, pec_weights

    model = nn.Module()
    model.shared = nn.Parameter(torch.zeros(2))
    model.shared_parameters = lambda: [model.shared]
    strategy = PELTR(lower_bounds={"t1": 0.5})
    strategy.setup([Task("t0", kind="regression"), Task("t1", kind="regression", weight=2.0)], model)
    x = model.shared
    losses = [((x - torch.tensor([1.0, 0.0])) ** 2).sum() / 2, ((x - torch.tensor([0.0, 1.0])) ** 2).sum() / 2]
    total = strategy(losses)
    torch.testing.assert_close(strategy.last_weights, torch.tensor([0.5, 1.0]))  # omega = 1/T, times Task.weight
    total.backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0]))  # 0.5 (x - e1) + 1.0 (x - e2) at x = 0
    g = torch.tensor([[-1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)  # gradients of 1 * L_0 and 2 * L_1 at 0
    torch.testing.assert_close(strategy.weights, pec_weights(g @ g.T, torch.tensor([0.0, 0.5])))
    torch.testing.assert_close(strategy.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))  # 0.8, 0.2 -> bound
    with pytest.raises(ValueError, match="sum to less than 1"):
        PELTR(lower_bounds=0.5).setup(tasks(2), model)
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]"):
        PELTR(lower_bounds={"nope": 0.1}).setup(tasks(2), model)
    with pytest.raises(ValueError, match="solver must be one of"):
        PELTR(solver="slsqp")


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
