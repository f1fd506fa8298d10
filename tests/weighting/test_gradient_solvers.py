"""Strategies that solve for task weights over the per-task gradients (MGDA, CAGrad, Nash-MTL, Aligned-MTL, FairGrad,
UPGrad, MoCo, PE-LTR): hand values and the solvers' optimality (KKT) conditions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl_lightning import Task

from tests.weighting.toys import Toy, flat_grad, tasks


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
