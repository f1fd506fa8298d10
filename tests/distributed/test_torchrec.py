"""``TorchRecStrategy``: sharded tables with fused optimizers, on CPU with gloo (1 process here, 2 in a script).

The 2-process runs live in ``tests/scripts/torchrec_two_ranks.py`` (Lightning
re-launches the running script once per rank, which it cannot do from inside
pytest); the module fixture starts it once and the tests read what it wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import ParquetDataModule
from datamodules.synthetic import make_table, synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, SequenceFeature, SparseFeature, registry
from mtl_lightning.distributed import torchrec_available
from mtl_lightning.layers import FeatureEmbedding
from tests.architectures.test_architectures import FEATURES, arguments, feature_batch

pytestmark = pytest.mark.skipif(
    not torchrec_available(),
    reason="TorchRec is not installed (`make setup` installs it: fbgemm-gpu-cpu and torchrec with --no-deps)",
)
SCRIPT = Path(__file__).parents[1] / "scripts" / "torchrec_two_ranks.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("torchrec_two_ranks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# what Lightning's 1-process group leaves in os.environ; a launched script must not inherit it
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """Lightning starts a 1-process gloo group for the strategy here; closed, and its variables gone, afterwards."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def trainer(strategy, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(strategy=strategy, **{**defaults, **kwargs})


def labelled(step: int, size: int = 64) -> dict:
    return _script_module().global_batch(step, size)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


# ----------------------------------------------------------------- the adapter
def test_torchrec_layer_computes_what_feature_embedding_computes():
    from mtl_lightning.distributed.embedding import TorchRecEmbedding

    features = [*FEATURES,
                SequenceFeature("tags", 30, max_len=4, embedding_dim=8, pooling="max"),
                SparseFeature("last_tag", 30, 8, shared_with="tags"),  # a sparse feature reading a sequence's table
                SequenceFeature("tag_sum", 30, max_len=4, embedding_dim=8, pooling="sum", shared_with="tags")]
    torch.manual_seed(0)
    layer = FeatureEmbedding(features, field_view=True)
    x = feature_batch(16)
    g = torch.Generator().manual_seed(1)
    x.update(tags=torch.randint(0, 30, (16, 4), generator=g), tag_sum=torch.randint(0, 30, (16, 4), generator=g),
             last_tag=torch.randint(0, 30, (16,), generator=g))
    x["tags"][1] = 0  # all padding
    x["last_tag"][0] = 0  # the sequence table's padding row: zeros
    adapted = TorchRecEmbedding(layer)
    assert adapted.bags is not None and adapted.sequences is not None  # max pooling is served unpooled
    assert set(adapted.tables) == {"user", "item", "tags"}  # one table per owner; sharers are more keys
    for view in ("flat", "field"):
        torch.testing.assert_close(adapted(x, view=view), layer(x, view=view), rtol=0, atol=1e-6)
    # the same values as the fused layout, and ids checked like FeatureEmbedding checks them
    torch.testing.assert_close(adapted.table_tensors()["item"], layer.table_weight("item"))
    with pytest.raises(ValueError, match="feature 'user' has id 50, outside"):
        adapted({**x, "user": torch.full((16,), 50)})


@pytest.mark.parametrize("interaction", [None, "senet"])
def test_torchrec_layer_encodes_sequence_groups_as_feature_embedding_does(interaction):
    """A DIN group of aligned sequences (one sharing a sparse feature's block) read from the EmbeddingCollection,
    every position kept (a padded category inside a valid click stays aligned), then an interaction: the same
    outputs and gradients as ``FeatureEmbedding``."""
    from mtl_lightning.distributed.embedding import TorchRecEmbedding
    from tests.architectures.test_architectures import GROUP_FEATURES

    torch.manual_seed(0)
    layer = FeatureEmbedding(GROUP_FEATURES, interaction=interaction)
    x = feature_batch(16)
    x["history_cat"][2, 0] = 0  # a click without a category: the position stays valid through its item
    adapted = TorchRecEmbedding(layer)
    assert adapted.tables["item"].unpooled and adapted.tables["history_cat"].unpooled
    assert adapted.encoders is layer.encoders and adapted.interaction is layer.interaction
    out, expected = adapted(x), layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert adapted.feature_slices() == layer.feature_slices() and adapted.output_dim == layer.output_dim
    ours = torch.autograd.grad(out.square().sum(), list(layer.encoders.parameters()))
    theirs = torch.autograd.grad(expected.square().sum(), list(layer.encoders.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------- every architecture, 1 process
# eager tables (built as usual) are the dcn_v2 case; deferred ones (inside init_module) the plain and DIN cases
@pytest.mark.parametrize("deferred, inputs", [(True, "plain"), (True, "din_group"), (False, "dcn_v2")],
                         ids=["deferred", "din_group", "dcn_v2"])
@pytest.mark.parametrize("name", registry.names())
def test_every_architecture_trains_under_the_strategy(name, deferred, inputs):
    """Built as usual, or inside ``trainer.init_module()`` (deferred tables: no whole table is ever allocated); with
    the plain input, a DIN-encoded group of aligned sequences (read from the EmbeddingCollection) or a DCN-v2
    interaction."""
    if inputs == "dcn_v2" and registry.get(name).interaction_refused:
        inputs = "plain"  # an architecture refusing interactions trains its eager tables with the plain input
    from mtl_lightning.distributed import TorchRecStrategy

    torch.manual_seed(0)
    strategy = TorchRecStrategy(sharding="auto", embedding_lr=0.1, find_unused_parameters=name == "escm")
    fit = trainer(strategy, max_epochs=4, callbacks=[losses := Losses()], use_distributed_sampler=False)
    with fit.init_module(empty_init=deferred):
        # the unnormalised DIN weights sum over the positions: a smaller step keeps every architecture stable
        module = MultiTaskLightningModule(registry.create(name, **arguments(name, inputs)),
                                          lr=0.01 if inputs == "din_group" else 0.03)
    embedding = module.model.embedding
    assert embedding.deferred == deferred
    before = {n: (embedding.initial_rows(n, 0, embedding.table_weight(n).shape[0]) if deferred
                  else embedding.table_weight(n).detach().clone()) for n in ("user", "item")}
    batches = [labelled(k) for k in range(4)]
    fit.fit(module, DataLoader(batches, batch_size=None))
    assert len(losses.values) == 16
    first, last = np.mean(losses.values[:4]), np.mean(losses.values[-4:])  # the same 4 batches each epoch
    assert last < 0.95 * first, f"{name}: {[round(v, 3) for v in losses.values]}"
    tables = {n: t for layer in strategy._layers.values() for n, t in layer.table_tensors().items()}
    for n, value in before.items():  # the fused optimizer moved the rows the batches touched
        local = value.new_zeros(value.shape)
        for shard in tables[n].local_shards() if hasattr(tables[n], "local_shards") else []:
            o, s = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            local[o[0]:o[0] + s[0], o[1]:o[1] + s[1]] = shard.tensor
        if not hasattr(tables[n], "local_shards"):
            local = tables[n]
        assert (local - value).abs().amax(dim=1).gt(0).sum() >= 20, n


# ------------------------------------------------------------------ weighting
@pytest.mark.parametrize("weighting", ["pcgrad", "dbmtl", "excess_mtl", "modo"])
def test_weighting_on_per_task_table_gradients_is_refused(weighting):
    from mtl_lightning.distributed import TorchRecStrategy

    module = MultiTaskLightningModule(registry.create("mmoe", **arguments("mmoe")), weighting=weighting)
    with pytest.raises(ValueError, match=r"per-task gradients .* embedding tables included.*\(dwa, .*gradnorm, .*static.*"
                                         r"mgda\(upper_bound=True"):
        trainer(TorchRecStrategy(), max_steps=1).fit(module, DataLoader([labelled(0)], batch_size=None))


def test_gradnorm_trains_tables_and_weights_under_the_strategy():
    from mtl_lightning.distributed import TorchRecStrategy

    torch.manual_seed(0)
    module = MultiTaskLightningModule(registry.create("mmoe", **arguments("mmoe")), lr=0.01,
                                      weighting={"name": "gradnorm", "lr": 0.05})
    strategy = TorchRecStrategy(sharding="table_wise", embedding_optimizer="sgd", embedding_lr=0.5)
    item = module.model.embedding.table_weight("item").detach().clone()
    batches = [labelled(k) for k in range(4)]

    def task_losses() -> float:  # unweighted, over the training batches
        with torch.no_grad():
            return sum(float(sum(module.compute_losses(module(b["features"]), b["labels"]).values())) for b in batches)

    before = task_losses()
    run = trainer(strategy, max_epochs=3, use_distributed_sampler=False)
    run.fit(module, DataLoader(batches, batch_size=None))
    validated = run.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]  # the same sharded model
    assert validated["val/loss"] < before / len(batches)
    assert module.weighting.backward_through_model
    weights = module.weighting.weights.detach()
    assert not torch.allclose(weights, torch.ones(3)) and float(weights.sum()) == pytest.approx(3.0)
    table = strategy._layers["model.embedding"].table_tensors()["item"].local_shards()[0].tensor
    assert (table - item).abs().amax(dim=1).gt(0).sum() >= 20  # the tables learnt, in the backward pass
    assert task_losses() < 0.9 * before


# ------------------------------------------------------------------- arguments
def test_arguments_are_checked_with_messages():
    from mtl_lightning.distributed import TorchRecStrategy

    with pytest.raises(ValueError, match="sharding must be one of"):
        TorchRecStrategy(sharding="by_row")
    with pytest.raises(ValueError, match="embedding_optimizer must be one of"):
        TorchRecStrategy(embedding_optimizer="lamb")
    with pytest.raises(ValueError, match="embedding_lr must be a finite number"):
        TorchRecStrategy(embedding_lr=float("nan"))
    with pytest.raises(ValueError, match=r"\['momentum'\] are not supported for 'sgd'"):
        TorchRecStrategy(embedding_optimizer="sgd", embedding_optimizer_kwargs={"momentum": 0.9})
    batches = DataLoader([labelled(0)], batch_size=None)
    for strategy, message in [
        (TorchRecStrategy(sharding="row_wise"), "'row_wise' .* needs CUDA"),
        (TorchRecStrategy(sharding="table_wise", embedding_optimizer="adam"), "'adam' has no fused kernel on cpu"),
    ]:
        module = MultiTaskLightningModule(registry.create("mmoe", **arguments("mmoe")))
        with pytest.raises(ValueError, match=message):
            trainer(strategy, max_steps=1).fit(module, batches)
    module = MultiTaskLightningModule(registry.create("mmoe", **arguments("mmoe")), sparse_embeddings=True)
    with pytest.raises(ValueError, match="sparse_embeddings=True cannot be combined with TorchRecStrategy"):
        trainer(TorchRecStrategy(), max_steps=1).fit(module, batches)


def test_the_library_imports_without_torchrec(monkeypatch):
    code = ("import sys; import mtl_lightning, mtl_lightning.distributed, mtl_lightning.export; "
            "assert 'torchrec' not in sys.modules and 'fbgemm_gpu' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    from mtl_lightning.distributed import TorchRecStrategy

    monkeypatch.setitem(sys.modules, "torchrec", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0"):
        TorchRecStrategy()


# ------------------------------------------------------------ checkpoints, 1 process
def test_data_parallel_tables_with_adam_resume_exactly(tmp_path):
    """data_parallel tables (any torch optimizer, here Adam on CPU): their optimizer state goes to the folder too."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mtl_lightning.distributed import TorchRecStrategy, consolidate

    batches = [labelled(k) for k in range(3)]

    def fit(directory: str, ckpt_path: Path | None = None) -> None:
        torch.manual_seed(0)
        module = MultiTaskLightningModule(registry.create("mmoe", **arguments("mmoe")), lr=0.01)
        saver = ModelCheckpoint(dirpath=tmp_path / directory, filename="{epoch}", save_top_k=-1)
        strategy = TorchRecStrategy(sharding="data_parallel", embedding_optimizer="adam", embedding_lr=0.05)
        trainer(strategy, max_epochs=3, callbacks=[saver], enable_checkpointing=True,
                use_distributed_sampler=False).fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)

    fit("straight")
    fit("resumed", tmp_path / "straight" / "epoch=0.ckpt")
    assert sorted(p.name for p in (tmp_path / "straight" / "epoch=0.ckpt").iterdir()) == \
        [".metadata", "__0_0.distcp", "meta.pt"]
    straight, resumed = (consolidate(tmp_path / d / "epoch=2.ckpt")["state_dict"] for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and "model.embedding.fused.dim8.weight" in straight
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    # without the Adam moments of the tables the resumed run drifts: they were restored, not reset
    from mtl_lightning.distributed.checkpoint import stored_keys

    assert {"table_optimizer.model.embedding.item.momentum1", "table_optimizer.model.embedding.item.momentum2"} \
        <= set(stored_keys(tmp_path / "straight" / "epoch=0.ckpt"))


def test_checkpoint_index_is_read_as_data(tmp_path):
    import pickle

    from mtl_lightning.distributed.checkpoint import consolidate

    folder = tmp_path / "evil.ckpt"
    folder.mkdir()
    torch.save({"torchrec": {"format": 1, "tables": []}, "state_dict": {}}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(print))  # a callable, not DCP metadata
    with pytest.raises(ValueError, match="not a torch.distributed.checkpoint index .*never code"):
        consolidate(folder)
    with pytest.raises(ValueError, match="not one written by TorchRecStrategy"):
        MultiTaskLightningModule.load_from_checkpoint(tmp_path)


# ------------------------------------------------------------------ 2 processes
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torchrec")
    data, out = root / "data", root / "out"
    (data / "val").mkdir(parents=True)
    out.mkdir()
    pq.write_table(make_table(2000, seed=0, max_history=5), data / "train.parquet")
    val = make_table(1001, seed=1, max_history=5)  # two files: shards of 500 and 501 rows, 5 and 6 batches
    pq.write_table(val.slice(0, 700), data / "val" / "part-0.parquet")
    pq.write_table(val.slice(700), data / "val" / "part-1.parquet")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("PL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(SCRIPT), str(data), str(out)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def _reference(name: str) -> dict[str, torch.Tensor]:
    """The architecture trained in one process, without TorchRec, on the whole batch of every step."""
    script = _script_module()
    module = script.build(name)
    batches = [script.global_batch(k % 2) for k in range(script.STEPS)]
    L.Trainer(accelerator="cpu", devices=1, max_steps=script.STEPS, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(batches, batch_size=None))
    return module.state_dict()


@pytest.mark.parametrize("name", ["mmoe", "hmoe", "esmm"])
def test_two_ranks_match_one_process_without_torchrec(two_ranks, name):
    """Every sharding on 2 ranks (half a batch each) follows the unsharded model fed the whole batch, step by step."""
    from mtl_lightning.distributed import consolidate

    reference = _reference(name)
    for sharding in ("table_wise", "column_wise", "data_parallel"):
        state = consolidate(two_ranks / f"{name}-{sharding}.ckpt")["state_dict"]
        assert set(state) == set(reference)
        for key, value in state.items():
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=2e-5, msg=f"{sharding} {key}")
        losses = [json.loads((two_ranks / f"losses-{name}-{sharding}-rank{r}.json").read_text()) for r in (0, 1)]
        assert len(losses[0]) == len(losses[1]) == 6
        mean = np.mean(losses, axis=0)  # the two ranks' losses: the whole batch's
        assert mean[-2:].mean() < mean[:2].mean()  # batches 0, 1, 0, 1, 0, 1


@pytest.mark.parametrize("name, inputs", _script_module().EVERY)
def test_two_ranks_train_every_architecture(two_ranks, name, inputs):
    """Every registered architecture on 2 ranks (table_wise), also with a DIN group (some with an interaction): the
    whole batch's loss goes down."""
    losses = np.mean([json.loads((two_ranks / f"losses-every-{name}-{inputs}-rank{r}.json").read_text())
                      for r in (0, 1)], axis=0)  # the two ranks' losses: the whole batch's
    assert len(losses) == _script_module().EVERY_STEPS
    first, last = losses[:2].mean(), losses[-2:].mean()  # batches 0, 1, 0, 1, ...
    assert last < 0.95 * first, f"{name}: {[round(v, 3) for v in losses]}"


def test_two_ranks_deferred_tables_start_from_rank_zeros_seed_in_any_sharding(two_ranks):
    """Built inside ``trainer.init_module()`` with a different seed per rank: every sharding starts where a
    one-process deferred build with rank 0's seed, materialised, starts (tables from ``initial_rows``)."""
    from mtl_lightning.distributed import consolidate
    from mtl_lightning.layers import deferred_tables

    script = _script_module()
    torch.manual_seed(0)
    with deferred_tables():
        module = MultiTaskLightningModule(registry.create("mmoe", **script.mmoe_arguments()))
    module.model.embedding.materialize_tables()
    expected = module.state_dict()
    for sharding in ("column_wise", "table_wise"):
        state = consolidate(two_ranks / f"deferred-{sharding}.ckpt")["state_dict"]
        assert set(state) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{sharding} {key}")
    assert expected["model.embedding.tables.tags.weight"][0].abs().sum() == 0  # a sequence table's padding row


def test_two_ranks_resume_exactly_and_reload_into_another_sharding(two_ranks):
    runs = [json.loads((two_ranks / f"parquet-rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[0]["straight"] == runs[1]["straight"]  # synced metrics
    for run in runs:
        assert run["resumed"] == run["straight"]  # resumed from epoch 0: the same numbers to the last bit
        # the epoch-0 checkpoint validated under table_wise and under column_wise sharding: the same model
        assert run["first_epoch_column_wise"] == pytest.approx(run["first_epoch_table_wise"], abs=1e-6)
        assert run["straight"]["val/click/auc"] > run["first_epoch_table_wise"]["val/click/auc"] > 0.6
    from mtl_lightning.distributed import consolidate

    straight, resumed = (consolidate(two_ranks / d / "epoch=1.ckpt")["state_dict"] for d in ("straight", "resumed"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_two_ranks_evaluate_uneven_shards(two_ranks):
    """500 and 501 validation rows in batches of 100: the short rank runs an empty batch; every row predicted once."""
    runs = [json.loads((two_ranks / f"parquet-rank{r}.json").read_text()) for r in (0, 1)]
    assert [run["predicted_batches"] for run in runs] == [6, 6]
    assert sorted(runs[0]["predicted_rows"] + runs[1]["predicted_rows"]) == list(range(1001))


def test_two_rank_checkpoint_in_one_process_sharded_plain_and_exported(two_ranks, tmp_path):
    """The 2-rank folder: validated under the strategy in 1 process, loaded into a plain module, exported."""
    import onnxruntime as ort

    from mtl_lightning.distributed import TorchRecStrategy
    from mtl_lightning.export import ServingModel, export_onnx, export_torchscript

    folder = two_ranks / "straight" / "epoch=1.ckpt"
    expected = json.loads((two_ranks / "parquet-rank0.json").read_text())["straight"]
    features = synthetic_features(embedding_dim=8, max_history=5)
    data = two_ranks.parent / "data"

    def datamodule() -> ParquetDataModule:
        return ParquetDataModule(train=data / "train.parquet", val=data / "val", tasks=synthetic_tasks(),
                                 features=features, batch_size=100)

    plain = MultiTaskLightningModule.load_from_checkpoint(folder)
    assert isinstance(plain.model.embedding, FeatureEmbedding)
    metrics = trainer("auto").validate(plain, datamodule(), verbose=False)[0]
    assert metrics == pytest.approx(expected, abs=1e-5)
    sharded = MultiTaskLightningModule.load_from_checkpoint(folder)
    metrics = trainer(TorchRecStrategy(sharding="column_wise")).validate(sharded, datamodule(), verbose=False,
                                                                            ckpt_path=folder)[0]
    assert metrics == pytest.approx(expected, abs=1e-5)

    example = {k: v[:32] for k, v in next(iter(datamodule().val_dataloader()))["features"].items()}
    with torch.no_grad():
        served = ServingModel(plain.eval())(example)
    scripted = torch.jit.load(str(export_torchscript(plain, tmp_path / "model.pt")))(example)
    session = ort.InferenceSession(str(export_onnx(plain, tmp_path / "model.onnx")))
    onnx_out = session.run(None, {i.name: example[i.name].numpy() for i in session.get_inputs()})
    for k, name in enumerate(plain.model.output_names):
        torch.testing.assert_close(scripted[name], served[name])
        np.testing.assert_allclose(onnx_out[k], served[name].numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- CLI
def test_cli_trains_and_validates_with_the_strategy_by_class_path(tmp_path, monkeypatch):
    from datamodules.synthetic import write_synthetic
    from mtl_lightning.cli import build_cli

    paths = write_synthetic(tmp_path / "data", (600, 200, 200))
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(Path(__file__).parents[2] / "configs" / "base.yaml"),
              "--config", str(Path(__file__).parents[2] / "configs" / "data" / "synthetic.yaml"),
              "--config", str(Path(__file__).parents[2] / "configs" / "mmoe.yaml"), f"--data.train={paths['train']}",
              f"--data.val={paths['val']}", f"--data.test={paths['test']}", "--data.batch_size=200",
              "--data.embedding_dim=4",
              "--model.model.init_args.expert_hidden=[8]", "--model.model.init_args.tower_hidden=[4]",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.strategy=mtl_lightning.distributed.TorchRecStrategy",
              "--trainer.strategy.init_args.sharding=table_wise", "--trainer.strategy.init_args.embedding_lr=0.05"]
    assert build_cli(common, run=False).model.model.embedding.deferred  # each rank allocates its shards only
    by_name = build_cli([*common[:-3], "--trainer.strategy=torchrec"], run=False)  # the registered name
    assert type(by_name.trainer.strategy).__name__ == "TorchRecStrategy" and by_name.model.model.embedding.deferred
    cli = build_cli(["fit", *common, "--trainer.max_epochs=2"])
    assert type(cli.trainer.strategy).__name__ == "TorchRecStrategy" and cli.trainer.strategy.sharding == "table_wise"
    checkpoints = list(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=1-step=6.ckpt"]  # epoch 0's folder was removed when replaced
    checkpoint = checkpoints[0]
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # a folder: tables written by DCP
    validated = build_cli(["validate", *common, f"--ckpt_path={checkpoint}", "--trainer.logger=false"])
    auc = validated.trainer.callback_metrics["val/click/auc"]
    assert torch.isclose(auc, cli.trainer.callback_metrics["val/click/auc"])  # the same weights


def test_stem_shards_the_shared_and_every_task_embedding():
    """STEM under the strategy: its T + 1 FeatureEmbedding layers are all sharded and every task's tables learn."""
    from mtl_lightning.distributed import TorchRecStrategy

    torch.manual_seed(0)
    module = MultiTaskLightningModule(registry.create("stem", **arguments("stem")), lr=0.01)
    layers = {"model.embedding": module.model.embedding,
              **{f"model.task_embeddings.{t}": e for t, e in module.model.task_embeddings.items()}}
    before = {path: layer.table_weight("user").detach().clone() for path, layer in layers.items()}
    strategy = TorchRecStrategy(sharding="table_wise", embedding_optimizer="sgd", embedding_lr=0.5)
    trainer(strategy, max_epochs=1, use_distributed_sampler=False).fit(
        module, DataLoader([labelled(k) for k in range(2)], batch_size=None))
    assert set(strategy._layers) == set(layers)
    for path, value in before.items():
        table = strategy._layers[path].table_tensors()["user"]
        local = table.local_shards()[0].tensor if hasattr(table, "local_shards") else table
        assert local.shape == value.shape
        assert (local - value).abs().amax(dim=1).gt(0).sum() >= 20, path  # each task's own table moved too
