"""The contract every architecture fulfils.

An architecture is a plain ``nn.Module``: ``forward(features) -> {task: logits}``
with one ``(B,)`` tensor per task (binary tasks give logits, regression tasks
values), and ``(B, K)`` logits for a multi-class task of ``K`` classes (its
``Task.output_dim``: :meth:`MultiTaskArchitecture.output_width` gives each
output's width, :meth:`MultiTaskArchitecture._towers` builds towers that wide).
It may return further outputs that are not trained as tasks, declared
by ``extra_outputs()`` (ESMM's ``cvr``, which only the ``ctcvr`` product
supervises; ESCM's imputation tower); ``output_names`` lists everything
``forward`` returns, tasks first. It declares which parameters all tasks share (``shared_parameters``)
and which layer is the last shared one (``last_shared_parameters``, GradNorm's
``W``), and may add its own training signal through ``auxiliary_loss``.

:class:`MultiScenarioArchitecture` is the base of the multi-scenario
(multi-domain) architectures: it holds their domain set-up (the domain feature,
the number of domains, the input layer and where each feature sits in it).
Every concrete architecture is registered in ``mtl_lightning.registry.ARCHITECTURES``,
whose base class is :class:`MultiTaskArchitecture`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
import inspect
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import Configurable
from ..features import Feature, feature_from_config
from ..layers import MLP, FeatureEmbedding, check_feature_names, domain_ids, feature_slices, resolve_domain
from ..registry import ARCHITECTURES
from ..tasks import Task, check_tasks, corrected_logits


@ARCHITECTURES.base_class
class MultiTaskArchitecture(Configurable, nn.Module, metaclass=ABCMeta):
    """Base class: keeps ``features`` and ``tasks`` and defines the hooks the training module uses."""

    #: ``True`` for a multi-scenario (multi-domain) architecture: its constructor takes ``domain_feature=`` (the
    #: sparse feature holding the scenario id) and ``num_domains=``, and an instance keeps both under those names
    #: (:class:`MultiScenarioArchitecture` sets it and does both).
    #: Tests, benchmarks and per-scenario evaluation read this flag, never the constructor's parameter names.
    multi_scenario: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.multi_scenario:
            parameters = inspect.signature(cls.__init__).parameters
            missing = [name for name in ("domain_feature", "num_domains") if name not in parameters]
            if missing:
                raise TypeError(f"{cls.__name__} is multi-scenario (multi_scenario = True), so its __init__ must take "
                                f"domain_feature= and num_domains=; it lacks {missing}")

    #: Why this architecture cannot take an ``interaction=`` (``None``: it can). Set by an architecture that
    #: reads the input layer's fields or columns in a way a feature interaction's output does not keep.
    interaction_refused: ClassVar[str | None] = None

    def __init__(self, features: Sequence[Feature | dict], tasks: Sequence[Task | dict],
                 interaction: str | Mapping[str, Any] | None = None) -> None:
        nn.Module.__init__(self)
        self.features = tuple(feature_from_config(f) for f in features)
        if not self.features:
            raise ValueError(f"{type(self).__name__} needs at least one feature")
        self.tasks = check_tasks(tasks)
        if interaction is not None and self.interaction_refused:
            raise ValueError(f"{type(self).__name__} takes no interaction= (got {interaction!r}): "
                             f"{self.interaction_refused}")
        #: the ``interaction=`` setting (a registered name or a dict), applied by :meth:`input_layer`
        self.interaction = interaction

    def input_layer(self, field_view: bool = False) -> FeatureEmbedding:
        """The input layer every architecture reads: a :class:`FeatureEmbedding` over ``features``.

        It embeds sparse ids, pools or encodes sequences (``SequenceFeature(pooling=...)``:
        ``mean``/``sum``/``max`` or the encoders ``din``/``attention``/``transformer``)
        and passes dense values, then applies the architecture's
        ``interaction=`` (DCN-v2, SENet, MaskNet ...): its ``forward`` returns
        what the architecture's bottom reads, ``output_dim`` wide, and
        ``embed_and_interact`` also the embedded vector whose columns
        ``feature_slices`` locate. ``field_view=True`` is for an architecture
        that reads per-field vectors; an interaction's output is one flat
        vector, so the two do not combine.
        """
        if field_view and self.interaction is not None:
            raise ValueError(f"{type(self).__name__} reads per-field vectors of the input layer; a feature "
                             f"interaction ({self.interaction!r}) returns one flat vector per row")
        return FeatureEmbedding(self.features, field_view=field_view, interaction=self.interaction)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def extra_outputs(self) -> dict[str, str]:
        """Outputs of ``forward`` beyond the tasks, ``{name: kind}`` (``binary`` logits or ``regression`` values,
        one per row).

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

    def output_width(self, name: str) -> int:
        """How many numbers per row the output ``name`` has: ``Task.output_dim`` for a task (``K`` for a
        multi-class task of ``K`` classes, else 1), 1 for an extra output."""
        for task in self.tasks:
            if task.name == name:
                return task.output_dim
        return 1

    def predictions(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What prediction and serving return for ``forward``'s ``outputs``: every output, in ``output_names``
        order, as float32 probabilities (binary: the sigmoid of the logit; multiclass: the softmax of the
        ``(B, K)`` logits over the classes, ``(B, K)``) or values (regression).

        ``MultiTaskLightningModule.predict_step`` and the ONNX / TorchScript exports both call this, so they
        always return the same outputs. A task with ``negative_sampling_rate=r < 1`` gives the corrected
        probability ``sigmoid(logit + log r)`` (``tasks.corrected_logits``).
        """
        outputs = corrected_logits(self.tasks, outputs)
        return {name: _prediction(outputs[name].float(), kind) for name, kind in self.output_kinds().items()}

    @abstractmethod
    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One tensor per name in ``output_names``: ``(B,)`` logits (binary) or values (regression), ``(B, K)``
        logits (multiclass)."""

    @abstractmethod
    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradient from every task (what PCGrad-style strategies act on)."""

    @abstractmethod
    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer shared by all tasks (GradNorm's ``W``); never the embedding tables."""

    def derive_labels(self, labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The labels the training module trains and evaluates the tasks on, from a batch's ``labels``.

        The default returns them unchanged. A funnel architecture fills in what its tasks' labels imply
        (ESMM: CTCVR = click · conversion, so a conversion label given on clicked rows only is enough; AITM:
        a step after a 0 is 0), so it accepts labels in the shape logs have. Called on every training,
        validation and test batch, before the losses and the metrics.
        """
        return dict(labels)

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
        """One ``MLP(input_dim, tower_hidden, output_dim=self.output_width(name))`` per task (or per given name):
        one output, or ``K`` for a multi-class task (``squeeze_logit`` keeps those ``(B, K)``)."""
        return nn.ModuleDict(
            {
                name: MLP(input_dim, tower_hidden, output_dim=self.output_width(name), activation=activation,
                          dropout=dropout)
                for name in (names if names is not None else self.task_names)
            }
        )


class MultiScenarioArchitecture(MultiTaskArchitecture):
    """Base of the multi-scenario architectures: the domain set-up, once.

    ``__init__(features, tasks, domain_feature="domain", num_domains=None)``
    checks that ``domain_feature`` is a sparse feature and ``num_domains``
    (default: its ``vocab_size``) fits its vocabulary, keeps both under those
    names, and builds the input layer ``self.embedding`` (a flat
    ``FeatureEmbedding`` over every feature, the domain included) with
    ``self.feature_slices``, where each feature's vector sits in its embedded
    ``(B, D)`` vector (``self.embedding.embed_and_interact(x)`` returns that vector
    and, with an ``interaction=``, what the bottom reads). A subclass calls it first, then builds its own layers, and
    reads the batch's domain ids with :meth:`domain_ids` in ``forward``.
    Error messages name the subclass.
    """

    multi_scenario = True

    def __init__(
        self,
        features: Sequence[Feature | dict],
        tasks: Sequence[Task | dict],
        domain_feature: str = "domain",
        num_domains: int | None = None,
        interaction: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(features, tasks, interaction)
        self.domain_feature = domain_feature
        self.num_domains = resolve_domain(type(self).__name__, self.features, domain_feature, num_domains)
        self.embedding = self.input_layer()
        self.feature_slices = feature_slices(self.embedding)

    @property
    def domain_slice(self) -> slice:
        """Where the domain feature's embedding sits in the flat ``(B, D)`` input."""
        return self.feature_slices[self.domain_feature]

    def domain_and(self, argument: str, names: Sequence[str]) -> tuple[str, ...]:
        """The domain feature, then the features ``names`` (an argument such as ``scenario_features``) without it.

        Raises ``ValueError`` naming ``argument`` for a name that is not a feature.
        """
        named = check_feature_names(type(self).__name__, argument, names, self.features)
        return (self.domain_feature, *[n for n in named if n != self.domain_feature])

    def columns(self, names: Sequence[str]) -> Tensor:
        """The columns of the flat ``(B, D)`` input holding the features ``names``, in that order (int64)."""
        slices = list(dict.fromkeys((self.feature_slices[n].start, self.feature_slices[n].stop) for n in names))
        parts = [torch.arange(start, stop) for start, stop in slices]  # a group's members share one slice
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def domain_ids(self, features: Mapping[str, Tensor]) -> Tensor:
        """The batch's domain ids, int64 ``(B,)``; an id outside ``[0, num_domains)`` raises ``ValueError``."""
        return domain_ids(type(self).__name__, features, self.domain_feature, self.num_domains)


def _prediction(output: Tensor, kind: str) -> Tensor:
    """A probability (binary: sigmoid; multiclass: softmax over the last dimension) or the value (regression)."""
    if kind == "binary":
        return torch.sigmoid(output)
    if kind == "multiclass":
        return torch.softmax(output, dim=-1)
    return output


def squeeze_logit(x: Tensor) -> Tensor:
    """``(B, 1) -> (B,)``; a multi-class tower's ``(B, K)`` (``K >= 2``) stays as it is."""
    return x.squeeze(-1)


def parameters_of(*modules: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Flatten modules and parameter lists into one list without duplicates."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        params = m.parameters() if isinstance(m, nn.Module) else m
        for p in params:
            seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["MultiTaskArchitecture", "MultiScenarioArchitecture", "squeeze_logit", "parameters_of"]
