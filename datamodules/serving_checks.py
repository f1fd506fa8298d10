"""Validation of a preprocessing state (what ``datamodules.serving.Preprocessor`` serves) against its own features.

:func:`check_preprocessing_state` is importable from ``datamodules.serving`` too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from mtl_lightning.features import DenseFeature, Feature, SequenceFeature, SparseFeature, feature_from_config

PREPROCESSING_FORMAT = "mtl-lightning-preprocessing/1"

# the parts of a preprocessing state; a file has "format" and "fingerprint" besides
_PARTS = ("features", "encoders", "normalization", "fill_missing")
_FILE_KEYS = ("format", "fingerprint", *_PARTS)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INT64 = (-(2**63), 2**63 - 1)
_ENCODED = (SparseFeature, SequenceFeature)  # the features an encoder may encode (a list column: a sequence)


def check_preprocessing_state(state: Any, source: str = "the preprocessing state") -> None:
    """Validate a preprocessing state against its own features; ``ValueError`` naming ``source``, the key and the problem.

    Checked: the top-level keys (a file -- a state with ``"format"`` -- may hold
    only ``format``, ``fingerprint``, ``features``, ``encoders``,
    ``normalization`` and ``fill_missing``; a data module's state may hold
    others, which are ignored); every feature spec (known ``kind``, known
    fields of the right types, unique names); every encoder (of a sparse
    feature, or of a sequence feature for a list column; a ``vocabulary``:
    ``value_type`` ``string``/``int64``, ``values`` a list of distinct values
    of that type, one per id ``1 .. vocab_size - 1`` of its feature,
    ``min_freq`` >= 1, ``max_size`` None or >= the number of values,
    ``counts`` one non-negative integer per value; a ``hashing`` encoder:
    ``num_buckets == vocab_size``; a ``shared`` one: ``vocabulary_of`` another
    vocabulary or hashing encoder of the file, whose feature has the same
    ``vocab_size``); every normalisation (a dense feature,
    ``dim`` equal to the feature's, ``mean`` finite and ``std`` finite and > 0,
    ``dim`` numbers each); every fill (a dense feature of one value,
    ``fill`` a finite number or ``"mean"``, ``value`` finite and equal to a
    constant ``fill``, ``indicator`` a boolean). Keys are named by their JSON
    path (``encoders.city.values[3]``).
    """
    check = _Check(source)
    if not isinstance(state, Mapping):
        check.fail("(top level)", f"expected a JSON object, got {_kind(state)}")
    if "format" in state:
        if state["format"] != PREPROCESSING_FORMAT:
            check.fail("format", f"expected {PREPROCESSING_FORMAT!r}, got {state['format']!r}")
        unknown = sorted(str(k) for k in state if k not in _FILE_KEYS)
        if unknown:
            check.fail(unknown[0], f"unknown key (a preprocessing file holds {list(_FILE_KEYS)})")
        if "fingerprint" in state and not (isinstance(state["fingerprint"], str) and _SHA256.match(state["fingerprint"])):
            check.fail("fingerprint", f"expected 64 lowercase hex digits (SHA-256), got {state['fingerprint']!r}")
    if "features" not in state:
        check.fail("features", "missing (expected a file written by mtl_lightning.export or a ParquetDataModule's "
                               "state_dict())")
    features = check.features(state["features"])
    for part in ("encoders", "normalization", "fill_missing"):
        if part in state and not isinstance(state[part], Mapping):
            check.fail(part, f"expected an object of column -> state, got {_kind(state[part])}")
    check.encoders = state.get("encoders", {})
    for name, encoder in state.get("encoders", {}).items():
        check.encoder(f"encoders.{name}", name, encoder, features)
    for name, normalization in state.get("normalization", {}).items():
        check.normalization(f"normalization.{name}", name, normalization, features)
    for name, fill in state.get("fill_missing", {}).items():
        check.fill(f"fill_missing.{name}", name, fill, features)


def _kind(value: Any) -> str:
    """A value's JSON type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value!r})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_ANNOTATION_TYPES = {"int": _is_int, "str": lambda v: isinstance(v, str), "None": lambda v: v is None,
                     "bool": lambda v: isinstance(v, bool), "float": _is_number}


class _Check:
    """The checks of :func:`check_preprocessing_state`; ``fail`` raises the ``ValueError``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.encoders: Mapping[str, Any] = {}  # every encoder state of the file (a shared one names another)

    def fail(self, key: str, problem: str) -> None:
        raise ValueError(f"{self.source}: {key}: {problem}")

    def keys(self, key: str, value: Any, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        if not isinstance(value, Mapping):
            self.fail(key, f"expected an object, got {_kind(value)}")
        for name in required:
            if name not in value:
                self.fail(f"{key}.{name}", "missing")
        unknown = sorted(str(k) for k in value if k not in (*required, *optional))
        if unknown:
            self.fail(f"{key}.{unknown[0]}", f"unknown key (expected {sorted({*required, *optional})})")

    def features(self, configs: Any) -> dict[str, Feature]:
        if not isinstance(configs, list):
            self.fail("features", f"expected a list of feature specs, got {_kind(configs)}")
        features: dict[str, Feature] = {}
        for i, config in enumerate(configs):
            key = f"features[{i}]"
            if not isinstance(config, Mapping):
                self.fail(key, f"expected an object, got {_kind(config)}")
            try:
                feature = feature_from_config(dict(config))
            except TypeError as error:  # a field the spec does not have, or a missing one
                self.fail(key, str(error).replace(".__init__()", ""))
            except ValueError as error:
                self.fail(key, str(error))
            for field in dataclasses.fields(feature):
                annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
                accepted = [_ANNOTATION_TYPES.get(t.strip()) for t in annotation.split("|")]
                if all(accepted) and not any(ok(getattr(feature, field.name)) for ok in accepted):
                    self.fail(f"{key}.{field.name}", f"expected {field.type}, got {_kind(getattr(feature, field.name))}")
            if feature.name in features:
                self.fail(f"{key}.name", f"feature {feature.name!r} appears twice")
            features[feature.name] = feature
        return features

    def encoder(self, key: str, name: str, state: Any, features: Mapping[str, Feature]) -> None:
        feature = features.get(name)
        if not isinstance(feature, (SparseFeature, SequenceFeature)):
            self.fail(key, f"encodes column {name!r}, which is not a sparse or sequence feature of the file (those "
                           f"features: {sorted(n for n, f in features.items() if isinstance(f, _ENCODED))})")
        if not isinstance(state, Mapping):
            self.fail(key, f"expected an object, got {_kind(state)}")
        if state.get("kind") == "shared":
            self.keys(key, state, ("kind", "vocabulary_of"))
            owner = state["vocabulary_of"]
            theirs = self.encoders.get(owner) if isinstance(owner, str) else None
            if not isinstance(theirs, Mapping) or theirs.get("kind") not in ("vocabulary", "hashing"):
                self.fail(f"{key}.vocabulary_of", f"expected the name of another encoder of the file (a vocabulary or "
                                                  f"hashing), got {owner!r}")
            if not isinstance(features.get(owner), _ENCODED) or features[owner].vocab_size != feature.vocab_size:
                self.fail(f"{key}.vocabulary_of", f"feature {name!r} has vocab_size {feature.vocab_size}, but the "
                                                  f"vocabulary of {owner!r} it shares gives "
                                                  f"{getattr(features.get(owner), 'vocab_size', None)} ids: they "
                                                  "disagree")
            return
        if state.get("kind") == "hashing":
            self.keys(key, state, ("kind", "num_buckets"))
            buckets = state["num_buckets"]
            if not _is_int(buckets) or buckets < 2:
                self.fail(f"{key}.num_buckets", f"expected an integer >= 2, got {_kind(buckets)}")
            if buckets != feature.vocab_size:
                self.fail(f"{key}.num_buckets", f"{buckets} buckets, but feature {name!r} has vocab_size "
                                                f"{feature.vocab_size}: the encoder and the model disagree")
            return
        if state.get("kind") != "vocabulary":
            self.fail(f"{key}.kind", f"expected 'vocabulary', 'hashing' or 'shared', got {state.get('kind')!r}")
        self.keys(key, state, ("kind", "value_type", "values", "min_freq", "max_size"), ("counts",))
        value_type, values = state["value_type"], state["values"]
        if value_type not in ("string", "int64"):
            self.fail(f"{key}.value_type", f"expected 'string' or 'int64', got {value_type!r}")
        if not isinstance(values, list):
            self.fail(f"{key}.values", f"expected a list of {value_type} values (id i + 1 for the i-th), got "
                                       f"{_kind(values)}")
        for i, value in enumerate(values):
            good = (isinstance(value, str) if value_type == "string"
                    else _is_int(value) and _INT64[0] <= value <= _INT64[1])
            if not good:
                self.fail(f"{key}.values[{i}]", f"expected a {value_type} value, got {_kind(value)}")
        if len(set(values)) != len(values):
            seen: set = set()
            duplicate = next(v for v in values if v in seen or seen.add(v))
            self.fail(f"{key}.values", f"value {duplicate!r} appears more than once (one id per value)")
        if len(values) + 1 != feature.vocab_size:
            self.fail(f"{key}.values", f"{len(values)} values give {len(values) + 1} ids (with id 0 for unseen "
                                       f"values), but feature {name!r} has vocab_size {feature.vocab_size}: the "
                                       "vocabulary and the model disagree")
        min_freq, max_size = state["min_freq"], state["max_size"]
        if not _is_int(min_freq) or min_freq < 1:
            self.fail(f"{key}.min_freq", f"expected an integer >= 1, got {_kind(min_freq)}")
        if max_size is not None and (not _is_int(max_size) or max_size < 1):
            self.fail(f"{key}.max_size", f"expected null or an integer >= 1, got {_kind(max_size)}")
        if max_size is not None and len(values) > max_size:
            self.fail(f"{key}.values", f"{len(values)} values, more than max_size {max_size}")
        counts = state.get("counts")
        if counts is not None:
            if not isinstance(counts, list) or len(counts) != len(values):
                self.fail(f"{key}.counts", f"expected a list of {len(values)} counts (one per value), got "
                                           f"{_kind(counts)}" + (f" of {len(counts)}" if isinstance(counts, list) else ""))
            bad = next((i for i, c in enumerate(counts) if not _is_int(c) or c < 0), None)
            if bad is not None:
                self.fail(f"{key}.counts[{bad}]", f"expected an integer >= 0, got {_kind(counts[bad])}")

    def numbers(self, key: str, values: Any, dim: int) -> list[float]:
        if not isinstance(values, list) or len(values) != dim:
            self.fail(key, f"expected a list of {dim} number(s) (one per dimension), got {_kind(values)}"
                           + (f" of {len(values)}" if isinstance(values, list) else ""))
        for i, value in enumerate(values):
            if not _is_number(value):
                self.fail(f"{key}[{i}]", f"expected a number, got {_kind(value)}")
            if not math.isfinite(value):
                self.fail(f"{key}[{i}]", f"{value} is not finite: every served value of the column would be NaN")
        return values

    def normalization(self, key: str, name: str, state: Any, features: Mapping[str, Feature]) -> None:
        feature = features.get(name)
        if not isinstance(feature, DenseFeature):
            self.fail(key, f"normalises column {name!r}, which is not a dense feature of the file (dense features: "
                           f"{sorted(n for n, f in features.items() if isinstance(f, DenseFeature))})")
        self.keys(key, state, ("dim", "mean", "std"))
        if not _is_int(state["dim"]) or state["dim"] != feature.dim:
            self.fail(f"{key}.dim", f"expected {feature.dim} (feature {name!r} has dim {feature.dim}), got "
                                    f"{_kind(state['dim'])}")
        self.numbers(f"{key}.mean", state["mean"], feature.dim)
        for i, std in enumerate(self.numbers(f"{key}.std", state["std"], feature.dim)):
            if std <= 0:
                effect = "divides by zero (inf or NaN inputs)" if std == 0 else "flips the sign of the input"
                self.fail(f"{key}.std[{i}]", f"must be > 0, got {std}: (x - mean) / std {effect}")

    def fill(self, key: str, name: str, state: Any, features: Mapping[str, Feature]) -> None:
        feature = features.get(name)
        if not isinstance(feature, DenseFeature) or feature.dim != 1:
            self.fail(key, f"fills column {name!r}, which is not a dense feature of one value of the file (dense: "
                           f"{sorted(n for n, f in features.items() if isinstance(f, DenseFeature) and f.dim == 1)})")
        self.keys(key, state, ("fill", "value", "indicator"))
        fill, value = state["fill"], state["value"]
        if fill != "mean" and not (_is_number(fill) and math.isfinite(fill)):
            self.fail(f"{key}.fill", f"expected a finite number or 'mean', got {_kind(fill)}")
        if not _is_number(value) or not math.isfinite(value):
            self.fail(f"{key}.value", f"expected a finite number (the value filled in), got {_kind(value)}")
        if fill != "mean" and value != fill:
            self.fail(f"{key}.value", f"{value} differs from the constant fill {fill}")
        if not isinstance(state["indicator"], bool):
            self.fail(f"{key}.indicator", f"expected true or false, got {_kind(state['indicator'])}")


__all__ = ["check_preprocessing_state", "PREPROCESSING_FORMAT"]
