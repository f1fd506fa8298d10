"""The embedding layer (grouped pooling by embedding_bag, optional sparse gradients) against a reference written the obvious way."""

from __future__ import annotations

import pytest
import torch

from mtl_lightning.features import DenseFeature, SequenceFeature, SparseFeature
from mtl_lightning.layers import FeatureEmbedding

FEATURES = [
    SparseFeature("user", 7, 4),
    DenseFeature("price"),
    SparseFeature("item", 11, 4),
    SequenceFeature("hist_mean", 11, 5, 4, pooling="mean", shared_with="item"),
    SparseFeature("wide", 5, 6),  # another embedding dim: a second fused weight
    SequenceFeature("tags", 9, 3, 4, pooling="max"),
    SparseFeature("tag_now", 9, 4, shared_with="tags"),  # id 0 of a sequence-owned table is padding
    SequenceFeature("clicks", 5, 4, 6, pooling="sum", shared_with="wide"),
    DenseFeature("vec", dim=3),
    SparseFeature("city", 3, 4),
]


def batch(n: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {
        "user": torch.randint(0, 7, (n,), generator=g),
        "price": torch.randn(n, generator=g),
        "item": torch.randint(0, 11, (n,), generator=g),
        "hist_mean": torch.randint(0, 11, (n, 5), generator=g),
        "wide": torch.randint(0, 5, (n,), generator=g),
        "tags": torch.randint(0, 9, (n, 3), generator=g),
        "tag_now": torch.randint(0, 9, (n,), generator=g),
        "clicks": torch.randint(0, 5, (n, 4), generator=g),
        "vec": torch.randn(n, 3, generator=g),
        "city": torch.randint(0, 3, (n,), generator=g),
    }
    for name in ("hist_mean", "tags", "clicks"):
        x[name][0] = 0  # an all-padding row
    x["tag_now"][1] = 0
    return x


def reference(layer: FeatureEmbedding, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One table lookup per feature and masked pooling, as the layer was first written."""
    owner_of = {f.name: f.shared_with or f.name for f in FEATURES if not isinstance(f, DenseFeature)}
    padded = {f.name for f in FEATURES if isinstance(f, SequenceFeature) and not f.shared_with}
    parts = []
    for f in FEATURES:
        if isinstance(f, DenseFeature):
            parts.append(x[f.name].float().reshape(len(x[f.name]), -1))
            continue
        table = layer.tables[owner_of[f.name]].weight
        ids = x[f.name]
        emb = table[ids]
        if owner_of[f.name] in padded:
            emb = emb * (ids != 0).unsqueeze(-1)
        if isinstance(f, SparseFeature):
            parts.append(emb)
            continue
        mask = (ids != 0).unsqueeze(-1)
        if f.pooling == "max":
            pooled = emb.masked_fill(~mask, float("-inf")).amax(1)
            parts.append(torch.where(mask.any(1), pooled, torch.zeros_like(pooled)))
        else:
            summed = (emb * mask).sum(1)
            parts.append(summed if f.pooling == "sum" else summed / mask.sum(1).clamp(min=1))
    return parts


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_lookup_equals_per_feature_reference(sparse):
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES)
    layer.sparse = sparse
    assert sorted(layer.tables) == ["city", "item", "tags", "user", "wide"]
    assert layer.tables["item"].weight.shape == (11, 4) and layer.tables["wide"].weight.shape == (5, 6)
    x = batch()
    out = layer(x)
    expected = torch.cat(reference(layer, x), dim=-1)
    assert out.shape == (9, layer.output_dim) == (9, 4 + 1 + 4 + 4 + 6 + 4 + 4 + 6 + 3 + 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[0, 9:13], layer.tables["item"].weight[0] * 0)  # all-padding mean pools to 0
    torch.testing.assert_close(out[1, 23:27], torch.zeros(4))  # id 0 of the sequence-owned table

    # gradients: the same as the reference's, row by row; padding rows never receive any
    weights = torch.randn_like(out)
    params = layer.embedding_parameters()
    fused = torch.autograd.grad((out * weights).sum(), params)
    assert all(g.is_sparse == sparse for g in fused)
    ref = torch.autograd.grad((torch.cat(reference(layer, x), dim=-1) * weights).sum(), params)
    for name, got, want in zip(layer.tables, fused, ref):
        got = got.to_dense() if got.is_sparse else got
        torch.testing.assert_close(got, want)
        if name == "tags":  # id 0 of a sequence-owned table: padding, never trained
            assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert all(r.abs().sum() > 0 for r in ref)


def test_field_view_is_the_flat_view_per_field():
    torch.manual_seed(0)
    features = [f for f in FEATURES if getattr(f, "embedding_dim", 4) == 4]
    layer = FeatureEmbedding(features, field_view=True)
    x = batch()
    fields = layer(x, view="field")
    assert fields.shape == (9, len(features), 4)
    flat = layer(x)
    column = 0
    for i, f in enumerate(features):
        width = f.dim if isinstance(f, DenseFeature) else 4
        piece = flat[:, column : column + width]
        expected = layer.dense_projections[f.name](piece) if isinstance(f, DenseFeature) else piece
        torch.testing.assert_close(fields[:, i], expected)
        column += width


def test_sparse_flag_keeps_max_pooling_and_checkpoint_keys():
    layer = FeatureEmbedding(FEATURES)
    assert set(layer.state_dict()) == {f"tables.{n}.weight" for n in ("user", "item", "wide", "tags", "city")}
    restored = FeatureEmbedding(FEATURES)
    restored.load_state_dict(layer.state_dict())
    x = batch(seed=3)
    torch.testing.assert_close(restored(x), layer(x))
    restored.sparse = True
    torch.testing.assert_close(restored(x), layer(x))
