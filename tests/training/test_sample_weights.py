"""Per-row sample weights, ``Task(sample_weight="<column>")``: read by the data module (in memory and streamed),
refused when negative, null or not finite (naming file and column), weighting the loss and the metrics."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datamodules import ParquetDataModule
from mtl_lightning import DenseFeature, MultiTaskLightningModule, SparseFeature, Task
from mtl_lightning.architectures import SharedBottom
from mtl_lightning.losses import masked_loss

FEATURES = [SparseFeature("user", 10, 4), DenseFeature("x")]


def write(path, n: int = 64, seed: int = 0, weight=None) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-2 * x))).astype(np.int64)
    click[:3] = -1
    weight = rng.uniform(0, 3, n) if weight is None else weight
    pq.write_table(pa.table({"user": rng.integers(0, 10, n), "x": x, "click": click, "w": weight,
                             "dwell": rng.normal(size=n)}), path)


def tasks() -> list[Task]:
    return [Task("click", sample_weight="w"), Task("dwell", kind="regression")]


@pytest.mark.parametrize("streaming", [False, True])
def test_weights_reach_the_batch_and_the_loss_is_their_weighted_mean(tmp_path, streaming):
    write(tmp_path / "train.parquet")
    write(tmp_path / "predict.parquet", seed=1)
    pq.write_table(pq.read_table(tmp_path / "predict.parquet").drop(["w"]), tmp_path / "predict.parquet")
    dm = ParquetDataModule(train=tmp_path / "train.parquet", predict=tmp_path / "predict.parquet", tasks=tasks(),
                           features=FEATURES, batch_size=64, shuffle=False, streaming=streaming)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    table = pq.read_table(tmp_path / "train.parquet").to_pandas()
    assert set(batch["weights"]) == {"click"}  # dwell has no sample weight column
    order = batch["row_id"].numpy()
    np.testing.assert_allclose(batch["weights"]["click"].numpy(), table["w"].to_numpy()[order], rtol=1e-6)
    assert "w" not in [f.name for f in dm.features]
    torch.manual_seed(0)
    module = MultiTaskLightningModule(SharedBottom(FEATURES, tasks(), bottom_hidden=(8,), tower_hidden=(4,)))
    with torch.no_grad():
        outputs = module.model(batch["features"])
    losses = module.compute_losses(outputs, batch["labels"], batch["weights"])
    z, y, w = outputs["click"].double(), batch["labels"]["click"].double(), batch["weights"]["click"].double()
    keep = y != -1
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z[keep], y[keep], reduction="none")
    assert float(losses["click"]) == pytest.approx(float((w[keep] * bce).sum() / w[keep].sum()), rel=1e-5)
    assert float(losses["dwell"]) == pytest.approx(float(((outputs["dwell"] - batch["labels"]["dwell"]) ** 2).mean()),
                                                   rel=1e-5)
    # the predict split needs no weight column
    dm.setup("predict")
    predicted = next(iter(dm.predict_dataloader()))
    assert "weights" not in predicted


def test_weighted_loss_by_hand_and_its_gradient():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.3], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, -1.0, 0.0])
    weights = torch.tensor([2.0, 1.0, 5.0, 0.0])

    def bce(z, y):
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    loss = masked_loss(logits, labels, "binary", ignore_label=-1, weights=weights)
    assert loss.item() == pytest.approx((2 * bce(0.5, 1) + bce(-1.0, 0)) / 3, rel=1e-6)
    loss.backward()
    sigmoid = torch.sigmoid(logits.detach())
    expected = torch.tensor([2 * (sigmoid[0] - 1), sigmoid[1] - 0, 0.0, 0.0]) / 3  # w (p - y) / sum w
    torch.testing.assert_close(logits.grad, expected)
    zero = masked_loss(logits, labels, "binary", weights=torch.zeros(4))
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("bad, shown", [(-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf"), (None, "nan")])
def test_a_negative_null_or_non_finite_weight_is_refused_naming_file_and_column(tmp_path, bad, shown):
    weight = pa.array([1.0] * 10 + [bad] + [1.0] * 5, type=pa.float64())
    write(tmp_path / "train.parquet", n=16, weight=weight)
    dm = ParquetDataModule(train=tmp_path / "train.parquet", tasks=tasks(), features=FEATURES, batch_size=8)
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert str(tmp_path / "train.parquet") in message and "sample weight column 'w' of task 'click'" in message
    assert "1 rows" in message and shown in message


def test_a_missing_or_non_numeric_weight_column_is_refused(tmp_path):
    write(tmp_path / "train.parquet", n=16)
    pq.write_table(pq.read_table(tmp_path / "train.parquet").drop(["w"]), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"train.parquet.*'w'"):
        ParquetDataModule(train=tmp_path / "train.parquet", tasks=tasks(), features=FEATURES).setup("fit")
    write(tmp_path / "text.parquet", n=4, weight=pa.array(["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="sample weight column 'w' of task 'click' has type string"):
        ParquetDataModule(train=tmp_path / "text.parquet", tasks=tasks(), features=FEATURES).setup("fit")
    with pytest.raises(ValueError, match="sample_weight must be a column name"):
        Task("click", sample_weight="")


def test_weights_weigh_the_validation_metrics(tmp_path, quiet_trainer):
    """Weight 2 on every positive is the same data as each positive twice: the weighted log-loss, NE and PCOC
    equal the unweighted ones on the duplicated rows."""
    rng = np.random.default_rng(3)
    n = 40
    x, click = rng.normal(size=n), (rng.random(n) < 0.4).astype(np.int64)
    base = {"user": rng.integers(0, 10, n), "x": x, "click": click, "dwell": rng.normal(size=n)}
    pq.write_table(pa.table({**base, "w": np.where(click == 1, 2.0, 1.0)}), tmp_path / "weighted.parquet")
    twice = pa.table({**base, "w": np.ones(n)})
    pq.write_table(pa.concat_tables([twice, twice.filter(pa.array(click == 1))]), tmp_path / "twice.parquet")
    torch.manual_seed(0)
    module = MultiTaskLightningModule(SharedBottom(FEATURES, tasks(), bottom_hidden=(8,), tower_hidden=(4,)))
    results = []
    for name in ("weighted", "twice"):
        dm = ParquetDataModule(val=tmp_path / f"{name}.parquet", tasks=tasks(), features=FEATURES, batch_size=16)
        results.append(quiet_trainer().validate(module, dm, verbose=False)[0])
    for metric in ("logloss", "ne", "pcoc", "ece"):
        assert results[0][f"val/click/{metric}"] == pytest.approx(results[1][f"val/click/{metric}"], rel=1e-5)
