"""``LazySparseAdam`` against ``torch.optim.SparseAdam``: the same lazy Adam update, state and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtl_lightning.optim import LazySparseAdam

SETTINGS = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6)


def tables(seed: int = 0) -> list[nn.Embedding]:
    torch.manual_seed(seed)
    return [nn.Embedding(13, 4, sparse=True, padding_idx=0), nn.Embedding(7, 3, sparse=True)]


def backward(embeddings: list[nn.Embedding], step: int) -> None:
    """Gradients with repeated ids; on step 2 the first table sees only its padding id (an empty sparse gradient)
    and on step 3 the second table is not used (no gradient at all)."""
    g = torch.Generator().manual_seed(100 + step)
    first = torch.zeros(6, 5, dtype=torch.long) if step == 2 else torch.randint(0, 5, (6, 5), generator=g)
    loss = (embeddings[0](first) * torch.randn(6, 5, 4, generator=g)).sum()
    if step != 3:
        second = torch.tensor([1, 1, 1, 6, 2, 6])[torch.randperm(6, generator=g)]
        loss = loss + (embeddings[1](second) ** 2 * torch.randn(6, 3, generator=g)).sum()
    loss.backward()


@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_sparse_adam_over_several_steps(maximize):
    ours, theirs = tables(), tables()
    optimizers = [LazySparseAdam([t.weight for t in ours], maximize=maximize, **SETTINGS),
                  torch.optim.SparseAdam([t.weight for t in theirs], maximize=maximize, **SETTINGS)]
    initial = [t.weight.detach().clone() for t in ours]
    for step in range(6):
        for embeddings, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad(set_to_none=True)
            backward(embeddings, step)
            if step == 2:
                assert embeddings[0].weight.grad._nnz() == 0
            if step == 3:
                assert embeddings[1].weight.grad is None
            optimizer.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    for a, b in zip(ours, theirs):
        state_a, state_b = optimizers[0].state[a.weight], optimizers[1].state[b.weight]
        assert state_a["step"] == state_b["step"]
        torch.testing.assert_close(state_a["exp_avg"], state_b["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(state_a["exp_avg_sq"], state_b["exp_avg_sq"], rtol=0, atol=1e-6)
    assert [optimizers[0].state[t.weight]["step"] for t in ours] == [6, 5]  # the empty gradient counts as a step
    assert torch.equal(ours[0].weight[5:], initial[0][5:])  # rows never touched never move
    assert torch.equal(ours[0].weight[0], initial[0][0])  # nor does the padding row
    assert not torch.equal(ours[0].weight[1:5], initial[0][1:5])


def test_state_dict_moves_between_the_two():
    ours, theirs = tables(), tables()
    sparse_adam = torch.optim.SparseAdam([t.weight for t in theirs], **SETTINGS)
    for step in range(3):
        sparse_adam.zero_grad()
        backward(theirs, step)
        sparse_adam.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.weight.copy_(b.weight)
    lazy = LazySparseAdam([t.weight for t in ours], **SETTINGS)
    lazy.load_state_dict(copy.deepcopy(sparse_adam.state_dict()))  # as from a checkpoint file: no shared tensors
    for step in range(3, 6):
        for embeddings, optimizer in ((ours, lazy), (theirs, sparse_adam)):
            optimizer.zero_grad()
            backward(embeddings, step)
            optimizer.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    assert set(lazy.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_dense_gradient_is_refused_and_several_sparse_dims_follow_torch():
    weight = nn.Parameter(torch.randn(4, 3))
    weight.grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        LazySparseAdam([weight]).step()

    # a gradient sparse in both dimensions (not what an embedding gives): torch's own code path, same result
    ours = nn.Parameter(torch.randn(5, 6))
    theirs = nn.Parameter(ours.detach().clone())
    lazy, sparse_adam = LazySparseAdam([ours], **SETTINGS), torch.optim.SparseAdam([theirs], **SETTINGS)
    for step in range(3):
        indices = torch.tensor([[0, 4, 0, 2], [1, 5, 1, step]])
        grad = torch.sparse_coo_tensor(indices, torch.tensor([1.0, -2.0, 0.5, 3.0]) * (step + 1), (5, 6))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        lazy.step()
        sparse_adam.step()
    assert torch.equal(ours, theirs)
