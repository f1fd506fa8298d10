"""The training module's optimizer: built here (:func:`build_optimizers`, with weight-decay groups), and the parts
it may be made of. ``CombinedOptimizer``: several optimizers stepped as one (SparseAdam for the tables, Adam for
the rest); ``LazySparseAdam``: ``torch.optim.SparseAdam``'s update computed with index operations.

Weight decay (:func:`no_weight_decay`): with ``weight_decay > 0`` the parameters are split into two groups, the
usual rule (timm, nanoGPT, Hugging Face): ``weight_decay`` for weight matrices, ``0`` for every bias (a name
with a part containing ``bias``: ``bias``, the expert bank's batched ``biases.0``, STAR's ``domain_bias``) and
every parameter with fewer than 2 dimensions (normalisation scales, per-channel vectors, scalar gates), every
parameter of a normalisation layer (``torch.nn``'s, or a module class named ``...Norm`` such as
``PartitionedNorm``), the embedding tables (unless ``decay_embeddings=True``: decaying a table pulls the rows of
rare ids towards zero at every step, whether the batch saw them or not) and the weighting strategy's own
parameters (uncertainty weighting's ``log sigma^2`` would otherwise be pulled towards ``sigma = 1``). An empty
group is left out. With ``weight_decay == 0`` there is one group, as before groups existed (so checkpoints
written then still resume).

The tables' learning rate (``embedding_lr``, :func:`build_optimizers`): the embedding tables trained with dense
gradients form a group of their own, last, at that rate, in the same optimizer (same update rule, state and
checkpoint); their weight decay is ``weight_decay`` with ``decay_embeddings``, else 0. Without it the tables stay
in the groups above, at ``lr``.

Lightning's automatic optimization takes exactly one optimizer, and learning-rate
schedulers and checkpoints expect one too. This class owns the parameter groups
and the state of its parts (the parts read and write the same dictionaries), so
``param_groups``, ``state_dict()``/``load_state_dict()``, ``zero_grad()`` and any
``torch.optim.lr_scheduler`` work on it unchanged, and ``step()`` steps every part.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

#: Module types whose parameters never get weight decay.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: Module types holding embedding tables (no weight decay unless asked).
EMBEDDING_LAYERS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def check_rate(name: str, value: Any, optional: bool = False) -> None:
    """``lr``, ``sparse_lr``, ``embedding_lr`` and ``weight_decay`` must be finite numbers >= 0 (``None`` only
    where ``optional``); ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}; a NaN, infinite or negative {name} turns "
            "every parameter it updates into NaN or makes training diverge"
        )


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (case-insensitive); ``ValueError`` naming a few otherwise."""
    found = {n: getattr(torch.optim, n) for n in dir(torch.optim)}
    classes = {n.lower(): c for n, c in found.items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    if name.lower() not in classes:
        raise ValueError(f"unknown optimizer {name!r}; any torch.optim class works, e.g. adam, adamw, sgd, adagrad")
    return classes[name.lower()]


def make_optimizer(make: type[torch.optim.Optimizer], params: list[Any],
                   kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """``make(params, **kwargs)``, with PyTorch's fused kernel for Adam/AdamW unless the user chose an implementation.

    ``params`` is a list of parameters or of parameter-group dicts. ``torch.optim.Adam``'s
    default on CPU updates one tensor at a time, op by op; the fused kernel (``fused=True``,
    CPU since PyTorch 2.4, and CUDA) does the same update in one pass per tensor. Where it is
    not available (older PyTorch, another device or dtype) the default implementation is used.
    """
    if make in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
        try:
            return make(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass
    return make(params, **kwargs)


def no_weight_decay(module: nn.Module, decay_embeddings: bool = False,
                    exclude: Iterable[nn.Module] = ()) -> set[int]:
    """``id``s of ``module``'s parameters that get no weight decay (see the module docstring for the rule).

    ``exclude``: submodules whose every parameter is left undecayed (the weighting strategy).
    """
    found: set[int] = set()
    for excluded in exclude:
        found.update(id(p) for p in excluded.parameters())
    for name, p in module.named_parameters():
        if p.dim() < 2 or any("bias" in part for part in name.split(".")):
            found.add(id(p))
    for layer in module.modules():
        norm = isinstance(layer, NORM_LAYERS) or type(layer).__name__.endswith("Norm")
        if norm or (isinstance(layer, EMBEDDING_LAYERS) and not decay_embeddings):
            found.update(id(p) for p in layer.parameters(recurse=False))
    return found


def decay_groups(parameters: Sequence[nn.Parameter], weight_decay: float, no_decay: set[int]) -> list[dict[str, Any]]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}]``
    (an empty group left out)."""
    decayed = [p for p in parameters if id(p) not in no_decay]
    undecayed = [p for p in parameters if id(p) in no_decay]
    return [group for group in ({"params": decayed, "weight_decay": float(weight_decay)},
                                {"params": undecayed, "weight_decay": 0.0}) if group["params"]]


def build_optimizers(
    parameters: Sequence[nn.Parameter],
    *,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer_kwargs: dict[str, Any] | None = None,
    no_decay: set[int] | None = None,
    sparse_tables: Sequence[nn.Parameter] = (),
    sparse_lr: float | None = None,
    dense_tables: Sequence[nn.Parameter] = (),
    embedding_lr: float | None = None,
    lr_scheduler: str | None = None,
    lr_scheduler_kwargs: dict[str, Any] | None = None,
    lr_scheduler_interval: str = "epoch",
) -> Any:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer, or ``{"optimizer", "lr_scheduler"}``.

    ``parameters`` are trained by the ``torch.optim`` class ``optimizer`` (fused Adam/AdamW where
    available, see :func:`make_optimizer`) with ``lr``, ``optimizer_kwargs`` and, when ``weight_decay > 0``,
    two groups: ``weight_decay`` except for the ids in ``no_decay`` (see :func:`no_weight_decay`).
    ``sparse_tables`` (a subset of ``parameters`` with sparse gradients) are trained by
    :class:`LazySparseAdam` at ``sparse_lr`` (default ``lr``; ``betas``/``eps`` from ``optimizer_kwargs``,
    no weight decay), the two stepped as one :class:`CombinedOptimizer`. With ``embedding_lr`` (not with
    ``sparse_tables``), ``dense_tables`` (the embedding tables among ``parameters``) are one more group, last, at
    ``embedding_lr``, with no weight decay unless ``no_decay`` leaves them out (``decay_embeddings``); without it
    ``dense_tables`` is not read. ``lr_scheduler`` is a
    ``torch.optim.lr_scheduler`` class name, stepped every ``lr_scheduler_interval`` (``"epoch"``/``"step"``).
    """
    make = optimizer_class(optimizer)
    extra = dict(optimizer_kwargs or {})
    if "weight_decay" in extra or "lr" in extra:
        raise ValueError(f"optimizer_kwargs {sorted({'weight_decay', 'lr'} & set(extra))}: give lr and weight_decay "
                         "as the module's own arguments (weight decay then follows the decay/no-decay groups)")
    tables = {id(p) for p in sparse_tables}
    dense = [p for p in parameters if id(p) not in tables]
    own_rate = {id(p) for p in dense_tables} & {id(p) for p in dense} if embedding_lr is not None else set()
    if embedding_lr is not None and (tables or not own_rate):
        raise ValueError("embedding_lr: " + ("the tables train with sparse gradients here: their rate is sparse_lr"
                                             if tables else "the model has no embedding table this optimizer trains "
                                             "(under TorchRecStrategy, give TorchRecStrategy(embedding_lr=...))"))
    rest = [p for p in dense if id(p) not in own_rate]
    if weight_decay > 0:
        params: list[Any] = decay_groups(rest, weight_decay, no_decay or set())
        kwargs = dict(lr=lr, **extra)
    else:
        params, kwargs = rest, dict(lr=lr, weight_decay=weight_decay, **extra)
    if own_rate:
        if weight_decay == 0:
            params = [{"params": rest}] if rest else []
        decays = weight_decay > 0 and not own_rate <= (no_decay or set())
        params.append({"params": [p for p in dense if id(p) in own_rate], "lr": float(embedding_lr),
                       "weight_decay": float(weight_decay) if decays else 0.0})
    if tables:
        adam = {k: v for k, v in extra.items() if k in ("betas", "eps")}
        table_lr = lr if sparse_lr is None else sparse_lr  # sparse_lr=0.0 is a rate, not "unset"
        parts: list[torch.optim.Optimizer] = [LazySparseAdam([p for p in parameters if id(p) in tables], lr=table_lr,
                                                             **adam)]
        if dense:
            parts.append(make_optimizer(make, params, kwargs))
        built: torch.optim.Optimizer = CombinedOptimizer(parts)
    else:
        built = make_optimizer(make, params, kwargs)
    if lr_scheduler is None:
        return built
    scheduler_cls = getattr(torch.optim.lr_scheduler, lr_scheduler, None)
    if scheduler_cls is None:
        raise ValueError(f"unknown lr_scheduler {lr_scheduler!r}; use a torch.optim.lr_scheduler class name")
    scheduler = scheduler_cls(built, **(lr_scheduler_kwargs or {}))
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": lr_scheduler_interval}}


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss (computed with gradients on, as ``Optimizer.step`` expects), or ``None``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
        loss = _evaluate(closure)
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


class LazySparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with each parameter's step done by index operations instead of sparse tensors.

    The update is SparseAdam's (the lazy Adam): for a gradient with entries
    ``(i_k, g_k)``, the rows ``r`` it touches get ``g_r = sum of g_k with i_k = r``
    and only those rows' moments and values change,

        m_r <- m_r + (1 - beta1) (g_r - m_r)
        v_r <- v_r + (1 - beta2) (g_r^2 - v_r)
        w_r <- w_r - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m_r / (sqrt(v_r) + eps)

    where ``t`` is the parameter's step count, advanced at every step that finds
    a gradient on it (an empty one included, as SparseAdam does); ``maximize``
    negates the gradient. torch's version coalesces the gradient (sort and merge),
    reads the moments through two ``sparse_mask`` calls and writes moments and
    values through three sparse additions; this one finds the touched rows with
    one ``torch.unique`` (``return_inverse``), sums duplicate ids with one
    ``index_add_``, reads the moments with ``index_select``, writes them back
    with ``index_copy_`` (the rows are unique) and moves the rows with
    ``index_add_`` (the step time against SparseAdam's: docs/performance.md).

    Being a subclass, it takes SparseAdam's arguments and checks, and keeps its
    ``state`` (``step``, ``exp_avg``, ``exp_avg_sq``) and ``state_dict``, so
    checkpoints move between the two. Results agree with SparseAdam to float
    rounding: duplicate ids are summed in another order; every other operation
    is the same float operation. A gradient with more than one sparse dimension
    (embedding lookups never give one) is handed to torch's SparseAdam code.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, maximize, lr = group["eps"], group.get("maximize", False), float(group["lr"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[param]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                if grad.sparse_dim() != 1:
                    torch.optim._functional.sparse_adam(
                        [param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]],
                        eps=eps, beta1=beta1, beta2=beta2, lr=lr, maximize=maximize,
                    )
                    continue
                values = grad._values()  # (nnz, *row shape)
                if values.numel() == 0:
                    continue
                self._update_rows(param, grad._indices()[0], -values if maximize else values, state,
                                  lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        return loss

    @staticmethod
    def _update_rows(param: Tensor, ids: Tensor, values: Tensor, state: dict[str, Any], *, lr: float, beta1: float,
                     beta2: float, eps: float) -> None:
        rows, inverse = torch.unique(ids, return_inverse=True)  # (R,), (nnz,)
        grad = values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)  # (R, ...)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        old_exp_avg = exp_avg.index_select(0, rows)
        old_exp_avg_sq = exp_avg_sq.index_select(0, rows)
        # the same float operations as torch's sparse_adam: update = (new - old) * (1 - beta), moment = update + old
        exp_avg_new = grad.sub(old_exp_avg).mul_(1 - beta1).add_(old_exp_avg)
        exp_avg_sq_new = grad.pow_(2).sub_(old_exp_avg_sq).mul_(1 - beta2).add_(old_exp_avg_sq)
        exp_avg.index_copy_(0, rows, exp_avg_new)
        exp_avg_sq.index_copy_(0, rows, exp_avg_sq_new)
        step = state["step"]
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        param.index_add_(0, rows, exp_avg_new.div_(exp_avg_sq_new.sqrt_().add_(eps)).mul_(-step_size))
