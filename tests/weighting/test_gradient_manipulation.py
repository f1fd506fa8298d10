"""Strategies that project, drop, align or rescale per-task gradients (PCGrad, DB-MTL, GradDrop, GradVac, IMTL,
MetaBalance, ExcessMTL) against hand values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl_lightning.weighting import DBMTL, PCGrad
from mtl_lightning.weighting.pcgrad import project_conflicting

from tests.weighting.toys import Toy, flat_grad, tasks


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
