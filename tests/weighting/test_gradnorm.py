"""GradNorm: the balanced gradient norms, its update against a manual computation, state; the model's gradient (sparse
included) equals a plain backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl_lightning.weighting import GradNorm, PCGrad

from tests.weighting.toys import Toy, tasks


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
