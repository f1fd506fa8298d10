from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_paths(tmp_path_factory) -> dict[str, Path]:
    """20k/5k/5k rows of the synthetic dataset (written once per session)."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), (20_000, 5_000, 5_000))


def synthetic_datamodule(paths: dict[str, Path], batch_size: int = 512, **kwargs) -> ParquetDataModule:
    return ParquetDataModule(
        train=paths["train"], val=paths["val"], test=paths.get("test"), tasks=synthetic_tasks(),
        features=synthetic_features(), batch_size=batch_size, **kwargs,
    )


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, started once per session (``tests/s3_server.py``)."""
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()
