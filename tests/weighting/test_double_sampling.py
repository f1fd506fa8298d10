"""Strategies that split the batch into samples (MoDo, SDMGrad): hand values and the module's step."""

from __future__ import annotations


import pytest
import torch

from mtl_lightning.weighting.moco import project_to_simplex

from tests.weighting.toys import Toy, flat_grad, tasks


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
