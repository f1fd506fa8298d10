"""``CombinedOptimizer``: several optimizers stepped as one (SparseAdam for the tables, Adam for the rest).

Lightning's automatic optimization takes exactly one optimizer, and learning-rate
schedulers and checkpoints expect one too. This class owns the parameter groups
and the state of its parts (the parts read and write the same dictionaries), so
``param_groups``, ``state_dict()``/``load_state_dict()``, ``zero_grad()`` and any
``torch.optim.lr_scheduler`` work on it unchanged, and ``step()`` steps every part.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """Steps ``optimizers`` (over disjoint parameters) as one optimizer."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("CombinedOptimizer: the optimizers must hold disjoint parameters")
        super().__init__(params, {})
        self.optimizers = list(optimizers)
        self._share()

    def _share(self) -> None:
        """Make the parts use this optimizer's group dicts and state (after init and after loading)."""
        if not getattr(self, "_shared", False):  # first call: adopt the parts' groups
            self.param_groups = [g for o in self.optimizers for g in o.param_groups]
            self._sizes = [len(o.param_groups) for o in self.optimizers]
            self._shared = True
        start = 0
        for optimizer, size in zip(self.optimizers, self._sizes):
            optimizer.param_groups = self.param_groups[start : start + size]
            optimizer.state = self.state
            start += size

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"
