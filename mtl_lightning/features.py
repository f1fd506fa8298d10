"""Feature specifications: what a column is and how it is embedded.

Specs are frozen dataclasses so they can be hashed, compared and written into
checkpoints as plain dictionaries (see :func:`feature_to_config`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Union

_POOLINGS = ("mean", "sum", "max")


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

    The sequence is pooled over its non-padding positions with ``pooling``
    (``mean``, ``sum`` or ``max``); an all-padding row pools to zeros.
    """

    name: str
    vocab_size: int
    max_len: int
    embedding_dim: int = 16
    pooling: str = "mean"
    shared_with: str | None = None

    def __post_init__(self) -> None:
        _check_name(self)
        if int(self.vocab_size) < 2:
            raise ValueError(
                f"SequenceFeature {self.name!r}: vocab_size must be >= 2 (id 0 is padding), got {self.vocab_size}"
            )
        if int(self.max_len) < 1:
            raise ValueError(f"SequenceFeature {self.name!r}: max_len must be >= 1, got {self.max_len}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"SequenceFeature {self.name!r}: pooling must be one of {_POOLINGS}, got {self.pooling!r}")


Feature = Union[SparseFeature, DenseFeature, SequenceFeature]
_KINDS = {"sparse": SparseFeature, "dense": DenseFeature, "sequence": SequenceFeature}


def _check_name(feature: Any) -> None:
    if not isinstance(feature.name, str) or not feature.name:
        raise ValueError(f"{type(feature).__name__}: name must be a non-empty string, got {feature.name!r}")


def feature_to_config(feature: Feature) -> dict[str, Any]:
    """A plain dict (``{"kind": "sparse", "name": ..., ...}``) safe for checkpoints and YAML."""
    kind = {cls: kind for kind, cls in _KINDS.items()}[type(feature)]
    return {"kind": kind, **asdict(feature)}


def feature_from_config(config: dict[str, Any] | Feature) -> Feature:
    """Inverse of :func:`feature_to_config`; feature objects pass through unchanged."""
    if isinstance(config, (SparseFeature, DenseFeature, SequenceFeature)):
        return config
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"feature config needs 'kind' in {sorted(_KINDS)}, got {kind!r} in {config}")
    return _KINDS[kind](**config)
