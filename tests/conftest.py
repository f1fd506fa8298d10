"""Fixtures shared by every area of the suite (``tests/<area>/``): data, trainers, the local S3 server.

The helpers are fixtures, never imports: a test asks for ``quiet_trainer`` or ``synthetic_datamodule`` by name and
calls what it gets. Under pytest-xdist (``make test`` runs 2 workers) each worker process uses one torch thread,
so that the workers do not compete for the same cores; a plain ``pytest`` run keeps up to 2 threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch

from datamodules import ParquetDataModule
from datamodules.synthetic import synthetic_features, synthetic_tasks, write_synthetic

# PYTEST_XDIST_WORKER is set in the worker processes of `pytest -n N`
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# the development machine's copy of public data samples, beside the project (absent on a clean clone)
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def exports_measure_no_latency(monkeypatch):
    """An export's verification report times 300 calls by default (``Verification.latency_batch_sizes``: batches of
    1, 64 and 512), seconds per export; tests never time anything, so an export in a test measures no latency
    unless the test names ``latency_batch_sizes`` (or passes a ``Verification``, as the command line does)."""
    from mtl_lightning.verification import Verification

    def of(cls, value):
        if value is None or (isinstance(value, dict) and "latency_batch_sizes" not in value):
            value = {**(value or {}), "latency_batch_sizes": ()}
        return of_given(value)

    of_given = Verification.of
    monkeypatch.setattr(Verification, "of", classmethod(of))


@pytest.fixture(scope="session")
def perturbed_mmoe() -> Callable[..., torch.nn.Module]:
    """A factory: ``perturbed_mmoe(embedding_dim=8)`` is a small MMoE on the synthetic features and tasks (2 experts
    of 16, towers of 8) whose weights, tables included, are moved by 0.3 standard normal noise (seed 0), in eval
    mode: outputs away from 0.5 and different across rows, as the export tests need."""
    from mtl_lightning import registry

    def make(embedding_dim: int = 8) -> torch.nn.Module:
        torch.manual_seed(0)
        model = registry.create("mmoe", features=synthetic_features(embedding_dim=embedding_dim),
                                tasks=synthetic_tasks(), num_experts=2, expert_hidden=(16,), tower_hidden=(8,))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        return model.eval()

    return make


@pytest.fixture(scope="session")
def synthetic_paths(tmp_path_factory) -> dict[str, Path]:
    """20k/5k/5k rows of the synthetic dataset (written once per session, per xdist worker)."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), (20_000, 5_000, 5_000))


@pytest.fixture(scope="session")
def synthetic_datamodule() -> Callable[..., ParquetDataModule]:
    """A factory: ``synthetic_datamodule(paths, batch_size=512, **kwargs)`` is a ``ParquetDataModule`` over the
    train/val(/test) files of ``paths`` (the ``synthetic_paths`` layout) with the synthetic tasks and features;
    ``kwargs`` go to ``ParquetDataModule``."""

    def make(paths: dict[str, Path], batch_size: int = 512, **kwargs) -> ParquetDataModule:
        return ParquetDataModule(
            train=paths["train"], val=paths["val"], test=paths.get("test"), tasks=synthetic_tasks(),
            features=synthetic_features(), batch_size=batch_size, **kwargs,
        )

    return make


@pytest.fixture(scope="session")
def quiet_trainer() -> Callable[..., L.Trainer]:
    """A factory: ``quiet_trainer(**kwargs)`` is a CPU ``L.Trainer`` on one device without logger, checkpointing,
    progress bar or model summary; ``kwargs`` override those settings or add others."""

    def make(**kwargs) -> L.Trainer:
        defaults = dict(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        defaults.update(kwargs)
        return L.Trainer(**defaults)

    return make


@pytest.fixture(scope="session")
def shared_data() -> Callable[..., Path]:
    """A lookup: ``shared_data("ali-ccp-sample")`` is that path under the development machine's ``shared/data``
    folder beside the project; the test asking for a path that is not there is skipped (with ``reason=`` when
    given)."""

    def locate(relative: str, reason: str | None = None) -> Path:
        path = _SHARED_DATA / relative
        if not path.exists():
            pytest.skip(reason or f"{path} is not available (shared/data is not beside the project)")
        return path

    return locate


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, started once per session (``tests/s3_server.py``)."""
    from tests.s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()
