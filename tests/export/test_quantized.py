"""Row-wise INT8 and float16 tables, float16 dense weights: the numbers, what the exported files store, and what
carries over (out-of-vocabulary ids, the preprocessing fingerprint)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from mtl_lightning import MultiTaskLightningModule
from mtl_lightning.export import (FINGERPRINT_METADATA_KEY, ServingModel, example_features, export_onnx,
                                  export_torchscript, id_limits, preprocessing_path)
from mtl_lightning.layers import FeatureEmbedding
from mtl_lightning.quantized import QuantizedFeatureEmbedding, dequantize_rows, quantize_rows, serving_copy

NO_LATENCY = {"latency_batch_sizes": ()}




def test_int8_rows_by_hand():
    step = 2.0**-7  # 1.9921875 / 255: exact in float16, as are the values below
    table = torch.tensor([[0.0, 255 * step, 64 * step, 128 * step],      # min 0, max 1.9921875
                          [-1.0, -1.0 + 255 * step, 0.0, -0.5],          # offset -1
                          [0.25, 0.25, 0.25, 0.25],                      # a constant row: scale 0
                          [0.0, 255 * step, 0.3, 1.0]])                 # 0.3 is between two codes
    codes, scale, offset = quantize_rows(table)
    assert codes.dtype == torch.uint8 and scale.dtype == offset.dtype == torch.float16
    assert codes[:3].tolist() == [[0, 255, 64, 128], [0, 255, 128, 64], [0, 0, 0, 0]]
    assert scale.tolist() == [step, step, 0.0, step] and offset.tolist() == [0.0, -1.0, 0.25, 0.0]
    assert codes[3].tolist() == [0, 255, 38, 128]  # 0.3 / 2^-7 = 38.4 -> 38
    restored = dequantize_rows(codes, scale, offset)
    torch.testing.assert_close(restored[:3], table[:3], rtol=0, atol=0)
    assert restored[3, 2] == 38 * step and abs(float(restored[3, 2]) - 0.3) <= step / 2


def test_int8_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    table = torch.randn(1000, 16) * torch.rand(1000, 1) * 3  # rows of very different ranges
    codes, scale, offset = quantize_rows(table)
    error = (dequantize_rows(codes, scale, offset) - table).abs().max(dim=1).values
    # half a code step, plus the float16 rounding of the offset and of the scale (times up to 255 codes)
    bound = scale.float() / 2 + offset.float().abs() * 2**-11 + 255 * scale.float() * 2**-11
    assert (error <= bound + 1e-7).all()
    assert error.max() > 0.25 * scale.float().max()  # the bound is not vacuous


def test_serving_copy_stores_fewer_bits_and_leaves_the_model_alone(perturbed_mmoe):
    model = perturbed_mmoe()
    copied = serving_copy(ServingModel(model), "int8", "float16")
    layer = copied.model.embedding
    assert isinstance(layer, QuantizedFeatureEmbedding)
    assert {k: v.data.dtype for k, v in layer.fused.items()} == {"dim8": torch.uint8}
    assert layer.fused["dim8"].data.shape == (500 + 1000 + 20 + 30, 8)  # history shares item_id's block
    assert layer.fused["dim8"].scale.dtype == torch.float16 and layer.fused["dim8"].scale.shape == (1550,)
    dense = {n: p.dtype for n, p in copied.named_parameters()}
    assert dense and set(dense.values()) == {torch.float16}  # every remaining parameter: float16, read as float32
    assert not any(p.requires_grad for p in copied.parameters())
    # the model itself is untouched: float32 trainable tables in a FeatureEmbedding
    assert type(model.embedding) is FeatureEmbedding
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    with torch.no_grad():
        float16 = serving_copy(ServingModel(model), "float16")
        assert float16.model.embedding.fused["dim8"].data.dtype == torch.float16
        torch.testing.assert_close(float16.model.embedding.fused["dim8"].data.float(),
                                   model.embedding.fused["dim8"].weight, rtol=2**-11, atol=1e-7)
    with pytest.raises(ValueError, match=r"table_dtype must be one of \['float32', 'float16', 'int8'\], got 'int4'"):
        serving_copy(ServingModel(model), "int4")
    with pytest.raises(ValueError, match=r"dense_dtype must be one of \['float32', 'float16'\]"):
        export_onnx(model, "never-written.onnx", dense_dtype="bfloat16")


def test_int8_onnx_stores_uint8_tables_float16_row_parameters_and_float16_weights(perturbed_mmoe, tmp_path):
    model = perturbed_mmoe()
    path = export_onnx(model, tmp_path / "m.onnx", table_dtype="int8", dense_dtype="float16", verification=NO_LATENCY)
    initializers = {tuple(i.dims): i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert initializers[(1550, 8)] == TensorProto.UINT8  # the fused table: 1 byte a value
    assert initializers[(1550,)] == TensorProto.FLOAT16  # its scales and offsets
    weights = [i for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 2 and i.dims[0] > 1]
    assert weights and all(i.data_type in (TensorProto.UINT8, TensorProto.FLOAT16) for i in weights)
    float32 = export_onnx(model, tmp_path / "f.onnx", verification=NO_LATENCY)
    parameters, table_values = sum(p.numel() for p in model.parameters()), 1550 * 8
    # every weight is stored once: 4 bytes a value in float32; INT8: 1 byte a table value + 2 float16 numbers a
    # row (scale, offset), 2 bytes a dense weight
    assert _initializer_bytes(float32) == {"float32": 4 * parameters}
    assert _initializer_bytes(path) == {"uint8": table_values, "float16": 2 * 2 * 1550 + 2 * (parameters - table_values)}


def _initializer_bytes(path) -> dict[str, int]:
    """Bytes of an ONNX file's weights (initializers) per dtype."""
    totals: dict[str, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        totals[str(array.dtype)] = totals.get(str(array.dtype), 0) + array.nbytes
    return totals


def test_int8_torchscript_stores_uint8_tables(perturbed_mmoe, tmp_path):
    model = perturbed_mmoe()
    path = export_torchscript(model, tmp_path / "m.pt", table_dtype="int8", verification=NO_LATENCY)
    state = torch.jit.load(str(path)).state_dict()
    assert state["model.embedding.fused.dim8.data"].dtype == torch.uint8
    assert state["model.embedding.fused.dim8.offset"].dtype == torch.float16
    assert {v.dtype for k, v in state.items() if "experts" in k} == {torch.float32}  # dense untouched unless asked


@pytest.mark.parametrize("table_dtype", ["float16", "int8"])
def test_out_of_vocabulary_ids_and_fingerprint_carry_over(perturbed_mmoe, table_dtype, tmp_path):
    model = perturbed_mmoe()
    path = export_onnx(model, tmp_path / "m.onnx", table_dtype=table_dtype, verification=NO_LATENCY)
    fingerprint = json.loads(preprocessing_path(path).read_text())["fingerprint"]
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}[FINGERPRINT_METADATA_KEY] == fingerprint
    script = export_torchscript(model, tmp_path / "m.pt", table_dtype=table_dtype, verification=NO_LATENCY)
    files = {"preprocessing_fingerprint": ""}
    torch.jit.load(str(script), _extra_files=files)
    assert files["preprocessing_fingerprint"].decode() == fingerprint
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(script))
    batch = example_features(model.features, batch_size=8, seed=3)
    for name, limit in id_limits(model.features).items():
        oov, zero = dict(batch), dict(batch)
        column = batch[name].clone()
        column[:4] = torch.tensor([limit, limit + 7, -1, 10**12]).view(4, *([1] * (column.dim() - 1)))
        oov[name] = column
        zero[name] = torch.where(column == batch[name], column, 0)
        got = session.run(None, {k: v.numpy() for k, v in oov.items()})
        want = session.run(None, {k: v.numpy() for k, v in zero.items()})
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b, err_msg=name)
        with torch.no_grad():
            for output, value in scripted(oov).items():
                torch.testing.assert_close(value, scripted(zero)[output], rtol=0, atol=0)
        if name == "user_id":  # id 0 is not the rows' own ids: the check is not vacuous
            assert not np.array_equal(got[0][:4], session.run(None, {k: v.numpy() for k, v in batch.items()})[0][:4])


def test_a_calibrated_module_exports_quantized_with_its_calibration_in_float32(perturbed_mmoe, tmp_path):
    from mtl_lightning.calibration import calibrate
    from mtl_lightning.export import export_program
    from mtl_lightning.verification import open_runtime

    model = perturbed_mmoe()
    module = MultiTaskLightningModule(model).eval()
    features = example_features(model.features, batch_size=400, seed=0)
    with torch.no_grad():
        logits = model(features)
    labels = {"click": (torch.rand(400, generator=torch.Generator().manual_seed(0)) < torch.sigmoid(3 * logits["click"]
                                                                                                 - 1)).float()}
    calibrate(module, [{"features": features, "labels": labels}], method="platt", tasks=["click"])
    copied = serving_copy(ServingModel(module), "int8", "float16")
    assert copied.calibration is not None and {p.dtype for p in copied.calibration.parameters()} <= {torch.float32}
    assert {b.dtype for b in copied.calibration.buffers() if b.is_floating_point()} <= {torch.float32}
    batch = example_features(model.features, batch_size=37, seed=5)
    with torch.no_grad():
        expected = module.predict_step({"features": batch}, 0)
        raw = model.predictions(model(batch))
        quantized = copied(batch)
    assert (expected["click"] - raw["click"]).abs().max() > 0.02  # the calibration moves the probabilities
    names = [f.name for f in model.features]
    options = dict(table_dtype="int8", dense_dtype="float16", verification=NO_LATENCY)
    for kind, path in [("onnx", export_onnx(module, tmp_path / "m.onnx", **options)),
                       ("program", export_program(module, tmp_path / "m.pt2", compile=False, **options))]:
        served = open_runtime(path, kind, names)(batch)
        for task in expected:
            np.testing.assert_allclose(served[task], quantized[task].numpy(), rtol=0, atol=1e-5, err_msg=kind)
            np.testing.assert_allclose(served[task], expected[task].numpy(), rtol=0, atol=1e-2, err_msg=kind)
