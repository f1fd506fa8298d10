"""The interface every loss-weighting strategy implements, and the machinery they share.

A strategy is an ``nn.Module`` (its state, learned or counted, is checkpointed
with the Lightning module and restored on resume). The training module calls:

* ``setup(tasks, model)`` once, from its constructor;
* ``forward(losses)`` every training step, with the unweighted per-task losses
  in task order, as a list of scalar tensors (or one ``(T,)`` tensor); it
  returns the loss to back-propagate and sets ``last_weights`` (logged as
  ``train/<task>/weight``). Subclasses implement ``total_loss(losses, per_task)``
  and get both forms. Pass the list: a per-task gradient taken through a
  ``torch.stack`` also runs every other task's branch backwards (with zeros);

* ``begin_epoch(epoch)`` at the start of every training epoch;
* ``before_optimizer_step()`` once per optimizer step, when the gradients are
  complete (accumulated over ``accumulate_grad_batches`` and synchronised across
  DDP ranks) and before the model's optimizer steps.

How gradient strategies fit Lightning's automatic optimization.
Strategies that act on per-task gradients (PCGrad, DB-MTL) or on gradient norms
(GradNorm) compute what they need inside ``forward`` with
``torch.autograd.grad`` and return a *surrogate* loss: a tensor whose value is
the weighted task loss and whose gradient is exactly the gradient the strategy
wants. Lightning then back-propagates it like any loss, so every Trainer flag
keeps its usual meaning: ``precision`` (autocast), ``gradient_clip_val`` (applied
to the combined gradient), ``accumulate_grad_batches`` (the strategy acts on
each micro-batch and the micro-batch gradients are averaged), DDP (the surrogate
gradient is averaged across ranks like any other), learning-rate schedulers and
exact resume of the optimizer and loops. (Lightning's manual optimization would
not allow this: it rejects ``gradient_clip_val`` and ``accumulate_grad_batches``.)

Under DDP every quantity a strategy's *decision* depends on (losses, per-task
gradients) is first averaged across ranks (:func:`distributed_mean`), so all
ranks take the same decision and hold identical state.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Configurable
from ..registry import Registry
from ..tasks import Task


S = TypeVar("S", bound="type[WeightingStrategy]")

#: What a strategy may declare it reads (``WeightingStrategy.reads``).
READS = ("losses", "last_shared_gradients", "shared_gradients", "representation_gradients", "sampled_gradients")

#: Every registered strategy by name (a :class:`~mtl_lightning.registry.Registry`, read like a dict), filled by
#: :func:`register_weighting` as each strategy's file is imported (``mtl_lightning.weighting`` imports every
#: module of its package). Its base class is :class:`WeightingStrategy`.
STRATEGIES: Registry[WeightingStrategy] = Registry("weighting")


def register_weighting(name: str) -> Callable[[S], S]:
    """Class decorator registering a ``WeightingStrategy`` subclass under ``name`` (``weighting="name"``).

    ``STRATEGIES.register(name)``: sets ``cls.registry_name``, which also lets a config's ``class_path`` name
    it. A name taken by another class raises ``ValueError``, a class that is no ``WeightingStrategy`` ``TypeError``.
    """
    return STRATEGIES.register(name)


def distributed_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over all DDP ranks (``value`` itself outside DDP); never differentiable."""
    value = value.detach()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def gradient_surrogate(parameters: Sequence[nn.Parameter], gradients: Sequence[Tensor | None]) -> Tensor:
    """A tensor of value 0 whose backward adds ``gradients[k]`` to ``parameters[k].grad`` (``None``: skipped).

    ``sum_p <p, g_p>`` minus its detached value. A sparse gradient (an embedding
    table with ``sparse=True``) stays sparse: its term is an embedding lookup of
    the gradient's rows, whose backward is the same sparse tensor.
    """
    inner: Tensor | None = None
    for p, g in zip(parameters, gradients):
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()
            rows = F.embedding(g.indices()[0], p, sparse=True)  # (N, ...) rows of p
            term = (rows * g.values().to(p.dtype)).sum()
        else:
            term = (p * g.to(p.dtype)).sum()
        inner = term if inner is None else inner + term
    if inner is None:
        raise ValueError("gradient_surrogate: no parameter has a gradient")
    return inner - inner.detach()


def scalarize(losses: Tensor, function: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``function`` of the rank-averaged losses as a loss to back-propagate, and its weights ``dF/dL_i``.

    For a strategy whose total is a nonlinear function ``F`` of the task losses (GLS's geometric mean,
    STCH's log-sum-exp): ``F`` and its weights are evaluated at the losses averaged across DDP ranks
    (the losses themselves outside DDP), and the returned tensor has the value ``F(L_bar)`` and the
    gradient ``sum_i dF/dL_i grad L_i``, which DDP's gradient average turns into the gradient of ``F``
    at the global batch's losses (not an average of every rank's own ``F``). Returns ``(loss, weights)``.
    """
    mean = distributed_mean(losses.float())
    with torch.enable_grad():
        point = mean.clone().requires_grad_(True)
        value = function(point)
        (weights,) = torch.autograd.grad(value, point)
    surrogate = (weights.to(losses.dtype) * (losses - losses.detach())).sum()
    return value.detach().to(losses.dtype) + surrogate, weights


def flat_gradient(gradients: Sequence[Tensor | None], parameters: Sequence[nn.Parameter]) -> Tensor:
    """One float32 vector from per-parameter gradients (``None``: zeros; sparse: densified)."""
    return torch.cat([_dense(g, p).reshape(-1).float() for g, p in zip(gradients, parameters)])


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@STRATEGIES.base_class
class WeightingStrategy(Configurable, nn.Module, metaclass=ABCMeta):
    """Base class: ``forward(per-task losses) -> loss to back-propagate``; see the module docstring for the hooks."""

    #: ``True`` for a strategy that needs *dense* per-task table gradients, so cannot run with sparse ones:
    #: ``sparse_embeddings=True`` and ``TorchRecStrategy`` refuse it. No built-in strategy sets it (those
    #: reading per-task gradients densify a sparse table gradient and hand it back sparse; tested).
    needs_embedding_gradients: bool = False

    #: What a step reads besides the losses (one of ``READS``), declared in the strategy's own file or by its
    #: base class, or set by an instance from its arguments: ``"losses"``; ``"last_shared_gradients"``
    #: (GradNorm's norms); ``"shared_gradients"``, per-task gradients of ``shared_parameters()``
    #: (``GradientStrategy``, ExcessMTL, PE-LTR); ``"representation_gradients"``, of one shared representation
    #: (MGDA-UB, GradDrop on ``representation=``); ``"sampled_gradients"``, of ``shared_parameters()`` on
    #: several samples of the batch (``SampledGradientStrategy``). Tested against what every strategy takes.
    reads: str = "losses"

    #: The arguments that make the strategy read a shared representation instead of the shared parameters
    #: (``{"representation": "<submodule>"}``), for strategies that offer it; ``{}`` for the others.
    representation_arguments: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("reads", READS[0]) not in READS:
            raise TypeError(f"{cls.__name__}.reads must be one of {READS}, got {cls.__dict__['reads']!r}")

    @property
    def takes_shared_gradients(self) -> bool:
        """Whether a step takes per-task gradients of ``shared_parameters()`` (derived from ``reads``)."""
        return self.reads in ("shared_gradients", "sampled_gradients")

    @takes_shared_gradients.setter
    def takes_shared_gradients(self, value: bool) -> None:  # the older way to declare it
        self.reads = "shared_gradients" if value else "losses"

    def per_task_gradient_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of ``model`` whose per-task gradients a step takes (``TorchRecStrategy`` refuses a
        strategy when an embedding table is among them): ``shared_parameters()`` when
        ``takes_shared_gradients``, else none."""
        return [p for p in model.shared_parameters() if p.requires_grad] if self.takes_shared_gradients else []  # type: ignore[operator]

    @classmethod
    def runs_with_fused_tables(cls) -> bool:
        """Whether, at its defaults, the strategy takes no per-task gradient of any table (so runs under
        ``TorchRecStrategy``): it reads the losses or the last shared layer only, and needs no table gradient."""
        takes = cls.takes_shared_gradients if isinstance(cls.takes_shared_gradients, bool) else False
        return cls.reads in ("losses", "last_shared_gradients") and not takes and not cls.needs_embedding_gradients

    @property
    def backward_through_model(self) -> bool:
        """Whether the returned loss must back-propagate through the model itself rather than hand gradients
        computed beforehand to the optimizer (see ``GradNorm``): true once a layer of the architecture trains
        its parameters from the backward pass through it (declares ``trains_in_backward``, as
        ``TorchRecStrategy``'s sharded embedding layers do). Derived from the architecture bound by ``setup``."""
        model = self.__dict__.get("_model")
        return model is not None and any(getattr(m, "trains_in_backward", False) for m in model.modules())

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.task_names: list[str] = []
        self.tasks: tuple[Task, ...] = ()
        self.register_buffer("last_weights", torch.zeros(0), persistent=False)

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        """Bind the strategy to the tasks and the architecture (kept unregistered: not a submodule of the strategy)."""
        self.tasks = tuple(tasks)
        self.task_names = [t.name for t in tasks]
        self.__dict__["_model"] = model

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def forward(self, losses: Tensor | Sequence[Tensor]) -> Tensor:
        """The loss to back-propagate from the per-task losses; sets ``self.last_weights``."""
        if isinstance(losses, Tensor):
            if losses.dim() != 1:
                raise ValueError(f"{type(self).__name__} expects one loss per task, got a tensor of shape "
                                 f"{tuple(losses.shape)}")
            stacked, per_task = losses, list(losses.unbind())
        else:
            per_task = list(losses)
            if any(not isinstance(l, Tensor) or l.dim() != 0 for l in per_task):
                raise ValueError(f"{type(self).__name__} expects a list of scalar loss tensors, one per task")
            stacked = torch.stack(per_task)
        if len(per_task) != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__} expects one loss per task ({self.num_tasks}: {self.task_names}), "
                f"got {len(per_task)}; was setup(tasks, model) called?"
            )
        return self.total_loss(stacked, per_task)

    @abstractmethod
    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        """The loss to back-propagate: ``losses`` is ``(T,)``, ``per_task`` the same losses as separate tensors."""

    def begin_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch with its index (0-based)."""

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step, after the gradients are complete, before the model's step."""

    def private_parameters(self) -> list[nn.Parameter]:
        """Parameters this strategy updates itself; the model's optimizer must leave them alone."""
        return []

    def _weighted_sum(self, weights: Tensor, losses: Tensor) -> Tensor:
        weights = weights.detach().to(losses.dtype)
        self.last_weights = weights
        return (weights * losses).sum()

    def _task_weights(self) -> Tensor:
        return torch.tensor([float(t.weight) for t in self.tasks])


def _requires_backward(losses: Tensor) -> bool:
    return torch.is_grad_enabled() and losses.requires_grad


class GradientStrategy(WeightingStrategy):
    """A strategy that combines per-task gradients of the architecture's ``shared_parameters()``.

    Every step: per-task objectives ``o_i`` (``objective(i, L_i)``), their
    gradients ``g_i`` with respect to the shared parameters (flattened, ``(T, P)``,
    averaged across DDP ranks), one combined gradient ``combine(G) -> (P,)``
    for the shared parameters; every other parameter gets the gradient of
    ``sum_i o_i`` (each tower sees only its own task). Costs ``T`` backward
    passes (one per task) instead of one. A shared embedding with sparse
    gradients is combined densely and handed back sparse (its non-zero rows).
    """

    reads = "shared_gradients"

    def per_task_gradient_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every trainable parameter: the per-task gradients are taken of the shared and the task-specific ones."""
        return trainable_parameters(model) if self.reads == "shared_gradients" else []

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        shared = [p for p in model.shared_parameters() if p.requires_grad]  # type: ignore[operator]
        if not shared:
            raise ValueError(f"{type(self).__name__} needs shared parameters; "
                             f"{type(model).__name__}.shared_parameters() returned none")
        shared_ids = {id(p) for p in shared}
        self._shared = shared
        self._specific = [p for p in trainable_parameters(model) if id(p) not in shared_ids]
        self.num_shared = sum(p.numel() for p in shared)

    def objective(self, index: int, loss: Tensor) -> Tensor:
        """Task ``index``'s objective, whose gradient is combined (default ``Task.weight * L``)."""
        return float(self.tasks[index].weight) * loss

    @abstractmethod
    def combine(self, gradients: Tensor, losses: Tensor | None = None) -> Tensor:
        """The shared parameters' update direction ``(P,)`` from the per-task gradients ``(T, P)``.

        ``losses`` are the per-task losses ``(T,)`` (float32, averaged across DDP ranks, no graph)
        for strategies that read them (MGDA's loss normalisation); ``None`` when called directly.
        """

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        self.last_weights = self._task_weights().to(losses)
        objectives = [self.objective(i, loss) for i, loss in enumerate(per_task)]
        value = torch.stack(objectives).sum()
        if not _requires_backward(losses):
            return value
        parameters = self._shared + self._specific
        shared_rows: list[Tensor] = []
        specific_sum: list[Tensor | None] = [None] * len(self._specific)
        sparse: set[int] = set()  # shared parameters with sparse gradients (embeddings with sparse=True)
        for objective in objectives:
            grads = torch.autograd.grad(objective, parameters, retain_graph=True, allow_unused=True)
            shared_rows.append(flat_gradient(grads[:len(self._shared)], self._shared))
            sparse.update(k for k, g in enumerate(grads[:len(self._shared)]) if g is not None and g.is_sparse)
            for k, g in enumerate(grads[len(self._shared):]):
                if g is not None:
                    specific_sum[k] = g if specific_sum[k] is None else specific_sum[k] + g
        combined = self.combine(distributed_mean(torch.stack(shared_rows)), distributed_mean(losses.float()))  # (P,)
        shared_grads = torch.split(combined, [p.numel() for p in self._shared])
        shared_grads = [g.view_as(p).to_sparse(sparse_dim=1) if k in sparse else g.view_as(p)
                        for k, (g, p) in enumerate(zip(shared_grads, self._shared))]
        return value.detach() + gradient_surrogate(parameters, [*shared_grads, *specific_sum])


class RepresentationCapture:
    """The output ``Z`` of one submodule of the architecture (kept by a forward hook), for strategies that act on
    the per-task gradients of a shared representation (MGDA-UB, GradDrop) instead of the shared parameters.

    ``path`` is the submodule's dotted name (``"experts"`` for MMoE, ``"bottom"`` for a shared bottom); its
    output must be one tensor that every task reads. Only outputs that require gradients are kept.
    """

    def __init__(self, model: nn.Module, path: str, owner: str) -> None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{owner}: representation={path!r} is not a submodule of {type(model).__name__}") from None
        self.path, self.owner = path, owner
        self.output: Tensor | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: object, output: object) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(f"{self.owner}: representation {self.path!r} must return one tensor, got "
                            f"{type(output).__name__}")
        self.output = output if output.requires_grad else None

    def take(self) -> Tensor:
        """The representation of this step's forward pass (then forgotten)."""
        output, self.output = self.output, None
        if output is None:
            raise ValueError(f"{self.owner}: representation {self.path!r} did not run with gradients in this step's "
                             "forward pass")
        return output

    @staticmethod
    def gradients(objectives: Sequence[Tensor], representation: Tensor) -> list[Tensor]:
        """``grad_Z o_i`` per objective (zeros where one does not read ``Z``), by backward passes down to ``Z`` only."""
        rows = [torch.autograd.grad(o, representation, retain_graph=True, allow_unused=True)[0] for o in objectives]
        return [torch.zeros_like(representation) if g is None else g for g in rows]

    @staticmethod
    def surrogate(representation: Tensor, gradients: Sequence[Tensor], combined: Tensor) -> Tensor:
        """A tensor of value 0 whose backward sends ``combined - sum_i gradients[i]`` into ``Z``.

        Added to ``sum_i o_i``, the parameters upstream of ``Z`` receive ``J_Z^T combined`` and
        every parameter downstream (each task's tower) its own objective's gradient.
        """
        correction = combined.float() - torch.stack([g.float() for g in gradients]).sum(dim=0)
        inner = (representation * correction.to(representation.dtype)).sum()
        return inner - inner.detach()


class SampledGradientStrategy(WeightingStrategy):
    """A strategy that needs per-task gradients of the shared parameters on several *independent* samples of
    the same step (MoDo's and SDMGrad's double sampling), from the one batch Lightning hands the module.

    The batch's rows are split into ``num_samples`` disjoint groups by a random permutation from the
    strategy's own generator (seeded, checkpointed as extra state, the same on every DDP rank); the
    groups are the samples (each about ``B / num_samples`` rows, so ``batch_size`` is the paper's samples
    together). Group ``s``'s gradient of task ``i`` is ``B / |s|`` times the part of the batch gradient
    that its rows contribute, ``g_i^(s) = (B / |s|) J_s^T dL_i/dy_s`` (``y`` the architecture's outputs,
    captured by a forward hook): over random partitions an unbiased estimate of the batch gradient, and
    ``sum_s |s| / B g_i^(s)`` is the batch gradient ``g_i`` exactly. That costs ``T`` backward passes from
    the losses to the outputs (cheap) and ``num_samples * T`` from the outputs down to the shared
    parameters. Under DDP the ``(S, T, P)`` gradients are averaged across ranks (sample ``s`` is then the
    union of every rank's group ``s``), so every rank decides alike.

    ``combine_samples(G) -> (P,)`` gives the shared parameters' update; every other parameter gets the
    gradient of ``sum_i o_i`` on the whole batch (``o_i = Task.weight_i L_i``; each tower its own task's).
    """

    reads = "sampled_gradients"
    num_samples: int = 3

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._outputs: dict[str, Tensor] | None = None

    def setup(self, tasks: Sequence[Task], model: nn.Module) -> None:
        super().setup(tasks, model)
        shared = [p for p in model.shared_parameters() if p.requires_grad]  # type: ignore[operator]
        if not shared:
            raise ValueError(f"{type(self).__name__} needs shared parameters; "
                             f"{type(model).__name__}.shared_parameters() returned none")
        self._shared = shared
        self.num_shared = sum(p.numel() for p in shared)
        model.register_forward_hook(self._keep_outputs)

    def _keep_outputs(self, module: nn.Module, inputs: object, output: object) -> None:
        if not isinstance(output, dict) or not all(isinstance(v, Tensor) for v in output.values()):
            raise TypeError(f"{type(self).__name__} reads the architecture's outputs, a dict of tensors; got "
                            f"{type(output).__name__}")
        kept = {name: value for name, value in output.items() if value.requires_grad}
        self._outputs = kept or None

    def groups(self, num_rows: int) -> Tensor:
        """Each row's sample ``(num_rows,)`` in ``[0, num_samples)``: a random permutation cut in turn (sizes differ
        by at most one). The strategy's generator gives one seed per step, whatever the batch size (a last, shorter
        batch on one DDP rank leaves every rank's generator in the same state); the permutation comes from it."""
        if num_rows < self.num_samples:
            raise ValueError(f"{type(self).__name__} splits every batch into {self.num_samples} samples; a batch "
                             f"of {num_rows} rows is too small")
        step_seed = int(torch.randint(0, 2 ** 62, (), generator=self.generator))
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(step_seed))
        groups = torch.empty(num_rows, dtype=torch.long)
        groups[order] = torch.arange(num_rows) % self.num_samples
        return groups

    @abstractmethod
    def combine_samples(self, gradients: Tensor) -> Tensor:
        """The shared parameters' update ``(P,)`` from per-sample, per-task gradients ``(S, T, P)``; sets
        ``last_weights``."""

    def sample_gradients(self, objectives: Sequence[Tensor], outputs: dict[str, Tensor]
                         ) -> tuple[Tensor, Tensor, set[int]]:
        """``(S, T, P)`` per-sample gradients (float32, this rank's rows), this rank's batch gradients ``(T, P)``
        (``sum_s |s| / B`` of them) and the indices of the shared parameters whose gradients are sparse."""
        tensors = list(outputs.values())
        num_rows = tensors[0].shape[0] if tensors[0].dim() else 0
        if any(t.dim() == 0 or t.shape[0] != num_rows for t in tensors):
            raise ValueError(f"{type(self).__name__}: every architecture output must have the batch's rows as its "
                             f"first dimension, got shapes {[tuple(t.shape) for t in tensors]}")
        groups = self.groups(num_rows).to(tensors[0].device)
        counts = torch.bincount(groups, minlength=self.num_samples).tolist()
        sparse: set[int] = set()
        rows = torch.zeros(self.num_samples, len(objectives), self.num_shared, device=tensors[0].device)
        for i, objective in enumerate(objectives):
            upstream = torch.autograd.grad(objective, tensors, retain_graph=True, allow_unused=True)
            used = [(t, u) for t, u in zip(tensors, upstream) if u is not None]
            if not used:
                continue
            for s in range(self.num_samples):
                factor = (groups == s).to(used[0][1].dtype) * (num_rows / counts[s])  # (B,)
                grads = torch.autograd.grad(
                    [t for t, _ in used], self._shared, retain_graph=True, allow_unused=True,
                    grad_outputs=[u * factor.view(-1, *([1] * (u.dim() - 1))) for _, u in used])
                sparse.update(k for k, g in enumerate(grads) if g is not None and g.is_sparse)
                rows[s, i] = flat_gradient(grads, self._shared)
        shares = torch.tensor(counts, dtype=rows.dtype, device=rows.device) / num_rows  # (S,)
        return rows, torch.einsum("s,stp->tp", shares, rows), sparse

    def total_loss(self, losses: Tensor, per_task: list[Tensor]) -> Tensor:
        objectives = [float(t.weight) * loss for t, loss in zip(self.tasks, per_task)]
        value = torch.stack(objectives).sum()
        outputs, self._outputs = self._outputs, None
        if not _requires_backward(losses):
            self.last_weights = self._task_weights().to(losses)
            return value
        if outputs is None:
            raise ValueError(f"{type(self).__name__}: the architecture did not run with gradients in this step's "
                             "forward pass (its outputs are read through a forward hook set up by setup(tasks, model))")
        rows, batch_gradients, sparse = self.sample_gradients(objectives, outputs)
        combined = self.combine_samples(distributed_mean(rows))  # (P,)
        # ``value`` back-propagates sum_i g_i into the shared parameters; the surrogate turns that into ``combined``
        correction = torch.split(combined.to(batch_gradients) - batch_gradients.sum(dim=0),
                                 [p.numel() for p in self._shared])
        correction = [g.view_as(p).to_sparse(sparse_dim=1) if k in sparse else g.view_as(p)
                      for k, (g, p) in enumerate(zip(correction, self._shared))]
        return value + gradient_surrogate(self._shared, correction)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())


def _dense(gradient: Tensor | None, like: Tensor) -> Tensor:
    if gradient is None:
        return torch.zeros_like(like)
    return gradient.to_dense() if gradient.is_sparse else gradient


__all__ = ["WeightingStrategy", "GradientStrategy", "SampledGradientStrategy", "STRATEGIES", "READS", "register_weighting",
           "distributed_mean", "gradient_surrogate", "flat_gradient", "trainable_parameters", "RepresentationCapture",
           "scalarize"]
