"""configs/sequences/mmoe_din.yaml on configs/data/synthetic_sequences.yaml: MMoE with a DIN group over the two
histories (sharing the candidates' vocabularies and tables) and a DCN-v2 interaction, from the command line to an
ONNX export that gives predict_step's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from datamodules.synthetic_sequences import write_sequence_synthetic
from mtl_lightning import MultiTaskLightningModule, SequenceFeature
from mtl_lightning.cli import build_cli
from mtl_lightning.export import main as export_main
from mtl_lightning.layers import FeatureEmbedding

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LAYERS = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "data" / "synthetic_sequences.yaml"),
          "--config", str(CONFIGS / "sequences" / "mmoe_din.yaml")]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


def test_mmoe_with_a_din_group_and_dcn_v2_trains_and_exports(tmp_path, monkeypatch):
    paths = write_sequence_synthetic(tmp_path / "data", (600, 200, 200), max_history=8)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    cli = build_cli(["fit", *LAYERS, f"--data.train={paths['train']}", f"--data.val={paths['val']}",
                     f"--data.test={paths['test']}", "--data.batch_size=100", "--data.embedding_dim=8",
                     "--trainer.max_steps=3", "--trainer.max_epochs=1", *QUIET])
    model = cli.model.model
    assert type(model).__name__ == "MMoE" and cli.trainer.global_step == 3
    specs = {f.name: f for f in model.features}
    vocabulary = cli.datamodule.encoders["item_id"].num_ids
    assert specs["hist_item"] == SequenceFeature(
        "hist_item", vocabulary, max_len=8, embedding_dim=8, pooling="din", shared_with="item_id", query="item_id",
        group="hist", pooling_options={"attention_hidden": [64, 32]})
    assert specs["hist_category"].shared_with == "category" and specs["hist_category"].group == "hist"
    layer = next(m for m in model.modules() if isinstance(m, FeatureEmbedding))
    assert list(layer.encoders) == ["hist"] and type(layer.interaction).__name__ == "DCNv2"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert Path(cli.trainer.log_dir).parent.name == "mmoe_din"

    checkpoint = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    export_main([str(checkpoint), "--onnx", str(tmp_path / "model.onnx")])
    module = MultiTaskLightningModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    batch = next(iter(cli.datamodule.dataset("val")))
    with torch.no_grad():
        expected = module.predict_step(batch, 0)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = dict(zip(module.model.output_names, session.run(None, {k: v.numpy() for k, v in batch["features"].items()})))
    for name in ("click", "conversion", "dwell"):
        np.testing.assert_allclose(outputs[name], expected[name].numpy(), rtol=0, atol=1e-5)
