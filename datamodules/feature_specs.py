"""Changing the inferred feature specs one field at a time: ``feature_overrides``.

A data module infers every feature spec from the data (``datamodules.inference``)
and its categorical encoders (``datamodules.preprocessing``). To read one
column differently -- a behaviour history through DIN with the candidate as
query, a group of aligned histories, a wider embedding -- a user names only
that feature and the fields to change::

    ParquetDataModule(..., feature_overrides={
        "hist_item": {"pooling": "din", "query": "item_id", "group": "hist"},
        "user_id": {"embedding_dim": 32},
    })

or in YAML under ``data.feature_overrides`` (the CLI links ``data.features``
into the model, so the architecture is built with the changed specs). The
overrides are applied after inference and encoding, every time the data module
prepares its features, so they hold for given specs too. A name that is not a
feature, a field the feature's kind does not have (``name`` and ``kind`` are
not fields to change), the ``vocab_size`` of a column whose encoder sets it, or
a value the spec refuses is a ``ValueError`` naming the key
(``feature_overrides.hist_item.pooling``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping, Sequence

from mtl_lightning.features import Feature

_NOT_OVERRIDABLE = ("name", "kind")


def check_feature_overrides(overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """``overrides`` as ``{feature: {field: value}}`` plain dicts, their shape checked (the fields are checked
    against each feature by :func:`apply_feature_overrides`)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"feature_overrides must map feature names to {{field: value}}, got "
                        f"{type(overrides).__name__}")
    checked: dict[str, dict[str, Any]] = {}
    for name, fields in overrides.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"feature_overrides: keys must be feature names, got {name!r}")
        if not isinstance(fields, Mapping) or not fields:
            raise TypeError(f"feature_overrides.{name}: expected a non-empty mapping of spec fields to new values "
                            f"(e.g. {{'pooling': 'din', 'query': 'item_id'}}), got {fields!r}")
        for field in fields:
            if not isinstance(field, str):
                raise TypeError(f"feature_overrides.{name}: field names must be strings, got {field!r}")
            if field in _NOT_OVERRIDABLE:
                raise ValueError(f"feature_overrides.{name}.{field}: a feature's {field} cannot be overridden; "
                                 "give the feature's whole spec in features= instead")
        checked[name] = dict(fields)
    return checked


def apply_feature_overrides(features: Sequence[Feature], overrides: Mapping[str, Mapping[str, Any]],
                            encoded: Collection[str] = ()) -> list[Feature]:
    """``features`` with the fields of ``overrides`` replaced (``dataclasses.replace``); see the module docstring.

    ``encoded``: the columns whose ``vocab_size`` their categorical encoder sets (not to be overridden).
    """
    if not overrides:
        return list(features)
    by_name = {f.name: f for f in features}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise ValueError(f"feature_overrides.{unknown[0]}: no such feature; the features are {sorted(by_name)}"
                         + (f" (unknown: {unknown})" if len(unknown) > 1 else ""))
    out = []
    for feature in features:
        fields = overrides.get(feature.name)
        if fields is None:
            out.append(feature)
            continue
        allowed = [f.name for f in dataclasses.fields(feature) if f.name not in _NOT_OVERRIDABLE]
        for field in fields:
            if field not in allowed:
                raise ValueError(f"feature_overrides.{feature.name}.{field}: {type(feature).__name__} has no field "
                                 f"{field!r}; its fields are {allowed}")
        if "vocab_size" in fields and feature.name in encoded:
            raise ValueError(f"feature_overrides.{feature.name}.vocab_size: the vocabulary size of {feature.name!r} "
                             "is its categorical encoder's number of ids; change the encoder's spec (categorical=) "
                             "instead")
        try:
            out.append(dataclasses.replace(feature, **fields))
        except (TypeError, ValueError) as error:
            raise type(error)(f"feature_overrides.{feature.name}: {error}") from None
    return out


__all__ = ["check_feature_overrides", "apply_feature_overrides"]
