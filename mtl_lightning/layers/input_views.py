"""What an input layer returns, from its pieces: the flat and per-field views, the sequence encoders' outputs and
the feature interaction after them.

:class:`InputViews` is shared by ``FeatureEmbedding`` (tables held by PyTorch)
and ``TorchRecEmbedding`` (tables held by TorchRec collections): a layer
provides ``_parts(x)``, the spec-ordered pieces of one batch (``(None, (B, k,
d))`` for a run of sparse features looked up together, ``(group key, (B, w))``
for an encoded sequence group, ``(feature, (B, width))`` for anything else),
and the attributes ``field_dim``, ``dense_projections``,
``group_projections``, ``interaction``, ``embedded_dim``, ``output_dim`` and
``_slices``; the views, :meth:`embed_and_interact` and ``forward`` are written once here.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..features import DenseFeature, Feature


def interaction_view(spec: str | Mapping | None) -> str | None:
    """What the interaction ``spec`` names reads (``"flat"`` / ``"field"``), ``None`` without one."""
    if spec is None:
        return None
    from ..interactions import INTERACTIONS  # the interactions package builds on the layers

    if isinstance(spec, Mapping) and "class_path" in spec:
        return INTERACTIONS.resolve(spec["class_path"], "interaction").view
    name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, Mapping) else None
    if not isinstance(name, str):
        return None  # create_interaction explains what is wrong with the spec
    return INTERACTIONS.get(name).view


class InputViews:
    """Mixin of the input layers: views of ``_parts(x)``, the interaction, ``forward``."""

    field_dim: int | None
    embedded_dim: int
    output_dim: int
    interaction: Any
    _slices: dict[str, slice]

    def _build_interaction(self, spec: str | Mapping | None, view: str | None) -> None:
        """``self.interaction`` (``None`` without ``spec``) and ``self.output_dim``."""
        self.interaction = None
        if spec is not None:
            from ..interactions import create_interaction

            field = view == "field"
            self.interaction = create_interaction(
                spec, input_dim=self.num_fields * self.field_dim if field else self.embedded_dim,  # type: ignore[attr-defined]
                num_fields=self.num_fields, field_dim=self.field_dim)  # type: ignore[attr-defined]
        self.output_dim = self.embedded_dim if self.interaction is None else int(self.interaction.output_dim)

    def feature_slices(self) -> dict[str, slice]:
        """Where each feature's vector sits in the embedded flat ``(B, embedded_dim)`` vector.

        The members of a group of encoded sequences share their group's slice
        (the encoder's output).
        """
        return dict(self._slices)

    def _field(self, owner: Feature | str | None, part: Tensor) -> Tensor:
        """A piece of :meth:`_parts` as ``(B, k, field_dim)`` fields."""
        if owner is None:
            return part
        if isinstance(owner, str):  # an encoded group
            return (self.group_projections[owner](part) if owner in self.group_projections else part).unsqueeze(1)
        return (self.dense_projections[owner.name](part) if isinstance(owner, DenseFeature) else part).unsqueeze(1)

    def _view(self, parts: list[tuple[Feature | str | None, Tensor]], view: str) -> Tensor:
        if view == "flat":
            flat = [p.flatten(1) if f is None else p for f, p in parts]
            return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)  # (B, embedded_dim)
        if view == "field":
            if self.field_dim is None:
                raise ValueError("construct FeatureEmbedding(..., field_view=True) to use view='field'")
            fields = [self._field(f, p) for f, p in parts]
            return fields[0] if len(fields) == 1 else torch.cat(fields, dim=1)  # (B, F, d)
        raise ValueError(f"view must be 'flat' or 'field', got {view!r}")

    def _check_materialized(self) -> None:
        """Raise when the tables hold no values yet (the default: they always do)."""

    def embed_and_interact(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(embedded (B, embedded_dim), output (B, output_dim))`` from one lookup.

        ``embedded`` is the flat vector (:meth:`feature_slices` index it),
        ``output`` what ``forward`` returns: the interaction's output, or
        ``embedded`` itself without an interaction.
        """
        self._check_materialized()
        parts = self._parts(x)
        embedded = self._view(parts, "flat")
        if self.interaction is None:
            return embedded, embedded
        read = embedded if self.interaction.view == "flat" else self._view(parts, "field")
        return embedded, self.interaction(read)

    def forward(self, x: Mapping[str, Tensor], view: str = "flat") -> Tensor:
        """``view="flat"``: ``(B, output_dim)`` (after the interaction, if any); ``"field"``: ``(B, F, d)``."""
        self._check_materialized()
        if self.interaction is not None:
            if view != "flat":
                raise ValueError(f"this layer ends in the interaction {type(self.interaction).__name__}, whose "
                                 "output is one flat vector per row; there is no per-field view of it")
            return self.embed_and_interact(x)[1]
        return self._view(self._parts(x), view)


