"""Strategies that weigh the losses alone (Uncertainty, DWA, RLW, Scheduled, FAMO, GLS, STCH): their formulas against
hand-computed numbers and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl_lightning import Task
from mtl_lightning.weighting import DWA, RLW, Scheduled, Uncertainty
from mtl_lightning.weighting.dwa import dwa_weights

from tests.weighting.toys import Toy, tasks


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
