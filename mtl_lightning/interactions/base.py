"""The interface of a feature interaction, and its registry ``INTERACTIONS``.

An interaction sits between an architecture's input layer (``FeatureEmbedding``)
and the architecture's bottom (experts, bottom MLP ...): it reads the
embedded features and returns the vector the bottom reads instead, crossing
the features on the way (DCN-v2 cross layers, SENet field re-weighting,
MaskNet blocks ...). It is an ``nn.Module`` whose parameters are parameters of
the architecture that holds it.

The contract (:class:`Interaction`):

* ``view`` (class attribute) says what ``forward`` reads: ``"flat"``, the
  input layer's ``(B, input_dim)`` output, or ``"field"``, its per-field
  ``(B, num_fields, field_dim)`` output (``FeatureEmbedding(...,
  field_view=True)(x, view="field")``);
* ``__init__(input_dim, num_fields=1, field_dim=None, **options)``: the input
  layer's shape (``input_dim`` the flat width, ``num_fields`` the number of
  features, ``field_dim`` their common width, required for ``"field"``), then
  the interaction's own keyword options;
* ``output_dim``: the width of what ``forward`` returns (``input_dim`` unless
  the subclass sets another);
* ``forward(x) -> (B, output_dim)``, always flat.

A new interaction is one file in ``mtl_lightning/interactions`` with a
subclass carrying ``@register_interaction("name")``; :func:`create_interaction`
builds one from a name, a ``{"name": ..., **options}`` dict or a
``{"class_path": ..., "init_args": {...}}`` dict whose class path must name a
subclass of :class:`Interaction` (checked before anything is called).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from torch import Tensor, nn

from ..registry import Registry

InteractionType = TypeVar("InteractionType", bound="type[Interaction]")

#: Every registered interaction by name (a :class:`~mtl_lightning.registry.Registry`), filled by
#: :func:`register_interaction` as each file of ``mtl_lightning.interactions`` is imported.
INTERACTIONS: Registry[Interaction] = Registry("interaction")

VIEWS = ("flat", "field")
SHAPE_ARGUMENTS = ("input_dim", "num_fields", "field_dim")


def register_interaction(name: str) -> Callable[[InteractionType], InteractionType]:
    """Class decorator registering an :class:`Interaction` subclass under ``name`` (``INTERACTIONS.register``)."""
    return INTERACTIONS.register(name)


@INTERACTIONS.base_class
class Interaction(nn.Module, metaclass=ABCMeta):
    """Base class: ``forward(embedded input) -> (B, output_dim)``; see the module docstring for the contract."""

    #: what ``forward`` reads: ``"flat"`` ``(B, input_dim)`` or ``"field"`` ``(B, num_fields, field_dim)``
    view: ClassVar[str] = "flat"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.view not in VIEWS:
            raise TypeError(f"{cls.__name__}.view must be one of {VIEWS}, got {cls.view!r}")

    def __init__(self, input_dim: int, num_fields: int = 1, field_dim: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if int(input_dim) < 1 or int(num_fields) < 1:
            raise ValueError(f"{name}: input_dim and num_fields must be >= 1, got {input_dim} and {num_fields}")
        if self.view == "field":
            if field_dim is None or int(field_dim) * int(num_fields) != int(input_dim):
                raise ValueError(f"{name} reads per-field vectors: it needs field_dim with num_fields * field_dim "
                                 f"== input_dim, got num_fields={num_fields}, field_dim={field_dim}, "
                                 f"input_dim={input_dim}")
        self.input_dim = int(input_dim)
        self.num_fields = int(num_fields)
        self.field_dim = None if field_dim is None else int(field_dim)
        self.output_dim = self.input_dim

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``(B, input_dim)`` (``view="flat"``) or ``(B, num_fields, field_dim)`` (``"field"``) -> ``(B, output_dim)``."""


def create_interaction(
    spec: str | Mapping[str, Any] | None,
    input_dim: int,
    num_fields: int = 1,
    field_dim: int | None = None,
    key: str = "interaction",
) -> Interaction | None:
    """The interaction ``spec`` names, built for the input layer's shape; ``None`` for ``spec=None``.

    ``spec`` is a registered name, ``{"name": ..., **options}`` or
    ``{"class_path": ..., "init_args": {...}}``; the class path is resolved by
    ``INTERACTIONS.resolve`` (a registered name or the import path of an
    :class:`Interaction` subclass, checked before anything is called). The shape
    arguments come from the caller, never from ``spec``. ``key`` names the
    setting in error messages.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        cls, options = INTERACTIONS.get(spec), {}
    elif isinstance(spec, Mapping):
        if "class_path" in spec:
            unknown = sorted(set(spec) - {"class_path", "init_args"})
            if unknown:
                raise ValueError(f"{key}: unknown entries {unknown} next to 'class_path'; only 'class_path' and "
                                 "'init_args'")
            cls, options = INTERACTIONS.resolve(spec["class_path"], key), spec.get("init_args") or {}
        elif "name" in spec:
            cls, options = INTERACTIONS.get(spec["name"]), {k: v for k, v in spec.items() if k != "name"}
        else:
            raise ValueError(f"{key}: a dict needs 'name' (one of {INTERACTIONS.names()}) or 'class_path'; "
                             f"got {dict(spec)}")
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise TypeError(f"{key}: the options of {cls.__name__} must be a dict of argument names, got {options!r}")
    else:
        raise TypeError(f"{key} must be a name or a dict, got {type(spec).__name__}")
    given = sorted(set(options) & set(SHAPE_ARGUMENTS))
    if given:
        raise ValueError(f"{key}: {given} are set from the input layer, not in the options of {cls.__name__}")
    return cls(input_dim=input_dim, num_fields=num_fields, field_dim=field_dim, **options)


__all__ = ["Interaction", "INTERACTIONS", "register_interaction", "create_interaction"]
