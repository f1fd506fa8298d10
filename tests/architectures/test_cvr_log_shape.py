"""CVR models on logs in their usual shape: a click label on every impression and a conversion label on
clicked rows only (null elsewhere), with no CTCVR column. ESMM, ESCM², AITM and DCMT derive what they need
(CTCVR = click · conversion; AITM's funnel steps) themselves: the derived labels' values by hand, and learning."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, write_synthetic
from mtl_lightning import MultiTaskLightningModule, SparseFeature, Task, registry
from mtl_lightning.architectures import AITM, DCMT, ESCM, ESMM
from mtl_lightning.losses import CounterfactualCVR

NAN = math.nan
CLICK, CONVERSION = Task("click"), Task("conversion")  # conversion: 0/1 on clicked rows, null elsewhere
FEATURES = [SparseFeature("u", 10, 4)]


def test_esmm_adds_the_ctcvr_task_and_derives_its_labels_from_click_and_conversion():
    model = ESMM(FEATURES, [CLICK, CONVERSION], tower_hidden=(4,), click_task="click", conversion_task="conversion")
    assert model.task_names == ["click", "conversion", "ctcvr"]  # ESMM's CTCVR term, on the derived labels
    labels = {"click": torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, NAN, -1.0]),
              "conversion": torch.tensor([1.0, 0.0, NAN, -1.0, NAN, 0.0, 1.0])}
    derived = model.derive_labels(labels)
    # clicked: the conversion label (missing stays missing); not clicked: 0 whatever conversion holds; click unknown:
    # unknown
    torch.testing.assert_close(derived["ctcvr"], torch.tensor([1.0, 0.0, 0.0, 0.0, NAN, NAN, NAN]), equal_nan=True)
    assert derived["click"] is labels["click"] and derived["conversion"] is labels["conversion"]
    # a ctcvr task reading the conversion column directly (the paper's ESMM from the same two columns)
    paper = ESMM(FEATURES, [CLICK, Task("ctcvr", label="conversion")], click_task="click", conversion_task="cvr")
    assert paper.task_names == ["click", "ctcvr"] and paper.extra_outputs() == {"cvr": "binary"}
    given = paper.derive_labels({"click": labels["click"], "ctcvr": labels["conversion"]})
    torch.testing.assert_close(given["ctcvr"], torch.tensor([1.0, 0.0, 0.0, 0.0, NAN, 0.0, 1.0]), equal_nan=True)
    # a full CTCVR label (0 on unclicked rows already) is unchanged
    full = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(paper.derive_labels({"click": labels["click"], "ctcvr": full})["ctcvr"], full)


def test_the_module_trains_and_evaluates_the_ctcvr_task_on_the_derived_labels():
    torch.manual_seed(0)
    model = ESCM(FEATURES, [CLICK, CONVERSION], tower_hidden=(4,), click_task="click", conversion_task="conversion")
    module = MultiTaskLightningModule(model, counterfactual=CounterfactualCVR("ips", "click", "conversion"))
    assert [t.name for t in module.tasks] == ["click", "conversion", "ctcvr"]
    batch = {"features": {"u": torch.arange(6)},
             "labels": {"click": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
                        "conversion": torch.tensor([1.0, NAN, 0.0, NAN, 1.0, NAN])}}
    outputs = model(batch["features"])
    losses = module.compute_losses(outputs, model.derive_labels(batch["labels"]))
    expected = F.binary_cross_entropy_with_logits(outputs["ctcvr"], torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(losses["ctcvr"], expected)  # every impression, none masked
    total = module.training_step(batch, 0)
    assert torch.isfinite(total)
    module.validation_step(batch, 0)  # the metrics read the derived labels too: no missing ctcvr label
    assert module.val_evaluation.task_metrics.task_metrics["ctcvr"]


def test_aitm_completes_each_funnel_step_with_zeros_after_a_zero():
    model = AITM(FEATURES, [CLICK, CONVERSION, Task("repurchase")])
    labels = {"click": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]),
              "conversion": torch.tensor([1.0, NAN, 0.0, -1.0, 1.0]),
              "repurchase": torch.tensor([NAN, NAN, NAN, 1.0, 1.0])}
    derived = model.derive_labels(labels)
    torch.testing.assert_close(derived["conversion"], torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(derived["repurchase"], torch.tensor([NAN, 0.0, 0.0, 0.0, 1.0]), equal_nan=True)


def test_dcmt_keeps_its_paper_tasks():
    """DCMT's paper model trains ctr and cvr only: no ctcvr task is added; one given is derived."""
    assert DCMT(FEATURES, [CLICK, CONVERSION], click_task="click", conversion_task="conversion").task_names == [
        "click", "conversion"]
    model = DCMT(FEATURES, [CLICK, CONVERSION, Task("ctcvr", label="conversion")], click_task="click",
                 conversion_task="conversion")
    derived = model.derive_labels({"click": torch.tensor([0.0, 1.0]), "conversion": torch.tensor([NAN, 1.0]),
                                   "ctcvr": torch.tensor([NAN, 1.0])})
    torch.testing.assert_close(derived["ctcvr"], torch.tensor([0.0, 1.0]))


@pytest.fixture(scope="module")
def log_shape(tmp_path_factory):
    """The synthetic data with its conversion label null on unclicked rows and no purchase column in train."""
    directory = tmp_path_factory.mktemp("log_shape")
    paths = write_synthetic(directory / "raw", (12_000, 4_000, 10))
    out = {}
    for split in ("train", "val"):
        table = pq.read_table(paths[split])
        conversion = table.column("conversion").to_numpy().astype(np.float64)
        conversion[conversion < 0] = np.nan
        table = table.set_column(table.schema.get_field_index("conversion"), "conversion",
                                 pa.array(conversion, from_pandas=True))
        if split == "train":
            table = table.drop_columns(["purchase"])
        out[split] = directory / f"{split}.parquet"
        pq.write_table(table, out[split])
    return out


def _fit(paths, name, tasks, quiet_trainer, epochs=3, **kwargs):
    torch.manual_seed(0)
    dm = ParquetDataModule(train=paths["train"], val=paths["val"], tasks=tasks, features=synthetic_features(8),
                           batch_size=512, labels=["purchase", "dwell"])
    counterfactual = kwargs.pop("counterfactual", None)
    model = registry.create(name, features=dm.features, tasks=tasks, **kwargs)
    module = MultiTaskLightningModule(model, lr=3e-3, counterfactual=counterfactual)
    trainer = quiet_trainer(max_epochs=epochs)
    trainer.fit(module, dm)
    return module, dm, trainer


def _auc_against_purchase(module, dm, val_path, output: str) -> float:
    """AUC of ``output`` on every validation impression against click AND conversion (the purchase column)."""
    purchase = torch.from_numpy(pq.read_table(val_path).column("purchase").to_numpy()).float()
    module.eval()
    with torch.no_grad():
        predictions = torch.cat([module.predict_step(b, 0)[output] for b in dm.dataset("val")])
        rows = torch.cat([b["row_id"] for b in dm.dataset("val")])
    return float(binary_auroc(predictions, purchase[rows].long()))


@pytest.mark.parametrize("name", ["esmm", "escm", "aitm"])
def test_cvr_models_learn_from_logs_with_a_conversion_label_on_clicked_rows_only(log_shape, name, quiet_trainer):
    kwargs = {"tower_hidden": (16,)}
    if name in ("esmm", "escm"):
        kwargs.update(click_task="click", conversion_task="conversion")
    if name == "aitm":
        kwargs = {"bottom_hidden": (16,)}
    module, dm, trainer = _fit(log_shape, name, [CLICK, CONVERSION], quiet_trainer, **kwargs)
    metrics = trainer.callback_metrics
    entire_space = "ctcvr" if name != "aitm" else "conversion"  # AITM's second step is click AND conversion
    assert torch.isfinite(metrics["train/loss"]) and f"val/{entire_space}/auc" in metrics
    # the entire-space output ranks purchases, which no column of the train split holds
    auc = _auc_against_purchase(module, dm, log_shape["val"], entire_space)
    print(f"{name}: AUC of {entire_space} against purchase {auc:.3f}")
    assert auc > 0.75, (name, auc)  # chance is 0.5; about 0.81 after these 3 epochs
    assert float(metrics[f"val/{entire_space}/auc"]) == pytest.approx(auc, abs=1e-4)  # evaluated on click · conversion
