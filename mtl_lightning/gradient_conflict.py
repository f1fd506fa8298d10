"""Gradient-conflict diagnostics: how far the tasks' gradients on the shared parameters pull against each other.

``GradientConflict(every_n_steps=N)`` is a Lightning callback. On every N-th
training batch (the first included; with ``accumulate_grad_batches`` every
batch counts, not every optimizer step) it takes, in ``on_before_backward`` (the
step's graph is still alive), the gradient ``g_t`` of each task's unweighted
loss ``L_t`` (``MultiTaskLightningModule.last_task_losses``) with respect to
the model's ``shared_parameters()`` (``parameters="shared"``) or
``last_shared_parameters()`` (``"last_shared"``), by
``torch.autograd.grad(..., retain_graph=True)``, and logs for each pair of
tasks ``a``, ``b`` (in the module's task order):

* ``train/conflict/<a>-<b>/cosine``: ``<g_a, g_b> / (|g_a| |g_b|)`` on this step;
* ``train/conflict/<a>-<b>/share``: the share of the measured steps so far
  (this fit and, through the callback's checkpointed state, the fits it resumes)
  whose cosine was below 0, the two tasks in conflict.

A pair where a gradient is exactly 0 (a task with no valid label in the batch,
or no path to the parameters) has no cosine: nothing is logged for it on that
step and the step does not count for its share.

The cosine uses the task losses, not the weighted ones: a weighting strategy
scales a task's gradient by a positive weight, which leaves the cosine alone,
and gradient strategies (PCGrad, MGDA...) change the update, not the tasks'
gradients, so the diagnostic reads the same with any strategy.

Under DDP the per-task gradients are averaged over the ranks (one all-reduce of
``T x P`` floats, ``P`` the number of shared parameters; sparse embedding
gradients are made dense) before the cosines, so they are those of the global
batch and every rank logs the same values. Between measured steps the callback
does nothing beyond a counter; on a measured step it costs ``T`` backward
passes through the shared part and that all-reduce (take
``parameters="last_shared"`` to leave out large embedding tables).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from .weighting.base import distributed_mean, flat_gradient

PARAMETER_SETS = ("shared", "last_shared")


def task_gradients(losses: Sequence[Tensor], parameters: Sequence[nn.Parameter]) -> Tensor:
    """``(T, P)``: the gradient of each loss with respect to ``parameters``, flattened (float32, dense; a parameter
    a loss does not reach contributes zeros), averaged over DDP ranks. Keeps the graph."""
    rows = []
    for loss in losses:
        if not loss.requires_grad:
            rows.append(flat_gradient([None] * len(parameters), parameters))
            continue
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        rows.append(flat_gradient(grads, parameters))
    return distributed_mean(torch.stack(rows))


def pairwise_cosines(gradients: Tensor) -> Tensor:
    """``(T, T)`` cosines of the rows of ``gradients`` (``(T, P)``), in float64; NaN where a row is all zeros."""
    g = gradients.double()
    norms = g.norm(dim=1)
    gram = g @ g.T
    cosines = gram / (norms[:, None] * norms[None, :])
    return torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cosines.clamp(-1.0, 1.0),
                       torch.full_like(cosines, float("nan")))


class GradientConflict(L.Callback):
    """Log the cosine of every pair of tasks' gradients on the shared parameters every ``every_n_steps`` training
    steps, and the running share of measured steps in conflict (see the module docstring).

    Args:
        every_n_steps: measure every this many training batches (the first, then every N-th; an integer >= 1).
        parameters: ``"shared"`` (``model.shared_parameters()``) or ``"last_shared"``
            (``model.last_shared_parameters()``).
    """

    def __init__(self, every_n_steps: int = 100, parameters: str = "shared") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"GradientConflict: every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if parameters not in PARAMETER_SETS:
            raise ValueError(f"GradientConflict: parameters must be one of {PARAMETER_SETS}, got {parameters!r}")
        self.every_n_steps = every_n_steps
        self.parameters = parameters
        self.batches = 0  # training batches seen (measured when batches % every_n_steps == 0)
        self.measured: dict[str, int] = {}  # pair -> steps with a cosine
        self.conflicts: dict[str, int] = {}  # pair -> steps with a cosine < 0
        self.last_cosines: dict[str, float] = {}  # pair -> the last measured cosine

    def _parameters(self, model: nn.Module) -> list[nn.Parameter]:
        chosen = model.shared_parameters() if self.parameters == "shared" else model.last_shared_parameters()
        found = [p for p in chosen if p.requires_grad]
        if not found:
            raise ValueError(f"GradientConflict: {type(model).__name__}.{self.parameters}_parameters() has no "
                             "trainable parameter, so there is no shared gradient to compare")
        return found

    def measure(self, names: Sequence[str], losses: Sequence[Tensor], parameters: Sequence[nn.Parameter]) -> dict[str, float]:
        """Take one measurement: update the counts and return ``{"<a>-<b>": cosine}`` for the pairs that have one."""
        cosines = pairwise_cosines(task_gradients(losses, parameters)).cpu()
        values = {}
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                value = float(cosines[i, j])
                if value != value:  # NaN: a zero gradient, no cosine
                    continue
                pair = f"{names[i]}-{names[j]}"
                values[pair] = value
                self.measured[pair] = self.measured.get(pair, 0) + 1
                self.conflicts[pair] = self.conflicts.get(pair, 0) + int(value < 0)
        self.last_cosines = values
        return values

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        measure = self.batches % self.every_n_steps == 0
        self.batches += 1
        if not measure:
            return
        losses = getattr(pl_module, "last_task_losses", None)
        if not losses:
            raise ValueError("GradientConflict reads MultiTaskLightningModule.last_task_losses, the step's per-task "
                             f"losses; {type(pl_module).__name__} did not set them")
        names = [t.name for t in pl_module.tasks]
        cosines = self.measure(names, losses, self._parameters(pl_module.model))
        logged = {}
        for pair, value in cosines.items():
            logged[f"train/conflict/{pair}/cosine"] = value
            logged[f"train/conflict/{pair}/share"] = self.conflicts[pair] / self.measured[pair]
        if logged:
            pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "measured": dict(self.measured), "conflicts": dict(self.conflicts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict["batches"])
        self.measured = dict(state_dict["measured"])
        self.conflicts = dict(state_dict["conflicts"])


__all__ = ["GradientConflict", "task_gradients", "pairwise_cosines"]
