"""ONNX, TorchScript and torch.export exports give the PyTorch outputs (probabilities / values) within 1e-5, for every
architecture; with float16 / INT8 tables and float16 dense weights, the outputs of the quantized model exactly and the
float32 model's within tolerances measured over every architecture."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, SequenceFeature, SparseFeature, Task, registry
from mtl_lightning.export import (ServingModel, example_features, export_onnx, export_program, export_torchscript,
                                  id_limits, main)
from mtl_lightning.layers import FeatureEmbedding
from mtl_lightning.quantized import serving_copy
from mtl_lightning.verification import open_runtime, report_path
from tests.architectures.test_architectures import arguments as model_arguments

NO_LATENCY = {"latency_batch_sizes": ()}  # the parity tests read the reports' differences, never time anything


def _spread(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturbed weights (biases and tables included), so outputs are away from 0.5 and differ across rows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


# CVR-funnel architectures take binary steps only; ESMM/ESCM add outputs beyond their tasks (purchase, imputation)
FUNNEL = {
    "esmm": dict(tasks=[Task("click"), Task("conversion")], click_task="click", conversion_task="conversion",
                 ctcvr_task="purchase"),
    "escm": dict(tasks=[Task("click"), Task("conversion")], click_task="click", conversion_task="conversion",
                 ctcvr_task="purchase"),
    "aitm": dict(tasks=[Task("click"), Task("conversion")]),
    "dcmt": dict(tasks=[Task("click"), Task("conversion")], click_task="click", conversion_task="conversion",
                 ctcvr_task="purchase"),
}


def _check_exports(model: torch.nn.Module, tmp_path, binary: str = "click", program: bool = True
                   ) -> dict[str, torch.Tensor]:
    """Export ``model`` (traced on the default 4-row example) and check ONNX, TorchScript and (``program``) the
    exported program against PyTorch on another batch (37 rows, other values) within 1e-5; returns PyTorch's outputs
    on that batch. ``torch.export`` takes seconds per model where the other two take a fraction of one, so every
    architecture's program is checked once in float32 (with a DIN group, below) and once per quantized dtype."""
    onnx_path = export_onnx(model, tmp_path / "model.onnx")
    script_path = export_torchscript(model, tmp_path / "model.pt")
    batch = example_features(model.features, batch_size=37, seed=11)
    with torch.no_grad():
        expected = ServingModel(model).eval()(batch)
        logits = model(batch)
    kinds = {**model.extra_outputs(), **{t.name: t.kind for t in model.tasks}}
    assert list(expected) == model.output_names  # every task, then every extra output
    for output, kind in kinds.items():  # binary: probabilities; regression: values
        assert torch.equal(expected[output], torch.sigmoid(logits[output]) if kind == "binary" else logits[output])
    assert expected[binary].std() > 1e-3 and ((expected[binary] > 0.001) & (expected[binary] < 0.999)).all()

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == model.output_names
    assert [i.name for i in session.get_inputs()] == [f.name for f in model.features]
    outputs = session.run(None, {k: v.numpy() for k, v in batch.items() if k in {f.name for f in model.features}})
    for output, value in zip(model.output_names, outputs):
        assert value.shape == (37,)
        np.testing.assert_allclose(value, expected[output].numpy(), rtol=0, atol=1e-5)

    scripted = torch.jit.load(str(script_path))
    with torch.no_grad():
        traced = scripted(batch)
    for output in expected:
        torch.testing.assert_close(traced[output], expected[output], rtol=0, atol=1e-5)

    if not program:
        return expected
    program_path = export_program(model, tmp_path / "model.pt2", compile=False, verification=NO_LATENCY)
    with torch.no_grad():  # the exported program: the model's features, this batch and a single row
        served = torch.export.load(str(program_path)).module()
        exported = served({f.name: batch[f.name] for f in model.features})
        single = served({f.name: batch[f.name][:1] for f in model.features})
    for output in expected:
        torch.testing.assert_close(exported[output], expected[output], rtol=0, atol=1e-5)
        torch.testing.assert_close(single[output], expected[output][:1], rtol=0, atol=1e-5)
    return expected


@pytest.mark.parametrize("name", registry.names())
def test_onnx_and_torchscript_match_pytorch(name, tmp_path):
    arguments = FUNNEL.get(name, dict(tasks=synthetic_tasks()))
    if registry.get(name).multi_scenario:
        arguments["domain_feature"] = "city"  # multi-scenario: the synthetic data's city plays the domain
    model = _spread(registry.create(name, features=synthetic_features(embedding_dim=8), **arguments))
    _check_exports(model, tmp_path, program=False)  # the program: test_exports_with_a_din_group_and_with_an_interaction
    if name not in FUNNEL:
        assert {t.name: t.kind for t in model.tasks}["dwell"] == "regression"


@pytest.mark.parametrize("inputs", ["din_group", "dcn_v2"])
@pytest.mark.parametrize("name", registry.names())
def test_exports_with_a_din_group_and_with_an_interaction(name, inputs, tmp_path):
    """Every architecture exports with a DIN-encoded group of two aligned sequences (one sharing the item table)
    read with the candidate's item and category, and with a DCN-v2 interaction in front of its bottom."""
    if inputs == "dcn_v2" and registry.get(name).interaction_refused:
        pytest.skip(f"{name} refuses interactions (tests/architectures checks the refusal)")
    torch.manual_seed(0)
    model = registry.create(name, **model_arguments(name, inputs))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for scale in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.05):  # the first perturbation spreading the outputs, unsaturated
        model.load_state_dict(initial)
        _spread(model, scale)
        with torch.no_grad():
            first = torch.sigmoid(model(example_features(model.features, batch_size=37, seed=11))[model.tasks[0].name])
        if first.std() > 1e-3 and ((first > 0.001) & (first < 0.999)).all():
            break
    layers = [m for m in model.modules() if isinstance(m, FeatureEmbedding)]
    assert layers and all((len(layer.encoders) == 1) if inputs == "din_group" else layer.interaction is not None
                          for layer in layers)
    # the program once per architecture, with the DIN group; the interaction's program with MMoE (below)
    expected = _check_exports(model, tmp_path, binary=model.tasks[0].name, program=inputs == "din_group")
    # the exported graphs read what is tested: another history (same lengths) changes the outputs
    batch = example_features(model.features, batch_size=37, seed=11)
    moved = {**batch, "history": torch.where(batch["history"] > 0, batch["history"] % 39 + 1, 0)}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    first = model.output_names[0]
    changed = session.run([first], {k: v.numpy() for k, v in moved.items() if k in {f.name for f in model.features}})[0]
    has_history = (batch["history"] > 0).any(dim=1).numpy()
    assert np.abs(changed - expected[first].numpy())[has_history].max() > 1e-6
    np.testing.assert_allclose(changed[~has_history], expected[first].numpy()[~has_history], rtol=0, atol=1e-6)
    # the sequences of the group are aligned: their padding is at the same positions
    if inputs == "din_group":
        torch.testing.assert_close(batch["history"] > 0, batch["history_cat"] > 0)


ENCODERS = {
    "attention": dict(pooling="attention", pooling_options={"attention_dim": 6}),
    "transformer": dict(pooling="transformer", pooling_options={"num_heads": 2}),
    "transformer_flatten": dict(pooling="transformer", pooling_options={"num_heads": 2, "output": "flatten"}),
    "din_dice_softmax": dict(pooling="din", pooling_options={"attention_hidden": (8,), "activation": "dice",
                                                             "normalization": "softmax"}),
}


@pytest.mark.parametrize("variant", [*ENCODERS, "senet", "masknet", "dcn_v2"])
def test_every_sequence_encoder_and_interaction_exports(variant, tmp_path):
    """MMoE with each other encoder (in the same group of two aligned histories) and each interaction."""
    kwargs = model_arguments("mmoe", "din_group" if variant in ENCODERS else "plain")
    if variant in ENCODERS:
        kwargs["features"] = [dataclasses.replace(f, **ENCODERS[variant]) if isinstance(f, SequenceFeature) else f
                              for f in kwargs["features"]]
    else:
        kwargs["interaction"] = variant
    torch.manual_seed(0)
    model = _spread(registry.create("mmoe", **kwargs))
    for module in model.modules():  # Dice's running statistics, as after training, not at their initial 0 / 1
        if hasattr(module, "running_var"):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    _check_exports(model, tmp_path)


def test_onnx_batch_dimension_is_dynamic_and_module_exports(tmp_path, synthetic_paths):
    model = _spread(registry.create("mmoe", features=synthetic_features(embedding_dim=8), tasks=synthetic_tasks(),
                                    num_experts=2, expert_hidden=(16,), tower_hidden=(8,)))
    module = MultiTaskLightningModule(model)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    main([str(ckpt), "--onnx", str(tmp_path / "m.onnx"), "--torchscript", str(tmp_path / "m.pt")])
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = example_features(model.features, batch_size=1, seed=5)  # a single row also works
    with torch.no_grad():
        expected = module.predict_step({"features": batch}, 0)
    click = session.run(["click"], {k: v.numpy() for k, v in batch.items()})[0]
    np.testing.assert_allclose(click, expected["click"].numpy(), rtol=0, atol=1e-5)


def test_rejects_what_cannot_be_exported(tmp_path):
    with pytest.raises(TypeError, match="MultiTaskArchitecture or a MultiTaskLightningModule"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    model = registry.create("mmoe", features=synthetic_features(), tasks=synthetic_tasks())
    with pytest.raises(ValueError, match=r"lacks features \['history'\]"):
        batch = example_features(model.features)
        batch.pop("history")
        export_onnx(model, tmp_path / "x.onnx", example=batch)


def _oov_model() -> torch.nn.Module:
    """The synthetic features plus a sparse feature sharing item_id's table with a smaller vocabulary (50 < 1000)."""
    features = [*synthetic_features(embedding_dim=8), SparseFeature("recent_item", 50, 8, shared_with="item_id")]
    return _spread(registry.create("mmoe", features=features, tasks=synthetic_tasks(), num_experts=2,
                                   expert_hidden=(16,), tower_hidden=(8,)))


def test_exports_serve_out_of_vocabulary_ids_as_id_0(tmp_path):
    model = _oov_model()
    module = MultiTaskLightningModule(model).eval()
    assert id_limits(model.features) == {"user_id": 500, "item_id": 1000, "category": 20, "city": 30,
                                         "history": 1000, "recent_item": 50}
    session = ort.InferenceSession(str(export_onnx(module, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(export_torchscript(module, tmp_path / "m.pt")))

    def served(batch: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
        onnx_out = dict(zip(model.output_names, session.run(None, {k: v.numpy() for k, v in batch.items()})))
        script_out = scripted(batch)  # outside no_grad: the outputs must be plain tensors
        assert not any(v.requires_grad for v in script_out.values())
        return [onnx_out, {k: v.numpy() for k, v in script_out.items()}]

    batch = example_features(model.features, batch_size=8, seed=3)
    with torch.no_grad():
        expected = module.predict_step({"features": batch}, 0)  # in range: the exports give the module's outputs
    for outputs in served(batch):
        for name in model.output_names:
            np.testing.assert_allclose(outputs[name], expected[name].numpy(), rtol=0, atol=1e-5)

    for name, limit in id_limits(model.features).items():
        oov, zero = {k: v.clone() for k, v in batch.items()}, {k: v.clone() for k, v in batch.items()}
        bad = torch.tensor([limit, limit + 7, -1, 10**12])
        if oov[name].dim() == 1:  # sparse: rows 0-3 out of range
            oov[name][:4] = bad
            zero[name][:4] = 0
        else:  # sequence: one position of rows 0-3 out of range
            oov[name][:4, 1] = bad
            zero[name][:4, 1] = 0
        for got, want in zip(served(oov), served(zero)):
            for output in model.output_names:
                np.testing.assert_array_equal(got[output], want[output], err_msg=f"{name} -> {output}")
        for got in served(oov):  # the other rows keep the module's outputs
            np.testing.assert_allclose(got["click"][4:], expected["click"][4:].numpy(), rtol=0, atol=1e-5)
    assert served(oov)[0]["click"][0] != expected["click"][0]  # id 0 is not the row's own id: the check is not vacuous
    with pytest.raises(ValueError, match="outside"):  # PyTorch code keeps refusing out-of-range ids
        module.predict_step({"features": oov}, 0)
    assert all(p.requires_grad for p in module.parameters())  # exporting froze a copy, not the module


def test_predict_step_and_exports_return_the_same_outputs(tmp_path):
    """predict_step and both exports return every output of the architecture, with the same values: here a
    SharedBottom with a DR imputation task that the module does not train as a task, and ESMM's extra cvr."""
    from mtl_lightning.losses import CounterfactualCVR

    features = synthetic_features(embedding_dim=4)
    ctr, cvr = Task("ctr", label="click"), Task("cvr", label="conversion")
    imputation = Task("imputation", kind="regression")
    shared_bottom = registry.create("shared_bottom", features=features, tasks=[ctr, cvr, imputation], bottom_hidden=(8,))
    esmm = registry.create("esmm", features=features, tasks=[ctr, Task("ctcvr", label="purchase")])
    modules = {
        "shared_bottom": MultiTaskLightningModule(shared_bottom, counterfactual=CounterfactualCVR("dr")),
        "esmm": MultiTaskLightningModule(esmm),
    }
    assert [t.name for t in modules["shared_bottom"].tasks] == ["ctr", "cvr"]  # imputation: not a module task
    for name, module in modules.items():
        _spread(module.model)
        batch = example_features(module.model.features, batch_size=9, seed=3)
        with torch.no_grad():
            predicted = module.eval().predict_step({"features": batch}, 0)
            served = ServingModel(module).eval()(batch)
        scripted = torch.jit.load(str(export_torchscript(module, tmp_path / f"{name}.pt")))(batch)
        session = ort.InferenceSession(str(export_onnx(module, tmp_path / f"{name}.onnx")),
                                       providers=["CPUExecutionProvider"])
        onnx_names = [o.name for o in session.get_outputs()]
        onnx_values = session.run(None, {k: v.numpy() for k, v in batch.items()})
        assert list(predicted) == list(served) == list(scripted) == onnx_names == module.model.output_names
        for output, value in zip(onnx_names, onnx_values):
            assert torch.equal(predicted[output], served[output])
            torch.testing.assert_close(scripted[output], predicted[output], rtol=0, atol=1e-5)
            np.testing.assert_allclose(value, predicted[output].numpy(), rtol=0, atol=1e-5)
    assert "imputation" in modules["shared_bottom"].model.output_names
    assert modules["esmm"].model.output_names == ["ctr", "ctcvr", "cvr"]


# Beyond arguments(name, "din_group") (a DIN group reading two aligned sequences, the domain for multi-scenario
# architectures): a max-pooled sequence reading a sparse feature's block of the fused table, a mean-pooled sequence
# with its own table and a sparse feature reading that sequence's table, so that every lookup path is quantized.
EXTRA_FEATURES = [
    SequenceFeature("recent_cat", 6, max_len=3, embedding_dim=8, pooling="max", shared_with="cat"),
    SequenceFeature("tags", 12, max_len=4, embedding_dim=8, pooling="mean"),
    SparseFeature("top_tag", 12, 8, shared_with="tags"),
]
# (table dtype, dense dtype) -> the largest absolute difference from the float32 model allowed for (probabilities,
# regression values). Measured over every architecture (tables perturbed by 0.5, other weights by 0.2, 37 rows):
# float16 tables + dense at most 2.1e-4 / 1.1e-3, INT8 tables 2.6e-3 / 1.2e-2; the bounds leave 4-5x headroom.
QUANTIZED = {("float16", "float16"): (1e-3, 5e-3), ("int8", "float32"): (1e-2, 5e-2)}
# torch.export takes seconds per model (the other formats a fraction of one): every architecture's program is
# checked with INT8 tables (the gather-and-dequantize lookups) and in float32 (above); float16 tables and weights,
# which are casts of the same graph, on one single- and one multi-scenario architecture
PROGRAM_FLOAT16 = {"mmoe", "star"}


def _spread_tables(model: torch.nn.Module) -> torch.nn.Module:
    """Tables perturbed by 0.5, other weights by 0.2: outputs differ across rows and depend on the table values."""
    torch.manual_seed(0)
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.5 if id(p) in tables else 0.2) * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("dtypes", list(QUANTIZED), ids=lambda d: f"tables_{d[0]}-dense_{d[1]}")
@pytest.mark.parametrize("name", registry.names())
def test_quantized_exports_match_the_quantized_model_and_stay_close_to_float32(name, dtypes, tmp_path):
    table_dtype, dense_dtype = dtypes
    kwargs = model_arguments(name, "din_group")
    kwargs["features"] = [*kwargs["features"], *EXTRA_FEATURES]
    torch.manual_seed(0)
    model = _spread_tables(registry.create(name, **kwargs))
    batch = example_features(model.features, batch_size=37, seed=11)
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in ServingModel(model).eval()(batch).items()}
        quantized = {k: v.numpy() for k, v in serving_copy(ServingModel(model), table_dtype, dense_dtype)(batch).items()}
    kinds = model.output_kinds()
    tolerance = {"binary": QUANTIZED[dtypes][0], "regression": QUANTIZED[dtypes][1]}
    differences = {k: float(np.abs(quantized[k] - expected[k]).max()) for k in kinds}
    assert max(differences.values()) > 0  # the tables (and weights) really are stored in fewer bits
    assert max(np.std(expected[k]) for k in kinds) > 1e-3  # outputs differ across rows: the bounds mean something

    names = [f.name for f in model.features]
    options = dict(table_dtype=table_dtype, dense_dtype=dense_dtype, verification={**NO_LATENCY, "split": [{"features": batch}]})
    exports = [("onnx", export_onnx(model, tmp_path / "m.onnx", **options)),
               ("torchscript", export_torchscript(model, tmp_path / "m.pt", **options))]
    if table_dtype == "int8" or name in PROGRAM_FLOAT16:
        exports.append(("program", export_program(model, tmp_path / "m.pt2", compile=False, **options)))
    for kind, path in exports:
        served = open_runtime(path, kind, names)(batch)
        report = json.loads(report_path(path).read_text())
        assert report["passed"] and report["rows"] == 37 and report["table_dtype"] == table_dtype
        for output, output_kind in kinds.items():
            # the export computes exactly the quantized model ...
            np.testing.assert_allclose(served[output], quantized[output], rtol=0, atol=1e-5, err_msg=f"{kind} {output}")
            # ... which stays within the measured bound of the float32 model; the report says by how much
            difference = np.abs(served[output] - expected[output]).max()
            assert difference <= tolerance[output_kind], (kind, output, difference)
            assert report["outputs"][output]["max_abs_difference"] == pytest.approx(difference, abs=1e-6)
