"""The embedding layer (fused sparse lookups, embedding_bag pooling, optional sparse gradients) against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
    SparseFeature("item_now", 11, 4, shared_with="item"),  # a sparse feature reading another's block
    SequenceFeature("hist_max", 11, 3, 4, pooling="max", shared_with="item"),  # max pooling over a fused block
]
WIDTHS = {"price": 1, "vec": 3, "wide": 6, "clicks": 6}
OWNERS = ("user", "item", "wide", "tags", "city")  # the features that own a table


def batch(n: int = 9, seed: int = 0, features=FEATURES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = {f.name: f.vocab_size for f in features if not isinstance(f, DenseFeature)}
    x = {}
    for f in features:
        if isinstance(f, DenseFeature):
            x[f.name] = torch.randn(n, generator=g) if f.dim == 1 else torch.randn(n, f.dim, generator=g)
        else:
            size = (n, f.max_len) if isinstance(f, SequenceFeature) else (n,)
            x[f.name] = torch.randint(0, vocab[f.shared_with or f.name], size, generator=g)
    for name in ("hist_mean", "tags", "clicks", "hist_max"):
        if name in x:
            x[name][0] = 0  # an all-padding row
    if "tag_now" in x:
        x["tag_now"][1] = 0
    return x


def reference(layer: FeatureEmbedding, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One table lookup per feature and masked pooling, as the layer was first written."""
    padded = {f.name for f in FEATURES if isinstance(f, SequenceFeature) and not f.shared_with}
    parts = []
    for f in FEATURES:
        if isinstance(f, DenseFeature):
            parts.append(x[f.name].float().reshape(len(x[f.name]), -1))
            continue
        table = layer.table_weight(f.name)
        ids = x[f.name]
        emb = table[ids]
        if (f.shared_with or f.name) in padded:
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
def test_pooling_and_gradients_equal_the_masked_reference(sparse):
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES)
    layer.sparse = sparse
    assert layer.sparse == sparse
    assert sorted(layer.fused) == ["dim4", "dim6"] and sorted(layer.tables) == ["tags"]
    assert layer.fused["dim4"].weight.shape == (7 + 11 + 3, 4) and layer.fused["dim6"].weight.shape == (5, 6)
    assert layer.table_weight("item").shape == (11, 4) and layer.table_weight("wide").shape == (5, 6)
    x = batch()
    out = layer(x)
    expected = torch.cat(reference(layer, x), dim=-1)
    assert out.shape == (9, layer.output_dim) == (9, 4 + 1 + 4 + 4 + 6 + 4 + 4 + 6 + 3 + 4 + 4 + 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[0, 9:13], torch.zeros(4))  # all-padding mean pools to 0
    torch.testing.assert_close(out[1, 23:27], torch.zeros(4))  # id 0 of the sequence-owned table

    # gradients: the same as the reference's, row by row; padding rows never receive any
    weights = torch.randn_like(out)
    params = layer.embedding_parameters()
    assert params == [layer.fused["dim4"].weight, layer.fused["dim6"].weight, layer.tables["tags"].weight]
    fused = torch.autograd.grad((out * weights).sum(), params)
    assert all(g.is_sparse == sparse for g in fused)
    ref = torch.autograd.grad((torch.cat(reference(layer, x), dim=-1) * weights).sum(), params)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got.to_dense() if got.is_sparse else got, want)
        assert want.abs().sum() > 0
    tags = fused[2].to_dense() if sparse else fused[2]
    assert torch.equal(tags[0], torch.zeros(4))  # id 0 of a sequence-owned table: padding, never trained


# ---------------------------------------------------------------- bit-identity with one nn.Embedding per feature
class SeparateTables(nn.Module):
    """Every sparse/sequence feature with its own ``nn.Embedding``, a copy of the rows its table has in ``layer``.

    The computation of the layer before fusing: one lookup per sparse feature,
    one ``embedding_bag`` (masked lookup for max pooling with sparse gradients)
    per sequence, id 0 the padding of sequences and of sequence-owned tables.
    """

    def __init__(self, layer: FeatureEmbedding, sparse: bool) -> None:
        super().__init__()
        self.features = layer.features
        self.layer = layer
        by_name = {f.name: f for f in layer.features}
        self.copies = nn.ModuleDict()
        for f in layer.features:
            if isinstance(f, DenseFeature):
                continue
            owner = by_name[f.shared_with or f.name]
            padding = 0 if isinstance(owner, SequenceFeature) or isinstance(f, SequenceFeature) else None
            self.copies[f.name] = nn.Embedding.from_pretrained(
                layer.table_weight(f.name).detach().clone(), freeze=False, padding_idx=padding, sparse=sparse)

    def forward(self, x: dict[str, torch.Tensor], view: str) -> torch.Tensor:
        parts = []
        for f in self.features:
            value = x[f.name]
            if isinstance(f, DenseFeature):
                value = value.float().reshape(len(value), -1)
                parts.append(self.layer.dense_projections[f.name](value) if view == "field" else value)
            elif isinstance(f, SparseFeature):
                parts.append(self.copies[f.name](value))
            else:
                table = self.copies[f.name]
                if f.pooling == "max" and table.sparse:
                    emb, mask = table(value), (value != 0).unsqueeze(-1)
                    pooled = emb.masked_fill(~mask, float("-inf")).amax(dim=1)
                    parts.append(torch.where(mask.any(dim=1), pooled, torch.zeros_like(pooled)))
                else:
                    parts.append(F.embedding_bag(value, table.weight, mode=f.pooling, padding_idx=0, sparse=table.sparse))
        return torch.cat(parts, dim=-1) if view == "flat" else torch.stack(parts, dim=1)

    def table_grads(self, owner: str) -> torch.Tensor:
        """The gradient of ``owner``'s table: the sum of the gradients of the copies of it."""
        total = None
        for name, copy in self.copies.items():
            if self.layer._table_of[name] == owner and copy.weight.grad is not None:
                grad = copy.weight.grad.to_dense() if copy.weight.grad.is_sparse else copy.weight.grad
                total = grad if total is None else total + grad
        return total


def touched_by_several(layer: FeatureEmbedding, x: dict[str, torch.Tensor], owner: str) -> torch.Tensor:
    """Rows of ``owner``'s table that more than one feature reads in ``x`` (padding positions aside)."""
    readers = torch.zeros(layer.table_weight(owner).shape[0], dtype=torch.long)
    for f in layer.features:
        if not isinstance(f, DenseFeature) and layer._table_of[f.name] == owner:
            ids = x[f.name]
            if isinstance(f, SequenceFeature) or owner in layer.tables:
                ids = ids[ids != 0]
            readers += torch.bincount(ids.flatten(), minlength=len(readers)).clamp(max=1)
    return readers > 1


@pytest.mark.parametrize("view", ["flat", "field"])
@pytest.mark.parametrize("sparse", [False, True])
def test_bit_identical_to_one_embedding_per_feature(sparse, view):
    """Outputs equal separate per-feature tables bit for bit, and so do the gradients of a table one feature reads.

    A table several features read (a ``shared_with`` sparse feature, a
    sequence sharing a sparse table) gets the same gradient terms summed in
    another order (one fused backward against one per copy, then the copies
    added), so it agrees to float rounding only: with dense gradients just in
    the rows several features read, with sparse ones in every row (autograd
    merges the lookups' sparse gradients before they are densified).
    """
    features = FEATURES if view == "flat" else [f for f in FEATURES if getattr(f, "embedding_dim", 4) == 4]
    torch.manual_seed(0)
    layer = FeatureEmbedding(features, field_view=view == "field")
    layer.sparse = sparse
    separate = SeparateTables(layer, sparse)
    x = batch(64, seed=1, features=features)
    out, want = layer(x, view=view), separate(x, view)
    assert out.shape == want.shape and torch.equal(out, want)

    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    exact_rows = 0
    for owner in (o for o in OWNERS if o in {f.name for f in features}):
        got, expected = layer.table_grad(owner), separate.table_grads(owner)
        assert got is not None and got.shape == expected.shape == layer.table_weight(owner).shape
        readers = [n for n in separate.copies if layer._table_of[n] == owner]
        if len(readers) == 1:
            exact = torch.ones(len(got), dtype=torch.bool)
        else:
            several = touched_by_several(layer, x, owner)
            assert several.any()
            exact = torch.zeros_like(several) if sparse else ~several
        assert torch.equal(got[exact], expected[exact]), owner
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        exact_rows += int(exact.sum())
    assert exact_rows >= 7 + 3  # at least the tables of user and city, which no other feature reads
    assert all(p.grad.is_sparse == sparse for p in layer.embedding_parameters())


def test_seeded_tables_equal_separate_nn_embeddings():
    """Each block is drawn as its own nn.Embedding was, in spec order: same seed, same initial tables and RNG state."""
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES)
    after_layer = torch.rand(3)
    torch.manual_seed(0)
    tables = {}
    for f in FEATURES:
        if not isinstance(f, DenseFeature) and not f.shared_with:
            padding = 0 if isinstance(f, SequenceFeature) else None
            tables[f.name] = nn.Embedding(f.vocab_size, f.embedding_dim, padding_idx=padding)
            nn.init.normal_(tables[f.name].weight, std=0.05)
            if padding is not None:
                with torch.no_grad():
                    tables[f.name].weight[0].zero_()
    assert torch.equal(torch.rand(3), after_layer)
    for name, table in tables.items():
        assert torch.equal(layer.table_weight(name), table.weight), name
    assert 0.04 < float(layer.fused["dim4"].weight.detach().std()) < 0.06


def test_table_views_ids_and_errors():
    torch.manual_seed(0)
    layer = FeatureEmbedding(FEATURES)
    weight = layer.fused["dim4"].weight
    # blocks in spec order: user [0, 7), item [7, 18), city [18, 21); sharers read their owner's block
    assert torch.equal(layer.table_weight("item"), weight[7:18]) and torch.equal(layer.table_weight("city"), weight[18:])
    assert layer.table_weight("item_now").data_ptr() == layer.table_weight("hist_max").data_ptr() == weight[7].data_ptr()
    assert layer.table_weight("tag_now") is layer.tables["tags"].weight
    with torch.no_grad():  # a write through the view reaches the parameter, and the lookup sees it
        layer.table_weight("city")[2] = 1.0
    x = batch()
    x["city"][:] = 2
    assert torch.equal(layer(x)[:, -12:-8], torch.ones(9, 4))

    assert layer.table_grad("item") is None
    layer(x).sum().backward()
    assert torch.equal(layer.table_grad("city")[2], torch.full((4,), 9.0)) and layer.table_grad("city")[:2].abs().sum() == 0
    assert torch.equal(layer.table_grad("item_now"), layer.fused["dim4"].weight.grad[7:18])
    for name in ("price", "nope"):
        with pytest.raises(ValueError, match=f"{name!r} is not a sparse or sequence feature"):
            layer.table_weight(name)

    # ids are checked against their table's vocabulary (the owner's, for a sharer): a fused block is no bound
    for name, value, limit in (("user", 7, 7), ("city", -1, 3), ("item_now", 11, 11)):
        bad = batch()
        bad[name][4] = value
        with pytest.raises(ValueError, match=rf"feature '{name}' has id {value}, outside \[0, {limit}\)"):
            layer(bad)
    bad = batch()
    bad["hist_mean"][2, 1] = 11
    with pytest.raises(ValueError, match=r"feature 'hist_mean' has id 11, outside \[0, 11\)"):
        layer(bad)
    bad = batch()
    del bad["city"]
    with pytest.raises(ValueError, match="the batch has no feature 'city'"):
        layer(bad)


def test_field_view_is_the_flat_view_per_field():
    torch.manual_seed(0)
    features = [f for f in FEATURES if getattr(f, "embedding_dim", 4) == 4]
    layer = FeatureEmbedding(features, field_view=True)
    x = batch(features=features)
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
    assert set(layer.state_dict()) == {"fused.dim4.weight", "fused.dim6.weight", "tables.tags.weight"}
    restored = FeatureEmbedding(FEATURES)
    restored.load_state_dict(layer.state_dict())
    x = batch(seed=3)
    torch.testing.assert_close(restored(x), layer(x))
    restored.sparse = True
    torch.testing.assert_close(restored(x), layer(x))


def test_checkpoints_of_the_per_table_layout_still_load():
    from mtl_lightning import Task, registry

    features = [SparseFeature("user", 7, 4), SparseFeature("item", 5, 4), DenseFeature("price"),
                SparseFeature("city", 3, 4, shared_with="user"), SequenceFeature("hist", 6, max_len=3, embedding_dim=4)]
    model = registry.create("shared_bottom", features=features, tasks=[Task("click")], bottom_hidden=(8,),
                            tower_hidden=(4,))
    layer = model.embedding
    # the earlier layout: one tables.<feature>.weight per table, here with values the new model does not have
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding.fused.")}
    tables = {name: torch.randn(layer.table_weight(name).shape) for name in ("user", "item")}
    old.update({f"embedding.tables.{name}.weight": table for name, table in tables.items()})
    model.load_state_dict(old)  # strict: no missing or unexpected key
    for name, table in tables.items():
        torch.testing.assert_close(layer.table_weight(name), table, rtol=0, atol=0)
    torch.testing.assert_close(layer.table_weight("city"), tables["user"], rtol=0, atol=0)  # shared_with follows
    incomplete = {k: v for k, v in old.items() if k != "embedding.tables.item.weight"}
    with pytest.raises(RuntimeError, match="fused.dim4.weight"):  # a missing table is reported, not guessed
        model.load_state_dict(incomplete)


def test_deferred_tables_allocate_nothing_and_draw_any_rows_alone():
    """Inside ``deferred_tables()`` the tables are meta tensors; ``initial_rows`` gives any range of rows, drawn
    chunk by chunk, equal to the same rows of the whole table; ``materialize_tables`` fills the whole tables."""
    from mtl_lightning.layers import deferred_tables
    from mtl_lightning.layers.embedding import INIT_CHUNK_ROWS

    big = INIT_CHUNK_ROWS * 2 + 1000  # three chunks, the last one short
    features = [*FEATURES, SparseFeature("big", big, 4), SequenceFeature("long", big, 2, 4, pooling="sum")]
    state = torch.random.get_rng_state()
    eager = FeatureEmbedding(features)
    assert eager.table_seed is None and not eager.deferred
    torch.random.set_rng_state(state)
    with deferred_tables():
        layer = FeatureEmbedding(features)
    assert layer.deferred and all(p.is_meta for p in layer.embedding_parameters())
    assert not any(p.is_meta for n, p in layer.named_parameters() if "fused" not in n and "tables" not in n)
    whole = layer.initial_rows("big", 0, big)
    assert whole.shape == (big, 4) and abs(float(whole.std()) - 0.05) < 0.002
    for start, stop in [(0, 1), (INIT_CHUNK_ROWS - 3, INIT_CHUNK_ROWS + 5), (1000, big), (big - 1, big), (7, 7)]:
        assert torch.equal(layer.initial_rows("big", start, stop), whole[start:stop]), (start, stop)
    assert not torch.equal(whole[:INIT_CHUNK_ROWS], whole[INIT_CHUNK_ROWS : 2 * INIT_CHUNK_ROWS])  # chunks differ
    long = layer.initial_rows("long", 0, 3)
    assert long[0].abs().sum() == 0 and long[1:].abs().sum() > 0  # a sequence table's padding row is zero
    assert torch.equal(layer.initial_rows("item_now", 2, 5), layer.initial_rows("item", 2, 5))  # the owner's table
    assert not torch.equal(layer.initial_rows("item", 0, 5), layer.initial_rows("user", 0, 5))
    with pytest.raises(ValueError, match="the table has 11 rows"):
        layer.initial_rows("item", 0, 12)
    with pytest.raises(ValueError, match="not built inside deferred_tables"):
        eager.initial_rows("item", 0, 1)
    x = batch(6, features=features)
    with pytest.raises(RuntimeError, match="tables are deferred .* materialize_tables"):
        layer(x)
    layer.materialize_tables()
    assert not layer.deferred
    for owner in ("user", "item", "wide", "tags", "city", "big", "long"):
        size = layer.table_weight(owner).shape[0]
        assert torch.equal(layer.table_weight(owner), layer.initial_rows(owner, 0, size)), owner
    assert layer(x).shape == eager(x).shape
    torch.manual_seed(5)
    with deferred_tables():
        again = FeatureEmbedding(features)
    torch.manual_seed(5)
    with deferred_tables():
        same = FeatureEmbedding(features)
    assert again.table_seed == same.table_seed != layer.table_seed  # drawn from torch's global generator
