"""The sequence encoders of an input layer: one per group of aligned behaviour sequences.

A ``SequenceFeature`` whose ``pooling`` is an encoder (``din``, ``attention``,
``transformer``) is not pooled on its own: the sequences of one ``group`` (or a
sequence alone, its name standing for the group) are read together by ONE
encoder of :mod:`mtl_lightning.layers.sequence`:

* keys ``(B, L, sum d_m)``: the members' per-position embeddings concatenated in
  spec order (the same clicks: ``hist_item``, ``hist_cat``, ``hist_shop``);
* mask ``(B, L)``: a position is valid where ANY member has a non-padding id, so
  a click whose category is unknown (id 0) still counts; a member's key is zero
  at its own padding positions (a table's row 0 is not always a zero row: a
  sequence sharing a sparse feature's block reads that feature's id-0 row there);
* query ``(B, sum q)``: the vectors of every member's ``query`` features (sparse
  embeddings, dense values or mean/sum/max-pooled sequences, as the input layer
  computes them for their own fields), concatenated member by member.

The encoder's ``(B, output_dim)`` output takes the group's place in the input
layer (where its first member sits in spec order). The encoders are parameters
of the layer holding them, so they are shared parameters of every architecture.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import Feature, SequenceFeature
from .sequence import sequence_encoder


def encoder_groups(features: Sequence[Feature]) -> dict[str, tuple[SequenceFeature, ...]]:
    """``{group key: members}`` of the encoded sequences, in spec order; the members' settings are checked."""
    groups: dict[str, list[SequenceFeature]] = {}
    for f in features:
        if isinstance(f, SequenceFeature) and f.encoded:
            groups.setdefault(f.encoder_key, []).append(f)
    names = {f.name for f in features}
    for key, members in groups.items():
        if key in names and (len(members) > 1 or members[0].name != key):
            raise ValueError(f"sequence group {key!r} has the name of a feature; give the group another name")
        first = members[0]
        for m in members[1:]:
            for setting in ("pooling", "pooling_options", "max_len"):
                if getattr(m, setting) != getattr(first, setting):
                    raise ValueError(
                        f"sequence group {key!r}: {first.name!r} and {m.name!r} differ in {setting} "
                        f"({getattr(first, setting)!r} vs {getattr(m, setting)!r}); a group is read by one encoder "
                        "over aligned positions, so its members must agree")
    return {key: tuple(members) for key, members in groups.items()}


class SequenceEncoders(nn.ModuleDict):
    """One encoder per group key (``features`` as the input layer holds them); empty without encoded sequences.

    ``widths`` gives the width of every feature's own vector in the input layer
    (what a query reads). A query must name a feature of the layer that is not
    itself an encoded sequence.
    """

    def __init__(self, features: Sequence[Feature], widths: Mapping[str, int]) -> None:
        super().__init__()
        self.groups = encoder_groups(features)
        by_name = {f.name: f for f in features}
        self.queries: dict[str, tuple[str, ...]] = {}
        for key, members in self.groups.items():
            queries: list[str] = []
            for m in members:
                for q in m.query or ():
                    if q not in by_name:
                        raise ValueError(f"SequenceFeature {m.name!r}: query {q!r} is not a feature; features are "
                                         f"{sorted(by_name)}")
                    if isinstance(by_name[q], SequenceFeature) and by_name[q].encoded:
                        raise ValueError(f"SequenceFeature {m.name!r}: query {q!r} is itself read by a sequence "
                                         "encoder; a query is a candidate feature (sparse, dense or pooled sequence)")
                    queries.append(q)
            self.queries[key] = tuple(queries)
            first = members[0]
            self[key] = sequence_encoder(
                first.pooling, key_dim=sum(m.embedding_dim for m in members),
                query_dim=sum(widths[q] for q in queries), max_len=first.max_len, **first.options())

    def output_dim(self, key: str) -> int:
        return int(self[key].output_dim)

    def encode(self, key: str, sequences: Sequence[tuple[Tensor, Tensor]], queries: Sequence[Tensor]) -> Tensor:
        """Group ``key`` from its members' ``(embeddings (B, L, d_m), ids (B, L))`` and its query vectors."""
        valid = [ids != 0 for _, ids in sequences]  # (B, L) each
        keys = torch.cat([emb * v.unsqueeze(-1).to(emb.dtype) for (emb, _), v in zip(sequences, valid)], dim=-1)
        mask = valid[0]
        for v in valid[1:]:
            mask = mask | v
        query = torch.cat([q.to(keys.dtype) for q in queries], dim=-1) if len(queries) > 1 else queries[0]
        return self[key](keys, mask, query.to(keys.dtype))  # (B, output_dim)


__all__ = ["SequenceEncoders", "encoder_groups"]
