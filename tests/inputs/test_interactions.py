"""Feature-interaction blocks (mtl_lightning/layers/interactions.py): formulas, structure, gradients, exports."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from mtl_lightning.layers.interactions import CrossNetworkV2, MaskBlock, MaskNet, SENet


def fill(parameter: torch.Tensor, values: list) -> None:
    with torch.no_grad():
        parameter.copy_(torch.tensor(values, dtype=torch.float32))


# ------------------------------------------------------------------------------------------- DCN-v2


def test_one_full_rank_cross_layer_and_the_next_one_reads_x0():
    # x0 = [1, 2], W = [[1, 0], [1, 1]], b = [0.5, -1]: W x0 + b = [1.5, 2]; x0 * that = [1.5, 4]; + x0 = [2.5, 6]
    # second layer W = I, b = 0: x0 * x1 + x1 = [1 * 2.5 + 2.5, 2 * 6 + 6] = [5, 18]
    cross = CrossNetworkV2(2, num_layers=2)
    fill(cross.layers[0].weight, [[1.0, 0.0], [1.0, 1.0]])
    fill(cross.layers[0].bias, [0.5, -1.0])
    x0 = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(cross.layers[0](x0, x0), torch.tensor([[2.5, 6.0]]))
    fill(cross.layers[1].weight, [[1.0, 0.0], [0.0, 1.0]])
    fill(cross.layers[1].bias, [0.0, 0.0])
    torch.testing.assert_close(cross(x0), torch.tensor([[5.0, 18.0]]))


def test_low_rank_cross_layer():
    # V = [1, 1]^T (D x 1), U = [2, -1]^T: V^T x0 = 3; U * 3 = [6, -3]; + b [0, 1] = [6, -2];
    # x0 * that = [6, -4]; + x0 = [7, -2]
    cross = CrossNetworkV2(2, num_layers=1, low_rank=1)
    fill(cross.layers[0].v, [[1.0], [1.0]])
    fill(cross.layers[0].u, [[2.0, -1.0]])
    fill(cross.layers[0].bias, [0.0, 1.0])
    torch.testing.assert_close(cross(torch.tensor([[1.0, 2.0]])), torch.tensor([[7.0, -2.0]]))


def test_mixture_of_low_rank_experts():
    # x0 = [1, 2], rank 1, two experts, g = ReLU, b = 0:
    # expert 1: V = [1, 0]^T -> 1, C = 1 -> 1, U = [1, 1] -> E1 = x0 * [1, 1] = [1, 2]
    # expert 2: V = [0, 1]^T -> 2, C = 2 -> 4, U = [1, 0] -> E2 = x0 * [4, 0] = [4, 0]
    # gates: softmax(W_g^T x0) with W_g^T = [[1, 0], [0, 0]] -> softmax([1, 0]) = [0.73105858, 0.26894142]
    # output = 0.73105858 * [1, 2] + 0.26894142 * [4, 0] + x0 = [2.80682426, 3.46211716]
    cross = CrossNetworkV2(2, num_layers=1, low_rank=1, num_experts=2)
    layer = cross.layers[0]
    fill(layer.v, [[[1.0], [0.0]], [[0.0], [1.0]]])
    fill(layer.c, [[[1.0]], [[2.0]]])
    fill(layer.u, [[[1.0, 1.0]], [[1.0, 0.0]]])
    fill(layer.bias, [0.0, 0.0])
    fill(layer.gate, [[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(cross(torch.tensor([[1.0, 2.0]])), torch.tensor([[2.80682426, 3.46211716]]))


def test_parallel_structure_concatenates_a_deep_network():
    torch.manual_seed(0)
    cross = CrossNetworkV2(6, num_layers=2, parallel_hidden=[5, 3])
    x = torch.randn(4, 6)
    out = cross(x)
    assert out.shape == (4, 9) and cross.output_dim == 9
    torch.testing.assert_close(out[:, 6:], cross.parallel(x))
    stacked = x
    for layer in cross.layers:
        stacked = layer(x, stacked)
    torch.testing.assert_close(out[:, :6], stacked)


def test_cross_network_starts_with_zero_biases_and_rejects_bad_options():
    cross = CrossNetworkV2(4, num_layers=3)
    assert all((layer.bias == 0).all() for layer in cross.layers)
    with pytest.raises(ValueError, match="num_experts > 1 is the mixture of low-rank experts; give low_rank"):
        CrossNetworkV2(4, num_experts=2)
    with pytest.raises(ValueError, match="low_rank must be >= 1"):
        CrossNetworkV2(4, low_rank=0)
    with pytest.raises(ValueError, match=r"CrossNetworkV2: input must be \(B, D\) = \(B, 4\), got \(2, 5\)"):
        cross(torch.randn(2, 5))


# --------------------------------------------------------------------------------------------- SENet


def test_senet_squeeze_excitation_and_reweighting():
    # fields e1 = [1, 3], e2 = [2, 2], e3 = [0, -4]: squeeze (mean) z = [2, 2, -2]
    # F = 3, r = 3 -> 1 hidden unit: W1 = [1, 0.5, 0.25]: 2 + 1 - 0.5 = 2.5, ReLU 2.5
    # W2 = [1, -1, 0.4]^T: [2.5, -2.5, 1.0], ReLU -> a = [2.5, 0, 1]
    # output: [2.5 * e1, 0 * e2, 1 * e3] = [[2.5, 7.5], [0, 0], [0, -4]]
    senet = SENet(num_fields=3, embedding_dim=2, reduction_ratio=3)
    fill(senet.excitation[0].weight, [[1.0, 0.5, 0.25]])
    fill(senet.excitation[2].weight, [[1.0], [-1.0], [0.4]])
    fields = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, -4.0]]])
    torch.testing.assert_close(senet.field_weights(fields), torch.tensor([[2.5, 0.0, 1.0]]))
    torch.testing.assert_close(senet(fields), torch.tensor([[[2.5, 7.5], [0.0, 0.0], [0.0, -4.0]]]))
    senet.flatten = True
    torch.testing.assert_close(senet(fields), torch.tensor([[2.5, 7.5, 0.0, 0.0, 0.0, -4.0]]))
    assert senet.output_dim == 6
    # the SE-Net gate: sigmoid(W2 h) = sigmoid([2.5, -2.5, 1.0]) = [0.92414182, 0.07585818, 0.73105858]
    gated = SENet(num_fields=3, embedding_dim=2, reduction_ratio=3, excitation_activation="sigmoid")
    gated.load_state_dict(senet.state_dict())
    torch.testing.assert_close(gated.field_weights(fields), torch.tensor([[0.92414182, 0.07585818, 0.73105858]]))


def test_senet_reduction_and_errors():
    assert SENet(10, 4, reduction_ratio=3).excitation[0].out_features == 3
    assert SENet(2, 4, reduction_ratio=3).excitation[0].out_features == 1
    assert all(not isinstance(m, nn.Linear) or m.bias is None for m in SENet(6, 4).excitation)  # bias-free, as in FiBiNET
    with pytest.raises(ValueError, match=r"SENet: input must be \(B, F, d\), one vector per field = \(B, 3, 2\)"):
        SENet(3, 2)(torch.randn(4, 6))


# ------------------------------------------------------------------------------------------- MaskNet


def test_one_mask_block():
    # mask(v) = W2 ReLU(W1 v + b1) + b2 with W1 = W2 = I, b1 = 0, b2 = [1, 0]; v = [1, -2] -> ReLU [1, 0] -> [2, 0]
    # masked input h = [3, 5]: mask * h = [6, 0]; W = [[1, 0], [0.5, 1], [0, 0]] -> [6, 3, 0]
    # LayerNorm: mean 3, variance 6 -> [3, 0, -3] / sqrt(6 + 1e-5) = [1.22474385, 0, -1.22474385]; ReLU -> [1.22474385, 0, 0]
    block = MaskBlock(mask_input_dim=2, masked_dim=2, output_dim=3, reduction_ratio=1.0)
    fill(block.mask[0].weight, [[1.0, 0.0], [0.0, 1.0]])
    fill(block.mask[0].bias, [0.0, 0.0])
    fill(block.mask[2].weight, [[1.0, 0.0], [0.0, 1.0]])
    fill(block.mask[2].bias, [1.0, 0.0])
    fill(block.hidden.weight, [[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]])
    assert block.hidden.bias is None
    out = block(torch.tensor([[3.0, 5.0]]), torch.tensor([[1.0, -2.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.22474385, 0.0, 0.0]]))


def test_mask_block_aggregation_width_is_reduction_ratio_times_masked_width():
    block = MaskBlock(mask_input_dim=10, masked_dim=6, output_dim=4, reduction_ratio=2.0)
    assert block.mask[0].in_features == 10 and block.mask[0].out_features == 12 and block.mask[2].out_features == 6


def test_field_layer_norm_normalises_each_field_and_leaves_scalars():
    # fields [1, 3] | [7] | [2, 4, 6]: LN([1, 3]) = [-1, 1] / sqrt(1 + 1e-5); the scalar 7 stays;
    # LN([2, 4, 6]) = [-2, 0, 2] / sqrt(8/3 + 1e-5)
    net = MaskNet(6, field_dims=[2, 1, 3])
    out = net.normalized_embedding(torch.tensor([[1.0, 3.0, 7.0, 2.0, 4.0, 6.0]]))
    a, b = 1 / (1 + 1e-5) ** 0.5, 2 / (8 / 3 + 1e-5) ** 0.5
    torch.testing.assert_close(out, torch.tensor([[-a, a, 7.0, -b, 0.0, b]]))
    whole = MaskNet(6).normalized_embedding(torch.tensor([[1.0, 3.0, 7.0, 2.0, 4.0, 6.0]]))
    torch.testing.assert_close(whole, nn.functional.layer_norm(torch.tensor([[1.0, 3.0, 7.0, 2.0, 4.0, 6.0]]), [6]))


def test_serial_masknet_chains_blocks_with_masks_from_the_embedding():
    torch.manual_seed(0)
    net = MaskNet(6, mode="serial", num_blocks=3, block_dim=4)
    x = torch.randn(5, 6)
    h = net.blocks[0](net.normalized_embedding(x), x)
    h = net.blocks[1](h, x)
    h = net.blocks[2](h, x)
    torch.testing.assert_close(net(x), h)
    assert net.output_dim == 4 and [b.mask[0].in_features for b in net.blocks] == [6, 6, 6]
    assert [b.hidden.in_features for b in net.blocks] == [6, 4, 4]


def test_parallel_masknet_concatenates_blocks_then_its_mlp():
    torch.manual_seed(0)
    net = MaskNet(6, mode="parallel", num_blocks=2, block_dim=4, parallel_hidden=[3])
    x = torch.randn(5, 6)
    normalized = net.normalized_embedding(x)
    concatenated = torch.cat([net.blocks[0](normalized, x), net.blocks[1](normalized, x)], dim=-1)
    torch.testing.assert_close(net(x), net.parallel(concatenated))
    assert net.output_dim == 3
    assert MaskNet(6, mode="parallel", num_blocks=2, block_dim=4).output_dim == 8


def test_masknet_rejects_bad_options():
    with pytest.raises(ValueError, match="mode must be 'serial' or 'parallel'"):
        MaskNet(6, mode="stacked")
    with pytest.raises(ValueError, match=r"field_dims \[2, 2\] must be positive widths summing to input_dim=6"):
        MaskNet(6, field_dims=[2, 2])
    with pytest.raises(ValueError, match="parallel_hidden is the MLP of mode='parallel'"):
        MaskNet(6, parallel_hidden=[4])


# ---------------------------------------------------------------------------- gradients and exports

MODULES = {
    "dcn_v2": (lambda: CrossNetworkV2(6, num_layers=2), (4, 6)),
    "dcn_v2_low_rank": (lambda: CrossNetworkV2(6, num_layers=2, low_rank=2), (4, 6)),
    "dcn_v2_mixture": (lambda: CrossNetworkV2(6, num_layers=2, low_rank=2, num_experts=3, parallel_hidden=[4]), (4, 6)),
    "senet": (lambda: SENet(6, 4, reduction_ratio=2, flatten=True), (8, 6, 4)),
    "senet_sigmoid": (lambda: SENet(6, 4, excitation_activation="sigmoid"), (8, 6, 4)),
    "masknet_serial": (lambda: MaskNet(6, num_blocks=2, block_dim=5, field_dims=[2, 1, 3]), (4, 6)),
    "masknet_parallel": (lambda: MaskNet(6, mode="parallel", num_blocks=2, block_dim=5, parallel_hidden=[3]), (4, 6)),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = MODULES[name]
    return factory(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODULES))
def test_gradients_reach_every_parameter_and_the_input(name):
    module, x = build(name)
    x.requires_grad_(True)
    out = module(x)
    assert out.flatten(1).shape == (x.shape[0], module.output_dim)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(MODULES))
def test_trace_script_and_onnx_give_the_same_outputs(name):
    ort = pytest.importorskip("onnxruntime")
    module, x = build(name)
    module.eval()
    expected = module(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, (x[:2],))
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.jit.script(module)(x), expected, rtol=0, atol=1e-6)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x[:2],), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    (out,) = ort.InferenceSession(buffer.getvalue()).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected.detach(), rtol=1e-5, atol=1e-5)
