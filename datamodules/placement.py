"""Where a data module's batches are built: on the host, or on the training device (``device_resident``).

A batch of an in-memory split is a few gathers from its ``ColumnStore``
(``datamodules.store``). Built on the host, every training step then copies it
to the device, column by column, in Lightning's ``transfer_batch_to_device``.
When the split fits on the device, :func:`resident_store` keeps a copy of the
store's blocks there once, and every batch is gathered on the device: no
per-step host-to-device copy, no pinned staging, and the host only launches a
few gathers. The batches are the same tensors, on the device (``tests/gpu/test_gpu.py`` checks them equal on a
GPU; written without one, it has not run yet),
in the same order (the row permutation is drawn on the host from the same seed,
then moved), so resuming, DDP sharding and the results are unchanged.

``device_resident`` (a data module argument):

* ``"auto"`` (default): on an accelerator (CUDA), in memory (not streaming),
  with ``num_workers=0``, when the split's blocks take at most a quarter of the
  device's free memory; otherwise on the host. On a CPU the host is the device,
  so nothing changes;
* ``True``: on the device whenever training runs on one (``ValueError`` with
  ``streaming=True`` or ``num_workers > 0``, whose worker processes cannot
  share device memory);
* ``False``: always on the host (pinned with ``pin_memory=True``).

:func:`batch_on_device` lets the data module hand Lightning a batch that is
already where it must be without walking it (``transfer_batch_to_device``).
:class:`BatchLoaders` is the data module's part that builds the loaders with
these rules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .batches import EpochDataLoader
from .store import ColumnStore

FREE_MEMORY_SHARE = 0.25  # "auto": a split goes to the device when its blocks take at most this share of free memory


def check_device_resident(value: Any, streaming: bool, num_workers: int) -> bool | str:
    """The ``device_resident`` argument, checked against the data module's other settings."""
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.lower(), value.lower())
    if not (value is True or value is False or value == "auto"):
        raise ValueError(f"device_resident must be 'auto', True or False, got {value!r}")
    if value is True and (streaming or num_workers > 0):
        why = "streaming=True reads batches from the files" if streaming else (
            f"num_workers={num_workers} builds batches in worker processes")
        raise ValueError(f"device_resident=True keeps an in-memory split on the training device, but {why}; use "
                         "device_resident='auto' or False, or streaming=False and num_workers=0")
    return value


def store_bytes(store: ColumnStore) -> int:
    """Bytes of a store's blocks."""
    return sum(block.numel() * block.element_size() for block in store.blocks.values())


def training_device(datamodule: Any) -> torch.device | None:
    """The device of the Trainer the data module is attached to, or ``None`` without one."""
    trainer = getattr(datamodule, "_trainer", None)
    if trainer is None:
        return None
    return trainer.strategy.root_device


def wants_device(setting: bool | str, store: ColumnStore, device: torch.device | None, streaming: bool,
                 num_workers: int) -> bool:
    """Whether a split's batches are built on ``device`` (see the module docstring)."""
    if device is None or device.type == "cpu" or setting is False or streaming or num_workers > 0:
        return False
    if setting is True:
        return True
    if device.type != "cuda":
        return False  # "auto" decides by free memory, which only CUDA reports
    free, _ = torch.cuda.mem_get_info(device)
    return store_bytes(store) <= FREE_MEMORY_SHARE * free


def resident_store(store: ColumnStore, device: torch.device) -> ColumnStore:
    """The store with its blocks copied to ``device`` (the store itself when they are there)."""
    if all(block.device == device for block in store.blocks.values()):
        return store
    return ColumnStore(store.slots, store.num_rows, {dtype: block.to(device) for dtype, block in store.blocks.items()})


def batch_on_device(batch: Any, device: torch.device) -> bool:
    """Whether every tensor of a batch (a dict of tensors and of dicts of tensors) is on ``device``; ``False`` for
    anything else, which Lightning's own transfer then walks."""
    if not isinstance(batch, dict):
        return False
    for value in batch.values():
        if isinstance(value, Tensor):
            if value.device != device:
                return False
        elif isinstance(value, dict):
            for tensor in value.values():
                if not isinstance(tensor, Tensor) or tensor.device != device:
                    return False
        else:
            return False
    return True


class BatchLoaders:
    """The loaders of ``MultiTaskDataModule`` (a base class of it): each split's batches from its store, on the host
    or on the device (``device_resident``, see the module docstring), and the batch transfer that skips batches
    already on the device. Needs ``dataset(split)``, ``stores``, ``device_resident``, ``num_workers``,
    ``pin_memory`` and ``paths`` of the data module."""

    def _epoch(self) -> int:
        """The training epoch the train loader's next pass serves.

        Lightning's own sampler epoch, the number of training epochs already run; unlike
        ``trainer.current_epoch`` it is right when resuming from a checkpoint written at the end
        of an epoch (by ModelCheckpoint, before the epoch counts as completed).
        """
        return self.trainer.fit_loop.epoch_progress.current.processed  # type: ignore[attr-defined]

    def batch_store(self, split: str) -> ColumnStore:
        """The store a split's batches are gathered from: the in-memory store, or its copy on the training device
        (made once per store and device; a store read again is copied again)."""
        store = self.stores[split]  # type: ignore[attr-defined]
        device = training_device(self)
        cache: dict[str, tuple[ColumnStore, torch.device, ColumnStore]] = self.__dict__.setdefault("_device_stores", {})
        cached = cache.get(split)
        if cached is not None and cached[0] is store and cached[1] == device:
            return cached[2]  # decided once: the copy itself takes free memory that "auto" would count again
        if not wants_device(self.device_resident, store, device,  # type: ignore[attr-defined]
                            bool(getattr(self, "streaming", False)), self.num_workers):  # type: ignore[attr-defined]
            return store
        cache[split] = (store, device, resident_store(store, device))  # type: ignore[arg-type]
        return cache[split][2]

    def _loader(self, split: str) -> DataLoader:
        # The train loader's position is saved in checkpoints and restored: see datamodules.batches.
        dataset = self.dataset(split)  # type: ignore[attr-defined]
        store = getattr(dataset, "store", None)  # streams have none: their batches are built on the host
        on_host = store is None or store.device.type == "cpu"
        return EpochDataLoader(
            dataset, epoch_fn=self._epoch if self.trainer is not None else None,  # type: ignore[attr-defined]
            num_workers=self.num_workers, pin_memory=self.pin_memory and on_host,  # type: ignore[attr-defined]
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        # no val split: an empty list tells Lightning to skip validation
        return self._loader("val") if self.paths["val"] is not None else []  # type: ignore[attr-defined]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The batch itself when it is on ``device`` already (built there, or training on the CPU), else Lightning's
        own transfer (non-blocking copies of every tensor)."""
        if batch_on_device(batch, device):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]


__all__ = ["BatchLoaders", "check_device_resident", "store_bytes", "training_device", "wants_device", "resident_store",
           "batch_on_device"]
