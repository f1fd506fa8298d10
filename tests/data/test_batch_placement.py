"""Where batches are built (``datamodules.placement``): the ``device_resident`` setting, the batch transfer that
leaves batches on their device alone, and the loaders that hand batches through uncollated. The device side itself
(batches gathered on a GPU equal to host batches, exact resume there) is in tests/gpu/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from datamodules.batches import EpochDataLoader, ParquetBatches, keep_batch
from datamodules.placement import batch_on_device, resident_store, wants_device


def test_device_resident_is_checked_against_the_other_settings(synthetic_paths, synthetic_datamodule):
    assert synthetic_datamodule(synthetic_paths).device_resident == "auto"
    assert synthetic_datamodule(synthetic_paths, device_resident="false").device_resident is False
    with pytest.raises(ValueError, match="device_resident must be 'auto', True or False, got 'gpu'"):
        synthetic_datamodule(synthetic_paths, device_resident="gpu")
    with pytest.raises(ValueError, match="streaming=True reads batches from the files"):
        synthetic_datamodule(synthetic_paths, device_resident=True, streaming=True)
    with pytest.raises(ValueError, match="num_workers=2 builds batches in worker processes"):
        synthetic_datamodule(synthetic_paths, device_resident=True, num_workers=2)
    # "auto" and False go with either
    synthetic_datamodule(synthetic_paths, streaming=True, num_workers=2)


def test_the_host_is_the_device_on_a_cpu(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths)
    dm.setup("fit")
    store = dm.stores["train"]
    cpu = torch.device("cpu")
    for setting in ("auto", True, False):
        assert not wants_device(setting, store, cpu, streaming=False, num_workers=0)
        assert not wants_device(setting, store, None, streaming=False, num_workers=0)  # no Trainer
    assert resident_store(store, cpu) is store
    assert dm.batch_store("train") is store


def test_batches_on_their_device_are_handed_over_as_they_are(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    cpu = torch.device("cpu")
    assert batch_on_device(batch, cpu)
    assert dm.transfer_batch_to_device(batch, cpu, 0) is batch  # no walk, no copy
    # anything else goes through Lightning's own transfer, which moves every tensor of any structure
    odd = {"features": batch["features"], "extra": [batch["row_id"]]}
    assert not batch_on_device(odd, cpu) and not batch_on_device([batch], cpu)
    moved = dm.transfer_batch_to_device(odd, cpu, 0)
    assert moved is not odd and torch.equal(moved["extra"][0], batch["row_id"])
    if torch.cuda.is_available():
        assert not batch_on_device(batch, torch.device("cuda", 0))


def test_loaders_hand_the_datasets_batches_through_uncollated(synthetic_paths, synthetic_datamodule):
    dm = synthetic_datamodule(synthetic_paths, batch_size=1000)
    dm.setup("fit")
    dataset = ParquetBatches(dm.stores["train"], 1000, shuffle=True, seed=3)
    loader = EpochDataLoader(ParquetBatches(dm.stores["train"], 1000, shuffle=True, seed=3))
    assert loader.collate_fn is keep_batch and keep_batch(dataset) is dataset
    for ours, direct in zip(loader, dataset):
        assert ours.keys() == direct.keys()
        for section in ("features", "labels"):
            assert all(torch.equal(ours[section][k], direct[section][k]) for k in direct[section])
        assert torch.equal(ours["row_id"], direct["row_id"])


def test_training_on_the_cpu_with_every_setting_is_the_same(synthetic_paths, synthetic_datamodule, quiet_trainer):
    from datamodules.synthetic import synthetic_features, synthetic_tasks
    from mtl_lightning import MultiTaskLightningModule
    from mtl_lightning.architectures import MMoE

    weights = []
    for setting in ("auto", True, False):
        torch.manual_seed(0)
        module = MultiTaskLightningModule(MMoE(synthetic_features(), synthetic_tasks(), num_experts=2,
                                               expert_hidden=(8,), tower_hidden=()))
        quiet_trainer(max_steps=5, limit_val_batches=0).fit(
            module, synthetic_datamodule(synthetic_paths, batch_size=256, device_resident=setting))
        weights.append(module.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
