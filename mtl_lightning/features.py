"""Feature specifications: what a column is and how it is embedded.

Specs are frozen dataclasses so they can be hashed, compared and written into
checkpoints as plain dictionaries (see :func:`feature_to_config`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Union

#: poolings that reduce a sequence on its own (``layers.pooling``)
POOLINGS = ("mean", "sum", "max")
#: sequence encoders that read the sequence with the candidate as query (``layers.sequence``)
ENCODER_POOLINGS = ("din", "attention", "transformer")


@dataclass(frozen=True)
class SparseFeature:
    """A categorical column of int64 ids in ``[0, vocab_size)``.

    ``shared_with`` names another sparse or sequence feature whose embedding
    table this feature reuses (for example ``hist_item`` sharing ``item_id``).
    """

    name: str
    vocab_size: int
    embedding_dim: int = 16
    shared_with: str | None = None

    def __post_init__(self) -> None:
        _check_name(self)
        if int(self.vocab_size) < 1:
            raise ValueError(f"SparseFeature {self.name!r}: vocab_size must be >= 1, got {self.vocab_size}")
        if int(self.embedding_dim) < 1:
            raise ValueError(f"SparseFeature {self.name!r}: embedding_dim must be >= 1, got {self.embedding_dim}")


@dataclass(frozen=True)
class DenseFeature:
    """A float32 column (``dim == 1``) or a fixed-size float vector (``dim > 1``)."""

    name: str
    dim: int = 1

    def __post_init__(self) -> None:
        _check_name(self)
        if int(self.dim) < 1:
            raise ValueError(f"DenseFeature {self.name!r}: dim must be >= 1, got {self.dim}")


@dataclass(frozen=True)
class SequenceFeature:
    """A variable-length list of int64 ids padded to ``[B, max_len]``; id 0 is padding.

    ``pooling`` says how the sequence becomes one vector per row:

    * ``mean``, ``sum`` or ``max`` over its non-padding positions (an
      all-padding row pools to zeros);
    * a sequence encoder that reads it with the candidate as query:
      ``din`` (DIN's activation unit), ``attention`` (scaled dot-product target
      attention) or ``transformer`` (BST); see ``mtl_lightning.layers.sequence``.
      ``query`` names the feature(s) whose vectors form the query (the
      candidate: ``hist_item`` attends with ``item_id``); several names are
      concatenated in the order given. ``pooling_options`` are the encoder's
      own keyword arguments (``attention_hidden``, ``num_heads`` ...).

    Sequences of the same clicks (``hist_item``, ``hist_cat``) can share one
    encoder: give them the same ``group``. A group is encoded once, over the
    concatenation of its members' per-position embeddings (spec order), with
    the members' queries concatenated in the same order; its members must agree
    on ``pooling``, ``pooling_options`` and ``max_len``.
    """

    name: str
    vocab_size: int
    max_len: int
    embedding_dim: int = 16
    pooling: str = "mean"
    shared_with: str | None = None
    query: str | tuple[str, ...] | None = None
    group: str | None = None
    pooling_options: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        _check_name(self)
        if int(self.vocab_size) < 2:
            raise ValueError(
                f"SequenceFeature {self.name!r}: vocab_size must be >= 2 (id 0 is padding), got {self.vocab_size}"
            )
        if int(self.max_len) < 1:
            raise ValueError(f"SequenceFeature {self.name!r}: max_len must be >= 1, got {self.max_len}")
        if self.pooling not in POOLINGS + ENCODER_POOLINGS:
            raise ValueError(f"SequenceFeature {self.name!r}: pooling must be one of {POOLINGS + ENCODER_POOLINGS}, "
                             f"got {self.pooling!r}")
        query = (self.query,) if isinstance(self.query, str) else self.query
        if query is not None:
            query = tuple(query)
            if not query or not all(isinstance(q, str) and q for q in query):
                raise ValueError(f"SequenceFeature {self.name!r}: query must name one or more features, got "
                                 f"{self.query!r}")
        object.__setattr__(self, "query", query)
        options = self.pooling_options
        if options is not None:
            items = options.items() if isinstance(options, Mapping) else options
            try:
                options = tuple(sorted((str(k), _frozen(v)) for k, v in items))
            except (TypeError, ValueError):
                raise TypeError(f"SequenceFeature {self.name!r}: pooling_options must be a dict of option names, "
                                f"got {self.pooling_options!r}") from None
            object.__setattr__(self, "pooling_options", options or None)
        if self.pooling in ENCODER_POOLINGS:
            if not self.query:
                raise ValueError(f"SequenceFeature {self.name!r}: pooling={self.pooling!r} reads the sequence with "
                                 "the candidate as query; name the candidate feature(s) with query=")
        else:
            given = [k for k in ("query", "group", "pooling_options") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"SequenceFeature {self.name!r}: {given} apply to the sequence encoders "
                                 f"{ENCODER_POOLINGS}, not to pooling={self.pooling!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ValueError(f"SequenceFeature {self.name!r}: group must be a non-empty string, got {self.group!r}")

    @property
    def encoded(self) -> bool:
        """Whether a sequence encoder (``din``, ``attention``, ``transformer``) reads this sequence."""
        return self.pooling in ENCODER_POOLINGS

    @property
    def encoder_key(self) -> str:
        """The encoder this sequence belongs to: its ``group``, or its own name."""
        return self.group or self.name

    def options(self) -> dict[str, Any]:
        """``pooling_options`` as a dict of keyword arguments."""
        return {k: _thawed(v) for k, v in self.pooling_options or ()}


def _frozen(value: Any) -> Any:
    """Lists become tuples (hashable, so the spec stays a frozen, hashable dataclass)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        raise TypeError("nested dicts are not options")
    return value


def _thawed(value: Any) -> Any:
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


Feature = Union[SparseFeature, DenseFeature, SequenceFeature]
_KINDS = {"sparse": SparseFeature, "dense": DenseFeature, "sequence": SequenceFeature}


def _check_name(feature: Any) -> None:
    if not isinstance(feature.name, str) or not feature.name:
        raise ValueError(f"{type(feature).__name__}: name must be a non-empty string, got {feature.name!r}")


#: fields written by feature_to_config only when they differ from their default (configs and checkpoints of
#: features without them stay as they were, and so do the fingerprints of exported preprocessing files)
_OPTIONAL = ("query", "group", "pooling_options")


def feature_to_config(feature: Feature) -> dict[str, Any]:
    """A plain dict (``{"kind": "sparse", "name": ..., ...}``) safe for checkpoints and YAML."""
    kind = {cls: kind for kind, cls in _KINDS.items()}[type(feature)]
    config = {"kind": kind, **asdict(feature)}
    defaults = {f.name: f.default for f in fields(feature)}
    for key in _OPTIONAL:
        if key in config and config[key] == defaults[key]:
            del config[key]
    if config.get("query") is not None:
        config["query"] = list(config["query"])
    if config.get("pooling_options") is not None:
        config["pooling_options"] = feature.options()  # type: ignore[union-attr]
    return config


def feature_from_config(config: dict[str, Any] | Feature) -> Feature:
    """Inverse of :func:`feature_to_config`; feature objects pass through unchanged."""
    if isinstance(config, (SparseFeature, DenseFeature, SequenceFeature)):
        return config
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"feature config needs 'kind' in {sorted(_KINDS)}, got {kind!r} in {config}")
    return _KINDS[kind](**config)
