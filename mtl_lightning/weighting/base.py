"""The interface every loss-weighting strategy implements.

A strategy is an ``nn.Module`` (its state is checkpointed with the Lightning
module). It receives the unweighted per-task losses as one ``(T,)`` tensor in
task order and returns the total loss to back-propagate; ``last_weights``
holds the per-task weights it applied (logged as ``train/<task>/weight``).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Sequence

import torch
from torch import Tensor, nn

from ..config import Configurable
from ..tasks import Task


class WeightingStrategy(Configurable, nn.Module, metaclass=ABCMeta):
    """Base class: ``forward(losses (T,)) -> total loss``; ``setup`` is called once with the tasks and model."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.task_names: list[str] = []
        self.register_buffer("last_weights", torch.zeros(0), persistent=False)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        """Bind the strategy to the tasks (and the architecture, for gradient-based strategies)."""
        self.task_names = [t.name for t in tasks]

    @abstractmethod
    def forward(self, losses: Tensor) -> Tensor:
        """Total loss from the ``(T,)`` per-task losses; sets ``self.last_weights``."""
