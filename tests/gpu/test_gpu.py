"""What only a CUDA device can show: every architecture and weighting strategy on the GPU in bf16, learning, exact
mid-epoch resume, SparseAdam, export of a GPU-trained model, and TorchRecStrategy's CUDA-only parts (row-wise
sharding, fused Adam; where TorchRec is installed). Skipped where torch sees no CUDA device
(``benchmarks/gpu_check.sh`` runs this file first on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from tests.architectures.test_architectures import arguments, feature_batch  # noqa: E402
from tests.training.test_resume import assert_same_weights, fit, interrupted_then_resumed, rows_of  # noqa: E402
from tests.weighting.test_weighting_training import SPECS, TINY  # noqa: E402

from datamodules.synthetic import synthetic_features, synthetic_tasks  # noqa: E402
from mtl_lightning import MultiTaskLightningModule, registry  # noqa: E402
from mtl_lightning.architectures import MMoE  # noqa: E402

GPU = dict(accelerator="gpu", devices=1)


@pytest.mark.parametrize("name", registry.names())
def test_every_architecture_on_the_gpu_in_bf16(name):
    torch.manual_seed(0)
    model = registry.create(name, **arguments(name)).cuda()
    x = {k: v.cuda() for k, v in feature_batch(64).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(x)
    loss = sum(o.float().sum() for o in outputs.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(o.device.type == "cuda" for o in outputs.values())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_weighting_strategy_trains_on_the_gpu_in_bf16(name, synthetic_paths, quiet_trainer, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, 256)
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), **TINY), weighting=SPECS[name])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=2, precision="bf16-mixed", **GPU)
    trainer.fit(module, dm)
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_embeddings"])
def test_mmoe_learns_on_the_gpu_in_bf16(sparse, synthetic_paths, quiet_trainer, synthetic_datamodule):
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), **TINY), lr=3e-3,
                                      sparse_embeddings=sparse)
    trainer = quiet_trainer(max_epochs=2, precision="bf16-mixed", **GPU)
    trainer.fit(module, synthetic_datamodule(synthetic_paths))
    assert float(trainer.callback_metrics["val/click/auc"]) > 0.8


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
def test_mid_epoch_resume_on_the_gpu_is_exact(tmp_path_factory, streaming, quiet_trainer):
    import pyarrow.parquet as pq

    from datamodules.synthetic import make_table

    directory = tmp_path_factory.mktemp("gpu_resume") / "train"
    directory.mkdir()
    table = make_table(200, seed=3)
    pq.write_table(table.slice(0, 130), directory / "part-0.parquet", row_group_size=30)
    pq.write_table(table.slice(130), directory / "part-1.parquet", row_group_size=30)
    options = dict(deterministic=True, **GPU)
    straight = fit(quiet_trainer, directory, streaming, 0, **options)
    first, resumed = interrupted_then_resumed(quiet_trainer, directory, tmp_path_factory.mktemp("ckpt"), streaming, 0, steps=5,
                                              **options)
    assert rows_of(first.seen, 0) + rows_of(resumed.seen, 0) == rows_of(straight.seen, 0)
    assert_same_weights(straight, resumed)


@pytest.mark.parametrize("setting", [True, "auto"])
def test_batches_gathered_on_the_gpu_equal_host_batches(setting, synthetic_paths, quiet_trainer, synthetic_datamodule):
    # device_resident: the split's store is copied to the GPU once and every batch gathered there; the batches the
    # module sees equal those built on the host (pinned) and copied, in the same order (datamodules.placement)
    import lightning as L

    seen: dict[str, list] = {}
    stores: dict[str, str] = {}

    class Record(L.Callback):
        def __init__(self, key: str) -> None:
            self.key = key

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.setdefault(self.key, []).append(batch)
            stores[self.key] = trainer.datamodule.batch_store("train").device.type

    for key, resident in (("device", setting), ("host", False)):
        torch.manual_seed(0)
        module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), num_experts=2,
                                               expert_hidden=(8,), tower_hidden=()))
        dm = synthetic_datamodule(synthetic_paths, batch_size=256, device_resident=resident, pin_memory=True)
        quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[Record(key)], **GPU).fit(module, dm)
    assert stores == {"device": "cuda", "host": "cpu"}
    assert len(seen["device"]) == len(seen["host"]) == 4
    for ours, theirs in zip(seen["device"], seen["host"]):
        for section in ("features", "labels"):
            for name, value in theirs[section].items():
                assert ours[section][name].device == value.device and value.device.type == "cuda"
                assert torch.equal(ours[section][name], value), (section, name)
        assert torch.equal(ours["row_id"], theirs["row_id"])


def test_training_steps_that_log_nothing_never_wait_for_the_gpu(synthetic_paths, quiet_trainer, synthetic_datamodule):
    # the step's losses, weighting and label counts stay on the device (no .item(), no copy to the host); the values
    # of the steps the logger writes reach Lightning as host tensors, so that its progress-bar bookkeeping at every
    # later step does not wait for the GPU either (mtl_lightning.training_step)
    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                           tower_hidden=()))
    step, watched = module.training_step, []

    def training_step(batch, batch_idx):
        if module._logs_this_step(batch_idx):
            return step(batch, batch_idx)
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            return step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            watched.append(batch_idx)

    module.training_step = training_step
    trainer = quiet_trainer(max_steps=12, limit_val_batches=0, log_every_n_steps=5, **GPU)
    trainer.fit(module, synthetic_datamodule(synthetic_paths, batch_size=256))
    assert len(watched) == 9  # 12 steps, of which 5, 10 and the last log
    assert trainer.callback_metrics["train/loss"].device.type == "cpu"
    assert trainer.callback_metrics["train/click/loss"].device.type == "cpu"


def test_export_of_a_gpu_trained_model_matches(synthetic_paths, tmp_path, quiet_trainer, synthetic_datamodule):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from mtl_lightning.export import ServingModel, export_onnx, export_torchscript

    torch.manual_seed(0)
    module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), **TINY), lr=3e-3)
    quiet_trainer(max_steps=20, limit_val_batches=0, **GPU).fit(module, synthetic_datamodule(synthetic_paths))
    model = module.model.cpu().eval()
    dm = synthetic_datamodule(synthetic_paths, 64)
    dm.setup("fit")
    features = next(iter(dm.val_dataloader()))["features"]
    with torch.no_grad():
        expected = ServingModel(model).eval()(features)
    scripted = torch.jit.load(str(export_torchscript(model, tmp_path / "model.pt")))
    with torch.no_grad():
        for task, value in scripted(features).items():
            torch.testing.assert_close(value, expected[task], rtol=1e-5, atol=1e-6)
    session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / "model.onnx")))
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, {n: features[n].numpy() for n in names})
    assert len(outputs) == len(expected)
    for output, value in zip(session.get_outputs(), outputs):
        torch.testing.assert_close(torch.from_numpy(value), expected[output.name], rtol=1e-4, atol=1e-5)


@pytest.fixture
def torchrec_process_group():
    """TorchRec on one GPU: Lightning opens a 1-process nccl group; it is closed, and its variables gone, after."""
    import os

    from mtl_lightning.distributed import torchrec_available

    if not torchrec_available():
        pytest.skip("TorchRec is not installed (docs/distributed.md: install the fbgemm-gpu/torchrec release for "
                    "this torch)")
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("sharding, optimizer", [("row_wise", "adam"), ("table_row_wise", "rowwise_adagrad"),
                                                 ("table_wise", "rowwise_adagrad"), ("column_wise", "adagrad")])
def test_torchrec_learns_and_resumes_exactly_on_the_gpu(sharding, optimizer, synthetic_paths, tmp_path,
                                                        torchrec_process_group, quiet_trainer, synthetic_datamodule):
    """What TorchRec has on CUDA only (row-wise sharding, fused Adam), in bf16-mixed, with deferred tables: MMoE
    learns, and a checkpoint folder resumes to the weights of the uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mtl_lightning.distributed import TorchRecStrategy, consolidate

    def run(max_steps: int, ckpt_path=None, callbacks=()):
        strategy = TorchRecStrategy(sharding=sharding, embedding_optimizer=optimizer, embedding_lr=0.05)
        trainer = quiet_trainer(max_steps=max_steps, max_epochs=-1, precision="bf16-mixed", strategy=strategy,
                                deterministic=True, callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                                **GPU)
        torch.manual_seed(0)
        with trainer.init_module():
            module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), **TINY), lr=3e-3)
        trainer.fit(module, synthetic_datamodule(synthetic_paths), ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / f"end-{max_steps}-{ckpt_path is not None}.ckpt")
        return trainer, tmp_path / f"end-{max_steps}-{ckpt_path is not None}.ckpt"

    straight, straight_path = run(40)
    assert float(straight.callback_metrics["val/click/auc"]) > 0.75
    save = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=15, save_top_k=-1)
    run(20, callbacks=[save])  # step 15 is mid-run: a fit that ran to its end is not resumed (datamodules.partitions)
    _, resumed_path = run(40, ckpt_path=next((tmp_path / "mid").glob("*.ckpt")))
    expected, actual = consolidate(straight_path)["state_dict"], consolidate(resumed_path)["state_dict"]
    assert set(expected) == set(actual)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)
