"""What every export serves: :class:`ServingModel` (the architecture with ``predict``'s transforms: out-of-vocabulary
ids to 0, probabilities / values, an attached calibration), the example batches exports trace and time with, and
where an export's preprocessing file goes. ``mtl_lightning.export``, ``mtl_lightning.exported_program`` and
``mtl_lightning.verification`` build on it; the names are importable from ``mtl_lightning.export`` as before.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from .architectures.base import MultiTaskArchitecture
from .features import DenseFeature, Feature, SequenceFeature, SparseFeature


def _architecture(model: nn.Module) -> MultiTaskArchitecture:
    """The architecture inside a ``MultiTaskLightningModule`` (or the architecture itself)."""
    inner = getattr(model, "model", model)
    if not isinstance(inner, MultiTaskArchitecture):
        raise TypeError(f"expected a MultiTaskArchitecture or a MultiTaskLightningModule, got {type(model).__name__}")
    return inner


def example_features(features: tuple[Feature, ...], batch_size: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """A random, valid feature batch for the given specs.

    Ids lie in range (below the feature's ``vocab_size`` and, with
    ``shared_with``, its table's: :func:`id_limits`); sequences are
    right-padded with id 0 to random lengths (0 to ``max_len``), and the
    sequences of one ``group`` (aligned positions of the same clicks) share
    their lengths. A query names another feature of the batch, so it is valid too.
    """
    generator = torch.Generator().manual_seed(seed)
    limits = id_limits(features)
    group_lengths: dict[str, Tensor] = {}
    batch: dict[str, Tensor] = {}
    for f in features:
        if isinstance(f, SparseFeature):
            batch[f.name] = torch.randint(0, limits[f.name], (batch_size,), generator=generator)
        elif isinstance(f, DenseFeature):
            shape = (batch_size,) if f.dim == 1 else (batch_size, f.dim)
            batch[f.name] = torch.randn(shape, generator=generator)
        elif isinstance(f, SequenceFeature):
            if limits[f.name] < 2:  # a table of one row: padding only
                batch[f.name] = torch.zeros(batch_size, f.max_len, dtype=torch.long)
                continue
            ids = torch.randint(1, limits[f.name], (batch_size, f.max_len), generator=generator)
            lengths = group_lengths.get(f.group) if f.group is not None else None
            if lengths is None:
                lengths = torch.randint(0, f.max_len + 1, (batch_size, 1), generator=generator)
                if f.group is not None:
                    group_lengths[f.group] = lengths
            batch[f.name] = torch.where(torch.arange(f.max_len) < lengths, ids, 0)
    return batch


def id_limits(features: tuple[Feature, ...]) -> dict[str, int]:
    """Per sparse/sequence feature, the bound its ids must stay under: its ``vocab_size`` and its table's."""
    by_name = {f.name: f for f in features}
    limits = {}
    for f in features:
        if isinstance(f, (SparseFeature, SequenceFeature)):
            table = by_name.get(f.shared_with or f.name, f)
            limits[f.name] = min(int(f.vocab_size), int(getattr(table, "vocab_size", f.vocab_size)))
    return limits


class ServingModel(nn.Module):
    """The architecture plus the serving transforms: out-of-vocabulary ids -> 0 on the way in, and
    probabilities for binary tasks (calibrated when the module has a calibration attached), values for
    regression on the way out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _architecture(model)
        if any(p.device.type != "cpu" for p in self.model.parameters()):
            self.model = copy.deepcopy(self.model).cpu()  # exports are traced on CPU, whatever trained the model
        self.feature_names = [f.name for f in self.model.features]
        # every output of the architecture (tasks, then extra outputs such as ESMM's cvr), as predict_step
        self.binary = {name: kind == "binary" for name, kind in self.model.output_kinds().items()}
        self.id_limits = id_limits(self.model.features)
        calibration = getattr(model, "calibration", None)  # a module's attached calibration (mtl_lightning.calibration)
        self.calibration = None if calibration is None else copy.deepcopy(calibration).cpu()

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        features = dict(features)
        for name, limit in self.id_limits.items():  # out-of-vocabulary ids -> 0 (see the module docstring)
            if name in features:  # a missing one is reported by the embedding layer
                ids = features[name]
                features[name] = torch.where((ids >= 0) & (ids < limit), ids, torch.zeros_like(ids))
        outputs = self.model.predictions(self.model(features))  # the outputs and transforms of predict_step
        return outputs if self.calibration is None else self.calibration(outputs, features)


def preprocessing_path(path: str | Path, suffix: str = ".json") -> Path:
    """Where an export writes its preprocessing: ``model.onnx`` -> ``model.preprocessing.json`` (or ``.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.preprocessing{suffix}")


__all__ = ["ServingModel", "example_features", "id_limits", "preprocessing_path"]
