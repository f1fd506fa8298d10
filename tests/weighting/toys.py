"""Small models and helpers shared by the weighting tests: a toy with one shared layer and a head per task."""

from __future__ import annotations


import torch
from torch import nn

from mtl_lightning import Task


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
