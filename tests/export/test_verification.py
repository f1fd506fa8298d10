"""The verification report beside every export: its numbers, its splits, the thresholds failing a broken export, and
the torch.export path (AOTInductor compiled where a compiler is present, skipped with a message where not)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mtl_lightning.exported_program as exported_program
import mtl_lightning.quantized as quantized
from datamodules.serving import model_fingerprint, open_served
from datamodules.synthetic import synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, registry
from mtl_lightning.export import (ExportVerificationError, ServingModel, example_features, export_onnx, export_program,
                                  export_torchscript, main, preprocessing_path)
from mtl_lightning.exported_program import CompiledProgram, compiled_path, cpp_compiler, load_program
from mtl_lightning.verification import Verification, report_path

NO_LATENCY = {"latency_batch_sizes": ()}




def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ranked right, ties counting one half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(greater / (len(positive) * len(negative)))


def test_report_on_the_data_modules_test_split(perturbed_mmoe, tmp_path, synthetic_paths, synthetic_datamodule):
    module, dm = MultiTaskLightningModule(perturbed_mmoe(16)).eval(), synthetic_datamodule(synthetic_paths)
    path = export_onnx(module, tmp_path / "m.onnx", datamodule=dm, table_dtype="int8",
                       verification={"latency_batch_sizes": (1, 64, 512), "latency_runs": 3})
    report = json.loads(report_path(path).read_text())
    assert report["split"] == "the data module's test split" and report["rows"] == 5_000
    assert report["format"] == "onnx" and report["table_dtype"] == "int8" and report["dense_dtype"] == "float32"
    assert report["file_bytes"] == path.stat().st_size and report["passed"] and report["failures"] == []
    assert "onnxruntime" in report["runtime"] and "1 thread" in report["runtime"]
    assert set(report["latency_ms"]) == {"1", "64", "512"}
    assert all(0 < t["p50"] <= t["p99"] for t in report["latency_ms"].values())

    batches = list(dm.test_dataloader())  # the same rows, metrics computed here by hand
    with torch.no_grad():
        predicted = [ServingModel(module)(b["features"]) for b in batches]
    for task in ("click", "conversion"):
        p = torch.cat([o[task] for o in predicted]).numpy().astype(np.float64)
        y = torch.cat([b["labels"][task] for b in batches]).numpy()
        keep = (y == 0) | (y == 1)  # conversion: -1 on rows without a click
        p, y = p[keep], y[keep]
        entry = report["outputs"][task]
        assert entry["labelled_rows"] == keep.sum() and (task == "click") == (keep.sum() == 5_000)
        assert entry["reference"]["auc"] == pytest.approx(_auc(p, y), abs=1e-6)
        assert entry["reference"]["log_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), abs=1e-6)
        assert entry["reference"]["pcoc"] == pytest.approx(p.sum() / y.sum(), rel=1e-6)
        assert entry["auc_drop"] == pytest.approx(entry["reference"]["auc"] - entry["exported"]["auc"], abs=1e-12)
        assert 0 < entry["max_abs_difference"] < 0.01 and abs(entry["auc_drop"]) < 0.002
    assert report["outputs"]["dwell"]["kind"] == "regression" and "mse" in report["outputs"]["dwell"]["reference"]
    page = report_path(path, ".md").read_text()
    assert "| click | binary |" in page and "| 512 |" in page and "Result: passed." in page

    # a Parquet path is read with the preprocessing file the export wrote: the same rows give the same numbers
    script = export_torchscript(module, tmp_path / "m.pt", datamodule=dm, table_dtype="int8",
                                verification={**NO_LATENCY, "split": str(synthetic_paths["test"])})
    other = json.loads(report_path(script).read_text())
    assert other["split"] == f"Parquet {synthetic_paths['test']}" and other["rows"] == 5_000
    for task in ("click", "conversion"):
        assert other["outputs"][task]["reference"] == pytest.approx(report["outputs"][task]["reference"], abs=1e-6)
        assert other["outputs"][task]["exported"]["auc"] == pytest.approx(report["outputs"][task]["exported"]["auc"],
                                                                          abs=1e-6)


_quantize_rows = quantized.quantize_rows


def _broken_quantize_rows(weight: torch.Tensor):
    """Row-wise INT8 that reflects every row (code 255 - q): what a wrong dequantization formula would serve."""
    codes, scale, offset = _quantize_rows(weight)
    return 255 - codes, scale, offset


def test_a_broken_export_fails_its_thresholds_and_is_renamed(perturbed_mmoe, tmp_path, monkeypatch):
    module = MultiTaskLightningModule(perturbed_mmoe(16)).eval()
    batch = example_features(module.model.features, batch_size=400, seed=1)
    with torch.no_grad():
        reference = ServingModel(module)(batch)
    # labels that the float32 model ranks perfectly: a broken export loses AUC on them
    labels = {t: (reference[t] > reference[t].median()).float() for t in ("click", "conversion")}
    split = [{"features": batch, "labels": labels}]
    thresholds = dict(split=split, max_auc_drop=0.002, max_probability_difference=0.01, **NO_LATENCY)
    healthy = export_onnx(module, tmp_path / "good.onnx", table_dtype="int8", verification=thresholds)
    assert json.loads(report_path(healthy).read_text())["passed"]  # a correct INT8 export passes the same thresholds

    monkeypatch.setattr(quantized, "quantize_rows", _broken_quantize_rows)
    with pytest.raises(ExportVerificationError, match=r"m\.onnx failed its verification .*click: AUC drop .*"
                                                      r"max_auc_drop 0\.002.*max_probability_difference 0\.01"):
        export_onnx(module, tmp_path / "m.onnx", table_dtype="int8", verification=thresholds)
    assert not (tmp_path / "m.onnx").exists() and (tmp_path / "m.rejected.onnx").exists()  # nothing serves it by name
    report = json.loads(report_path(tmp_path / "m.onnx").read_text())
    assert not report["passed"] and report["outputs"]["click"]["auc_drop"] > 0.002
    assert report["max_probability_difference"] > 0.01
    assert any(f.startswith("conversion: largest absolute difference") for f in report["failures"])
    assert "Result: FAILED: click: AUC drop" in report_path(tmp_path / "m.onnx", ".md").read_text()
    with pytest.raises(ExportVerificationError, match="pt failed its verification"):  # every format checks
        export_torchscript(module, tmp_path / "m.pt", table_dtype="int8", verification=thresholds)


def test_verification_options_are_checked(perturbed_mmoe, tmp_path):
    module = MultiTaskLightningModule(perturbed_mmoe(16)).eval()
    with pytest.raises(ValueError, match="max_auc_drop needs labelled rows, but no labelled split"):
        export_onnx(module, tmp_path / "m.onnx", verification={"max_auc_drop": 0.01})
    with pytest.raises(ValueError, match="split 'test' names a data module split, but no data module object"):
        export_onnx(module, tmp_path / "m.onnx", verification={"split": "test"})
    with pytest.raises(ValueError, match="max_probability_difference must be a number >= 0, got -1"):
        Verification(max_probability_difference=-1)
    with pytest.raises(ValueError, match=r"no such Parquet file"):
        export_onnx(module, tmp_path / "m.onnx", verification={"split": str(tmp_path / "missing.parquet")})
    # without labels the report still compares the two models on generated rows; the model keeps its mode
    module.train()
    path = export_onnx(module, tmp_path / "m.onnx", verification={**NO_LATENCY, "max_probability_difference": 1e-5})
    assert module.training and module.model.training
    report = json.loads(report_path(path).read_text())
    assert report["rows"] == 512 and report["split"].startswith("no labelled split")
    assert report["passed"] and report["max_probability_difference"] < 1e-5 and "auc_drop" not in report["outputs"]["click"]


def test_program_without_a_compiler_is_written_and_says_so(perturbed_mmoe, tmp_path, monkeypatch):
    module = MultiTaskLightningModule(perturbed_mmoe(4)).eval()
    monkeypatch.setattr(exported_program, "cpp_compiler", lambda: None)
    with pytest.warns(UserWarning, match=r"AOTInductor compile skipped: no C\+\+ compiler found .* holds the exported "
                                         r"program, served with torch\.export\.load"):
        path = export_program(module, tmp_path / "m.pt2", table_dtype="int8", verification=NO_LATENCY)
    assert path.exists() and not compiled_path(path).exists()
    report = json.loads(report_path(path).read_text())
    assert report["served_file"] == "m.pt2" and "exported program" in report["runtime"] and report["passed"]
    files = {"preprocessing_fingerprint": ""}
    program = torch.export.load(str(path), extra_files=files).module()
    assert files["preprocessing_fingerprint"] == json.loads(preprocessing_path(path).read_text())["fingerprint"]
    batch = example_features(module.model.features, batch_size=3, seed=2)
    with torch.no_grad():
        expected = ServingModel(module)(batch)
        served = program(batch)
    for task in expected:
        torch.testing.assert_close(served[task], expected[task], rtol=0, atol=0.01)


@pytest.mark.skipif(cpp_compiler() is None, reason="AOTInductor needs a C++ compiler ($CXX or g++)")
def test_program_compiled_by_aotinductor_serves_any_batch_size(tmp_path):
    torch.manual_seed(0)
    model = registry.create("shared_bottom", features=synthetic_features(embedding_dim=4)[:5], tasks=synthetic_tasks(),
                            bottom_hidden=(8,), tower_hidden=(4,)).eval()
    path = export_program(model, tmp_path / "m.pt2", table_dtype="int8",
                          verification={"latency_batch_sizes": (1, 64), "latency_runs": 2})
    package = compiled_path(path)
    assert package.name == "m.aoti.pt2" and package.exists()
    report = json.loads(report_path(path).read_text())
    assert report["served_file"] == "m.aoti.pt2" and "AOTInductor" in report["runtime"] and report["passed"]
    loaded = load_program(package)
    assert loaded.get_metadata()["preprocessing_fingerprint"] == json.loads(preprocessing_path(path).read_text())["fingerprint"]
    served, preprocess = open_served(package)  # finds m.preprocessing.json, the file of its program
    assert isinstance(served, CompiledProgram) and preprocess.fingerprint == model_fingerprint(package)
    for batch_size in (1, 37):
        batch = example_features(model.features, batch_size=batch_size, seed=batch_size)
        # columns sliced out of wider tensors, as a data module's batches hold them: the package reads contiguous
        # inputs only, so load_program makes them contiguous (without it, these strides give wrong outputs)
        batch = {k: torch.stack([v, torch.zeros_like(v)], dim=1)[:, 0] for k, v in batch.items()}
        assert batch["user_id"].stride() == (2,)
        with torch.no_grad():
            expected = ServingModel(model)(batch)
            quantized_model = quantized.serving_copy(ServingModel(model), "int8")(batch)
        served = loaded(batch)
        for task in expected:
            assert served[task].shape == (batch_size,)
            torch.testing.assert_close(served[task], quantized_model[task], rtol=0, atol=1e-5)


def test_command_line_exports_quantized_files_with_reports(perturbed_mmoe, tmp_path, synthetic_paths):
    module = MultiTaskLightningModule(perturbed_mmoe(16)).eval()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    main([str(ckpt), "--onnx", str(tmp_path / "m.onnx"), "--program", str(tmp_path / "m.pt2"), "--no-compile",
          "--table-dtype", "int8", "--dense-dtype", "float16", "--split", str(synthetic_paths["test"]),
          "--max-auc-drop", "0.002", "--max-probability-difference", "0.01", "--latency-runs", "2"])
    for model_file in ("m.onnx", "m.pt2"):
        report = json.loads(report_path(tmp_path / model_file).read_text())
        assert report["passed"] and report["rows"] == 5_000 and report["dense_dtype"] == "float16"
        assert report["thresholds"] == {"max_auc_drop": 0.002, "max_probability_difference": 0.01}
        assert (tmp_path / f"{model_file}.verification.md").exists()
