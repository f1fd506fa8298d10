"""The contract every architecture fulfils.

An architecture is a plain ``nn.Module``: ``forward(features) -> {task: logits}``
with one ``(B,)`` tensor per task (binary tasks give logits, regression tasks
values). It may return further outputs that are not trained as tasks, declared
by ``extra_outputs()`` (ESMM's ``cvr``, which only the ``ctcvr`` product
supervises; ESCM's imputation tower); ``output_names`` lists everything
``forward`` returns, tasks first. It declares which parameters all tasks share (``shared_parameters``)
and which layer is the last shared one (``last_shared_parameters``, GradNorm's
``W``), and may add its own training signal through ``auxiliary_loss``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
import inspect
from typing import ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import Configurable
from ..features import Feature, feature_from_config
from ..layers import MLP
from ..tasks import Task, check_tasks


class MultiTaskArchitecture(Configurable, nn.Module, metaclass=ABCMeta):
    """Base class: keeps ``features`` and ``tasks`` and defines the hooks the training module uses."""

    #: ``True`` for a multi-scenario (multi-domain) architecture: its constructor takes ``domain_feature=`` (the
    #: sparse feature holding the scenario id) and ``num_domains=``, and an instance keeps both under those names.
    #: Tests, benchmarks and per-scenario evaluation read this flag, never the constructor's parameter names.
    multi_scenario: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("multi_scenario", False):
            parameters = inspect.signature(cls.__init__).parameters
            missing = [name for name in ("domain_feature", "num_domains") if name not in parameters]
            if missing:
                raise TypeError(f"{cls.__name__} sets multi_scenario = True, so its __init__ must take "
                                f"domain_feature= and num_domains=; it lacks {missing}")

    def __init__(self, features: Sequence[Feature | dict], tasks: Sequence[Task | dict]) -> None:
        nn.Module.__init__(self)
        self.features = tuple(feature_from_config(f) for f in features)
        if not self.features:
            raise ValueError(f"{type(self).__name__} needs at least one feature")
        self.tasks = check_tasks(tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def extra_outputs(self) -> dict[str, str]:
        """Outputs of ``forward`` beyond the tasks, ``{name: kind}`` (``binary`` logits or ``regression`` values).

        They get no task loss of their own; the training module predicts them
        (``predict_step``) and a loss may read them (the DR imputation output).
        The default is none.
        """
        return {}

    @property
    def output_names(self) -> list[str]:
        """Every key ``forward`` returns: the task names, then ``extra_outputs()``."""
        return self.task_names + [name for name in self.extra_outputs() if name not in self.task_names]

    def output_kinds(self) -> dict[str, str]:
        """``{name: kind}`` for every key ``forward`` returns, in ``output_names`` order."""
        kinds = {t.name: t.kind for t in self.tasks}
        kinds.update({name: kind for name, kind in self.extra_outputs().items() if name not in kinds})
        return kinds

    def predictions(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What prediction and serving return for ``forward``'s ``outputs``: every output, in ``output_names``
        order, as float32 probabilities (binary: the sigmoid of the logit) or values (regression).

        ``MultiTaskLightningModule.predict_step`` and the ONNX / TorchScript exports both call this, so they
        always return the same outputs.
        """
        return {name: torch.sigmoid(outputs[name].float()) if kind == "binary" else outputs[name].float()
                for name, kind in self.output_kinds().items()}

    @abstractmethod
    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One ``(B,)`` tensor per name in ``output_names``: logits (binary) or values (regression)."""

    @abstractmethod
    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradient from every task (what PCGrad-style strategies act on)."""

    @abstractmethod
    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer shared by all tasks (GradNorm's ``W``); never the embedding tables."""

    def auxiliary_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """An architecture's own training signal (calibrator, penalty), added to the total loss.

        ``outputs`` is what ``forward`` returned for the batch and ``labels`` the
        batch's labels. ``None`` (the default) means no auxiliary loss.
        """
        return None

    def _towers(
        self,
        input_dim: int,
        tower_hidden: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        names: Iterable[str] | None = None,
    ) -> nn.ModuleDict:
        """One ``MLP(input_dim, tower_hidden, output_dim=1)`` per task (or per given name)."""
        return nn.ModuleDict(
            {
                name: MLP(input_dim, tower_hidden, output_dim=1, activation=activation, dropout=dropout)
                for name in (names if names is not None else self.task_names)
            }
        )


def squeeze_logit(x: Tensor) -> Tensor:
    """``(B, 1) -> (B,)``."""
    return x.squeeze(-1)


def parameters_of(*modules: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Flatten modules and parameter lists into one list without duplicates."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        params = m.parameters() if isinstance(m, nn.Module) else m
        for p in params:
            seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["MultiTaskArchitecture", "squeeze_logit", "parameters_of"]
