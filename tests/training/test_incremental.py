"""Day-by-day training through ``s3://``: day 2's folder trained from day 1's checkpoint with grown vocabularies.

The data and the checkpoints live in a bucket of the local S3 server (moto,
started by the ``s3_server`` fixture of ``tests/conftest.py``). Day 2 brings shops never seen on day 1: they
get their own ids and embedding rows, day 1's shops keep theirs, and until day 2
trains, the model answers for day-1 rows exactly as day 1's model did.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import lightning as L

from datamodules import ParquetDataModule
from datamodules.encoders import VocabularyEncoder
from datamodules.synthetic import make_table, synthetic_features, synthetic_tasks
from mtl_lightning import MultiTaskLightningModule, SparseFeature
from mtl_lightning.architectures import MMoE
from mtl_lightning.layers.embedding import FeatureEmbedding, grown_rows


_BUCKETS = itertools.count()
DAY1, DAY2, DAY3 = "day=2026-11-01", "day=2026-11-02", "day=2026-11-03"


def day_table(rows: int, shops: range, first_id: int) -> pa.Table:
    """Synthetic rows with a raw string column ``shop`` drawn from ``shops``."""
    table = make_table(rows, seed=first_id)
    rng = np.random.default_rng(first_id)
    table = table.append_column("shop", pa.array([f"shop-{i}" for i in rng.choice(list(shops), rows)]))
    return table.append_column("rid", pa.array(np.arange(first_id, first_id + rows), pa.int64()))


@pytest.fixture
def days(s3_server) -> str:
    """``s3://<bucket>/logs/day=.../``: day 1 has shops 0-19, day 2 shops 10-29 (10 new), day 3 shops 0-29."""
    bucket = f"incremental-{next(_BUCKETS)}"
    s3 = s3_server.filesystem()
    s3.mkdir(bucket)
    for day, shops, first in ((DAY1, range(20), 0), (DAY2, range(10, 30), 1000), (DAY3, range(30), 2000)):
        with s3.open(f"{bucket}/logs/{day}/part-00000.parquet", "wb") as stream:
            pq.write_table(day_table(320, shops, first), stream, row_group_size=100)
        s3.pipe(f"{bucket}/logs/{day}/_SUCCESS", b"")
    return f"s3://{bucket}"


def data(s3_server, train, **kwargs) -> ParquetDataModule:
    # `shop` first among the 4-wide tables: growing it moves every other block of the fused weight
    features = [SparseFeature("shop", 2, 4), *synthetic_features(embedding_dim=4)]
    return ParquetDataModule(train=train, tasks=synthetic_tasks(), features=features, categorical=["shop"],
                             normalize=["dense_0"], batch_size=32, row_id="rid", grow_vocabulary=True,
                             storage_options=s3_server.storage_options, **kwargs)


def model(dm: ParquetDataModule, seed: int) -> MultiTaskLightningModule:
    torch.manual_seed(seed)
    return MultiTaskLightningModule(MMoE(dm.features, synthetic_tasks(), num_experts=2, expert_hidden=(8,),
                                         tower_hidden=(4,)), lr=2e-2)


def embedding(module: MultiTaskLightningModule) -> FeatureEmbedding:
    return next(m for m in module.modules() if isinstance(m, FeatureEmbedding))


def table(module: MultiTaskLightningModule, name: str) -> torch.Tensor:
    return embedding(module).table_weight(name).detach().clone()


class AtStart(L.Callback):
    """What the model holds when training starts, after the checkpoint and optimizer state are restored."""

    def __init__(self, probe: dict) -> None:
        self.probe = probe
        self.seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        layer = embedding(pl_module)
        self.seen["tables"] = {f.name: table(pl_module, f.name) for f in layer.features if hasattr(f, "vocab_size")}
        weight = layer.fused["dim4"].weight
        self.seen["exp_avg"] = trainer.optimizers[0].state[weight]["exp_avg"].clone()
        pl_module.eval()
        with torch.no_grad():
            self.seen["day1_predictions"] = pl_module(self.probe["features"])
        pl_module.train()


def test_day_two_grows_the_vocabulary_from_day_one_through_s3(s3_server, days, quiet_trainer):
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with pytest.MonkeyPatch.context() as patch:  # Lightning's own checkpoint I/O: s3fs configured by the environment
        for key, value in env.items():
            patch.setenv(key, value)
        # ---------------------------------------------------------------- day 1
        day1 = data(s3_server, f"{days}/logs/{DAY1}/")
        day1.setup("fit")
        first = model(day1, seed=0)
        trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
        trainer.fit(first, day1)
        checkpoint1 = f"{days}/checkpoints/{DAY1}.ckpt"
        trainer.save_checkpoint(checkpoint1)
        assert day1.encoders["shop"].num_ids == 21
        probe = next(iter(day1.dataset("train")))  # a day-1 batch, encoded by day 1's vocabulary
        first.eval()
        with torch.no_grad():
            expected = first(probe["features"])
        optimizer1 = trainer.optimizers[0].state[embedding(first).fused["dim4"].weight]["exp_avg"].clone()

        # ---------------------------------------------------------------- day 2
        day2 = data(s3_server, f"{days}/logs/{DAY2}/")
        day2.load_checkpoint_state(checkpoint1)
        day2.setup("fit")
        vocabulary1 = day1.encoders["shop"].values.to_pylist()
        vocabulary2 = day2.encoders["shop"].values.to_pylist()
        assert vocabulary2[:20] == vocabulary1  # every day-1 shop keeps its id
        assert sorted(vocabulary2[20:]) == sorted(f"shop-{i}" for i in range(20, 30))  # the new ones follow
        assert [f.vocab_size for f in day2.features if f.name == "shop"] == [31]
        day2_ids = torch.cat([b["features"]["shop"] for b in day2.dataset("train")])
        assert int(day2_ids.min()) >= 1 and len(torch.unique(day2_ids)) == 20  # no day-2 shop in the OOV row 0
        np.testing.assert_array_equal(day2.normalizers["dense_0"].mean, day1.normalizers["dense_0"].mean)

        second = model(day2, seed=1)
        fresh = table(second, "shop")
        start = AtStart(probe)
        trainer2 = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[start])  # epoch 2 of the run
        trainer2.fit(second, day2, ckpt_path=checkpoint1)

    # when day 2 starts: day-1 rows as trained on day 1, new rows as initialised, for every table of the fused weight
    for name, rows in start.seen["tables"].items():
        before = table(first, name)
        torch.testing.assert_close(rows[: len(before)], before, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(start.seen["tables"]["shop"][21:], fresh[21:], rtol=0, atol=0)
    # Adam's moments moved with their rows; a new row's are zero
    layout = embedding(second).table_layout()
    _, offset2, rows2 = layout["shop"]
    old_rows = optimizer1.shape[0]
    grown = start.seen["exp_avg"]
    assert grown.shape[0] == old_rows + 10
    torch.testing.assert_close(grown[offset2: offset2 + 21], optimizer1[:21], rtol=0, atol=0)
    assert grown[offset2 + 21: offset2 + rows2].abs().sum() == 0
    torch.testing.assert_close(grown[offset2 + rows2:], optimizer1[21:], rtol=0, atol=0)  # the blocks after shop
    # day-1 rows get exactly day 1's predictions until day 2 trains
    for task, logits in expected.items():
        torch.testing.assert_close(start.seen["day1_predictions"][task], logits, rtol=0, atol=0, msg=task)
    # day 2 trained the new shops' own rows
    trained = table(second, "shop")
    assert all(not torch.equal(trained[i], fresh[i]) for i in range(21, 31))

    # the checkpoint records the partitions trained on; a day already trained on is refused

    def folder(day: str) -> str:
        return f"{days}/logs/{day}"

    # day 2's fit completed: its partition counts as trained (a checkpoint mid-run would list it under "training")
    assert day2.state_dict()["partitions"] == {"trained": [folder(DAY1), folder(DAY2)], "training": []}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        checkpoint2 = f"{days}/checkpoints/{DAY2}.ckpt"
        trainer2.save_checkpoint(checkpoint2)
        again = data(s3_server, [f"{days}/logs/{DAY1}/", f"{days}/logs/{DAY3}/"])
        with pytest.raises(ValueError, match=rf"already trained on the partition\(s\) \['{folder(DAY1)}'\]"):
            again.load_checkpoint_state(checkpoint2)
        overlap = data(s3_server, f"{days}/logs/day=2026-11-0[23]/")
        with pytest.raises(ValueError, match=rf"already trained on the partition\(s\) \['{folder(DAY2)}'\]"):
            overlap.load_checkpoint_state(checkpoint2)
        allowed = data(s3_server, f"{days}/logs/{DAY1}/", allow_retraining=True)
        with pytest.warns(UserWarning, match="already trained on"):
            allowed.load_checkpoint_state(checkpoint2)
        day3 = data(s3_server, f"{days}/logs/{DAY3}/", continue_from=checkpoint2)  # as a config would give it
        day3.setup("fit")
        assert day3.state_dict()["partitions"] == {"trained": [folder(DAY1), folder(DAY2)],
                                                   "training": [folder(DAY3)]}
        assert day3.encoders["shop"].values.to_pylist()[:30] == vocabulary2  # day 3 has no new shop


def test_a_capped_vocabulary_evicts_the_rarest_and_reuses_their_ids():
    encoder = VocabularyEncoder("shop", max_size=4)
    encoder.partial_fit(pa.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]), "day 1")
    encoder.finish_fit()
    assert encoder.values.to_pylist() == ["a", "b", "c", "d"] and encoder.counts.tolist() == [5, 3, 2, 1]
    # day 2: "e" (4 times) and "f" (2 times) are new; "d" is seen again (cumulative count 2)
    encoder.partial_fit(pa.array(["e"] * 4 + ["f"] * 2 + ["d"]), "day 2")
    sources = encoder.grow()
    # ranked by count, existing values first on ties, then by id: a 5, e 4, b 3, c 2, d 2, f 2; the top 4 stay:
    # d is evicted (it maps to the out-of-vocabulary id 0 from now on) and e takes its id 4; f is left out
    assert encoder.values.to_pylist() == ["a", "b", "c", "e"]
    assert sources.tolist() == [0, 1, 2, 3, -1]
    assert encoder.counts.tolist() == [5, 3, 2, 4]
    assert encoder.transform(pa.array(["d", "e", "f", "a"]), "day 3").tolist() == [0, 4, 0, 1]
    # without a cap, new values are appended after every existing one
    unbounded = VocabularyEncoder("shop", min_freq=2)
    unbounded.partial_fit(pa.array(["a", "a", "b", "b"]), "day 1")
    unbounded.finish_fit()
    unbounded.partial_fit(pa.array(["c", "c", "z", "a"]), "day 2")
    assert unbounded.grow().tolist() == [0, 1, 2, -1] and unbounded.values.to_pylist() == ["a", "b", "c"]


def test_grown_rows_keep_old_rows_and_leave_new_ones_fresh():
    layer = FeatureEmbedding([SparseFeature("user", 5, 4), SparseFeature("shop", 6, 4), SparseFeature("city", 3, 4)])
    # shop had 4 ids; its id 2 was evicted and reused, ids 4-5 are new
    plan = grown_rows(layer, {"shop": (4, torch.tensor([0, 1, -1, 3, -1, -1]))})
    rows, before = plan["fused.dim4.weight"]
    assert before == 5 + 4 + 3
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 6, -1, 8, -1, -1, 9, 10, 11]
    with pytest.raises(ValueError, match="feature 'shop': its table has 6 rows, but the vocabulary growth gives 5"):
        grown_rows(layer, {"shop": (4, torch.tensor([0, 1, 2, 3, -1]))})


def test_the_command_line_continues_from_yesterdays_checkpoint(tmp_path, monkeypatch):
    from mtl_lightning.cli import build_cli

    for day, shops, first in ((DAY1, range(20), 0), (DAY2, range(10, 30), 1000)):
        (tmp_path / "logs" / day).mkdir(parents=True)
        pq.write_table(day_table(300, shops, first), tmp_path / "logs" / day / "part-00000.parquet")
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[2] / "configs"
    common = ["--config", str(configs / "base.yaml"), "--config", str(configs / "data" / "synthetic.yaml"),
              "--config", str(configs / "mmoe.yaml"), "--data.row_id=rid",
              "--data.categorical=[shop]", "--data.grow_vocabulary=true", "--data.batch_size=100",
              "--data.embedding_dim=4", "--data.test=null", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.logger=false"]
    first = build_cli(["fit", *common, f"--data.train=logs/{DAY1}", f"--data.val=logs/{DAY1}",
                       "--trainer.max_epochs=1", "--trainer.default_root_dir=day1"])
    checkpoint = next((tmp_path / "day1").rglob("*.ckpt"))
    second = build_cli(["fit", *common, f"--data.train=logs/{DAY2}", f"--data.val=logs/{DAY2}",
                        f"--data.continue_from={checkpoint}", f"--ckpt_path={checkpoint}", "--trainer.max_epochs=2",
                        "--trainer.default_root_dir=day2"])
    sizes = [{f.name: getattr(f, "vocab_size", None) for f in cli.model.model.features}["shop"]
             for cli in (first, second)]
    assert sizes == [21, 31]  # the model of day 2 was built with the grown vocabulary
    assert second.trainer.global_step == 2 * first.trainer.global_step  # day 2's epoch, after day 1's
    vocabulary = [cli.datamodule.encoders["shop"].values.to_pylist() for cli in (first, second)]
    assert vocabulary[1][:20] == vocabulary[0]


def test_day_two_logs_how_each_vocabulary_grew_and_what_was_evicted(tmp_path, caplog):
    """Local Hive folders ``day=...``: the string key stays out of the features; day 2's growth is logged."""
    import logging

    def write(day: str, shops: list[str], first: int) -> str:
        rows = len(shops)
        table = make_table(rows, seed=first).append_column("shop", pa.array(shops))
        (tmp_path / day).mkdir()
        pq.write_table(table, tmp_path / day / "part-0.parquet")
        return f"{tmp_path}/{day.replace('day=', 'day=*')}/"  # a glob over the days: `day` is a partition key

    day1 = write(DAY1, ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 10, 0)
    day2 = write(DAY2, ["e"] * 40 + ["f"] * 20 + ["d"] * 10 + ["g"] * 40, 100)  # d again: 20 in all

    def module(train: str) -> ParquetDataModule:
        return ParquetDataModule(train=train, tasks=synthetic_tasks(), categorical={"shop": {"max_size": 5}},
                                 labels=["purchase"], exclude=["user_id", "item_id", "category", "city", "history"],
                                 grow_vocabulary=True, progress=False)

    with caplog.at_level(logging.INFO):
        first = module(day1)
        first.setup("fit")
        assert "day" not in {f.name for f in first.features}  # a Hive key of strings is no feature
        second = module(day2)
        second.load_state_dict(first.state_dict())
        second.setup("fit")
    logs = "\n".join(record.getMessage() for record in caplog.records)
    assert "Hive partition key(s) ['day'] of strings are left out of the inferred features" in logs
    # ranked by count over both days: a 50, e 40, g 40, b 30, c 20, d 20, f 20 -> a, e, g, b, c stay (cap 5);
    # d is evicted (ties go to existing values, then lower ids: c before d)
    assert second.encoders["shop"].values.to_pylist() == ["a", "b", "c", "e", "g"]
    assert ("ParquetDataModule vocabularies grown on the train split: shop 4 -> 5 values (+2 new, 1 evicted: "
            "max_size 5)") in logs
