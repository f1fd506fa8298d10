"""The input layer with sequence encoders and interactions: what FeatureEmbedding computes, against hand-built parts."""

from __future__ import annotations

import pytest
import torch

from mtl_lightning import DenseFeature, SequenceFeature, SparseFeature
from mtl_lightning.features import feature_from_config, feature_to_config
from mtl_lightning.layers import FeatureEmbedding
from mtl_lightning.layers.sequence import DINAttention

D = 4
ITEM = SparseFeature("item", 10, D)
CAT = SparseFeature("cat", 5, D)
HIST = SequenceFeature("hist_item", 10, max_len=3, embedding_dim=D, shared_with="item", pooling="din", query="item",
                       group="clicks", pooling_options={"attention_hidden": [6]})
HIST_CAT = SequenceFeature("hist_cat", 5, max_len=3, embedding_dim=D, pooling="din", query="cat", group="clicks",
                           pooling_options={"attention_hidden": [6]})
FEATURES = [SparseFeature("user", 7, D), ITEM, DenseFeature("price"), CAT, HIST, HIST_CAT]


def batch() -> dict[str, torch.Tensor]:
    return {
        "user": torch.tensor([1, 2, 3]), "item": torch.tensor([4, 0, 9]), "price": torch.tensor([0.5, -1.0, 2.0]),
        "cat": torch.tensor([1, 2, 4]),
        "hist_item": torch.tensor([[4, 5, 0], [0, 0, 0], [7, 8, 9]]),  # row 1: no history at all
        "hist_cat": torch.tensor([[1, 0, 0], [0, 0, 0], [3, 3, 4]]),  # row 0: the second click has no category
    }


def test_a_group_is_one_din_over_its_members_concatenated_with_their_queries_concatenated():
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES)
    x = batch()
    # layout: user, item, price, cat, then the group at hist_item's place (hist_cat adds nothing of its own)
    assert layer.embedded_dim == D + D + 1 + D + 2 * D and layer.num_fields == 5
    slices = layer.feature_slices()
    assert slices["hist_item"] == slice(13, 21) == slices["hist_cat"]
    encoder = layer.encoders["clicks"]
    assert isinstance(encoder, DINAttention) and (encoder.key_dim, encoder.query_dim) == (2 * D, 2 * D)

    item_table, cat_table = layer.table_weight("item"), layer.table_weight("hist_cat")
    keys = torch.cat([item_table[x["hist_item"]] * (x["hist_item"] != 0).unsqueeze(-1),
                      cat_table[x["hist_cat"]] * (x["hist_cat"] != 0).unsqueeze(-1)], dim=-1)  # (B, L, 2D)
    mask = (x["hist_item"] != 0) | (x["hist_cat"] != 0)  # row 0's second click counts through its item
    query = torch.cat([item_table[x["item"]], layer.table_weight("cat")[x["cat"]]], dim=-1)
    expected = encoder(keys, mask, query)
    out = layer(x)
    torch.testing.assert_close(out[:, 13:21], expected)
    torch.testing.assert_close(out[:, :4], layer.table_weight("user")[x["user"]])
    assert torch.equal(out[1, 13:21], torch.zeros(2 * D))  # no history: exact zeros


def test_padding_gets_no_weight_and_no_gradient():
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES)
    x = batch()
    out = layer(x)[:, 13:21]
    # the sequence-owned table's padding row (hist_cat id 0) gets no gradient; the item block's id-0 row (a real
    # item, read by row 1's candidate) gets gradient from the candidate only, never from a padded history position
    out.sum().backward()
    assert torch.equal(layer.table_grad("hist_cat")[0], torch.zeros(D))
    layer.zero_grad()
    candidate_free = {**x, "item": torch.tensor([4, 5, 9])}  # no candidate reads item 0 now
    layer(candidate_free)[:, 13:21].sum().backward()
    assert torch.equal(layer.table_grad("item")[0], torch.zeros(D))
    # changing the item block's row 0, read only at padded history positions now, changes nothing
    before = layer(candidate_free)[:, 13:21].detach()
    with torch.no_grad():
        layer.table_weight("item")[0].add_(5.0)
    torch.testing.assert_close(layer(candidate_free)[:, 13:21], before)


def test_field_view_makes_a_group_one_field_and_senet_reads_it():
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES, interaction={"name": "senet", "reduction_ratio": 2})
    assert layer.field_dim == D and set(layer.group_projections) == {"clicks"}  # 2D -> D, bias-free
    assert layer.output_dim == 5 * D and layer.embedded_dim == 21
    embedded, out = layer.embed_and_interact(batch())
    assert embedded.shape == (3, 21) and out.shape == (3, 5 * D)
    torch.testing.assert_close(layer(batch()), out)
    with pytest.raises(ValueError, match="no per-field view"):
        layer(batch(), view="field")


def test_specs_round_trip_and_bad_specs_are_refused():
    for f in (HIST, HIST_CAT):
        assert feature_from_config(feature_to_config(f)) == f
    assert "query" not in feature_to_config(SequenceFeature("h", 5, 3))  # plain specs are written as before
    with pytest.raises(ValueError, match="name the candidate feature"):
        SequenceFeature("h", 5, 3, pooling="din")
    with pytest.raises(ValueError, match=r"\['query'\] apply to the sequence encoders"):
        SequenceFeature("h", 5, 3, query="item")
    with pytest.raises(ValueError, match="pooling must be one of"):
        SequenceFeature("h", 5, 3, pooling="lstm", query="item")
    with pytest.raises(ValueError, match="query 'nope' is not a feature"):
        FeatureEmbedding([ITEM, SequenceFeature("h", 10, 3, D, pooling="attention", query="nope")])
    with pytest.raises(ValueError, match="query 'h' is itself read by a sequence encoder"):
        FeatureEmbedding([ITEM, SequenceFeature("h", 10, 3, D, pooling="attention", query="h")])
    with pytest.raises(ValueError, match="differ in max_len"):
        FeatureEmbedding([ITEM, CAT, HIST, SequenceFeature("hist_cat", 5, 4, D, pooling="din", query="cat",
                                                           group="clicks", pooling_options={"attention_hidden": [6]})])
    with pytest.raises(TypeError, match="takes no option"):
        FeatureEmbedding([ITEM, SequenceFeature("h", 10, 3, D, pooling="din", query="item",
                                                pooling_options={"heads": 2})])
    with pytest.raises(ValueError, match="did you mean 'dcn_v2'"):
        FeatureEmbedding([ITEM], interaction="dcn_v3")


@pytest.mark.parametrize("pooling", ["attention", "transformer"])
def test_other_encoders_read_the_candidate(pooling):
    torch.manual_seed(0)
    features = [ITEM, SequenceFeature("hist_item", 10, 3, D, shared_with="item", pooling=pooling, query="item")]
    layer = FeatureEmbedding(features)
    x = {"item": torch.tensor([1, 2]), "hist_item": torch.tensor([[3, 4, 0], [0, 0, 0]])}
    out = layer(x)
    assert out.shape == (2, D + layer.encoders["hist_item"].output_dim)
    assert torch.equal(out[1, D:], torch.zeros(out.shape[1] - D))  # no history: zeros
    other = layer({**x, "item": torch.tensor([5, 2])})  # another candidate, the same history
    assert not torch.allclose(out[0, D:], other[0, D:])
