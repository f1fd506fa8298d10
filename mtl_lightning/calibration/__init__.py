"""Post-hoc calibration: a monotone map of each binary task's probability, fitted on the validation split.

:func:`calibrate` runs the module's model over the data module's validation
split, fits one calibrator per binary task (and, with ``by_scenario=True``, one
per scenario besides the task's global one) and attaches them to the module as
``module.calibration`` (a :class:`Calibration`). From then on

* ``predict_step`` returns the calibrated probabilities;
* validation and test log the metrics of the calibrated probabilities;
* checkpoints carry the calibrators (``checkpoint["calibration"]``, plain data;
  ``load_from_checkpoint`` and ``trainer.*(ckpt_path=...)`` restore them);
* the ONNX and TorchScript exports (``mtl_lightning.export``) apply them, so a
  served probability is the calibrated one.

Methods, applied to the probability ``p`` the model predicts (after any
negative-sampling correction, ``Task(negative_sampling_rate=...)``):

* ``"platt"`` (Platt, 1999): ``sigmoid(a * logit(p) + b)``, ``a`` and ``b``
  fitted by Newton's method on the (weighted) log-loss, ``a >= 1e-3`` (a model
  whose predictions do not rank the labels gets that slope, and a warning);
  ``p`` is clipped to ``[1e-7, 1 - 1e-7]`` before the logit.
* ``"isotonic"``: weighted isotonic regression (pool-adjacent-violators) of the
  label on ``p``, turned into a strictly increasing piecewise-linear map: the
  knots are the pooled blocks' ``(mean p, mean label)`` (labels clipped to
  ``[1e-6, 1 - 1e-6]``), joined by straight lines, with ``(0, 0)`` and ``(1, 1)``
  at the ends. The rows are first grouped into at most ``max_knots`` groups of
  consecutive distinct ``p`` values of about equal row count, so the map has at
  most ``max_knots + 2`` knots. It is evaluated as a lookup (the segment of ``p``
  by counting the knots below it, then one linear interpolation), which ONNX
  expresses with comparisons, a sum and a gather.

Both maps are strictly increasing, so AUC is unchanged (up to float32 ties).
Per scenario, the scenario id is read from a feature of the model (the domain
feature of a multi-scenario architecture, else the data module's ``scenario=``
column when it is also a feature), so the exports can apply it; a scenario
unseen at fitting, or whose validation rows are of one class, uses the task's
global calibrator.

From the command line: the :class:`Calibrate` callback
(``trainer.callbacks: [{class_path: mtl_lightning.calibration.Calibrate}]``)
calibrates at the end of ``fit`` and saves ``calibrated.ckpt`` beside the other
checkpoints; ``python -m mtl_lightning.calibration CKPT --val DATA --output OUT``
calibrates a checkpoint on a validation split.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from ..tasks import corrected_logits

METHODS = ("isotonic", "platt")
PROBABILITY_EPS = 1e-7  # p is clipped to [eps, 1 - eps] before Platt's logit
LABEL_EPS = 1e-6  # isotonic knot values are clipped to [eps, 1 - eps]
CHECKPOINT_KEY = "calibration"
MIN_PLATT_SLOPE = 1e-3


# ----------------------------------------------------------------------------------------------- fitting
def fit_platt(p: np.ndarray, y: np.ndarray, w: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """``(a, b)`` minimising the weighted log-loss of ``sigmoid(a * logit(p) + b)`` (Newton's method, float64).

    A slope below :data:`MIN_PLATT_SLOPE` (predictions that do not rank the labels, AUC <= 0.5) is raised to it,
    with a warning, and ``b`` refitted: the map stays strictly increasing, almost the constant base rate.
    """
    p = np.clip(p.astype(np.float64), PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    z = np.log(p) - np.log1p(-p)
    w = w / w.sum()
    a, b = _newton(z, y, w, 1.0, 0.0, iterations, fit_slope=True)
    if not (math.isfinite(a) and a >= MIN_PLATT_SLOPE):
        warnings.warn(f"Platt scaling found slope a={a:.4g}: the predictions do not rank the labels (AUC <= 0.5); "
                      f"the slope is set to {MIN_PLATT_SLOPE} (about the constant base rate), check the model")
        a, b = _newton(z, y, w, MIN_PLATT_SLOPE, 0.0, iterations, fit_slope=False)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"Platt scaling did not converge (a={a}, b={b})")
    return float(a), float(b)


def _newton(z: np.ndarray, y: np.ndarray, w: np.ndarray, a: float, b: float, iterations: int,
            fit_slope: bool) -> tuple[float, float]:
    for _ in range(iterations):
        q = 1 / (1 + np.exp(-(a * z + b)))
        r, s = w * (q - y), w * q * (1 - q)
        if fit_slope:
            gradient = np.array([(r * z).sum(), r.sum()])
            hessian = np.array([[(s * z * z).sum(), (s * z).sum()], [(s * z).sum(), s.sum()]]) + 1e-12 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
        else:
            step = np.array([0.0, r.sum() / (s.sum() + 1e-12)])
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-12:
            break
    return a, b


def fit_isotonic(p: np.ndarray, y: np.ndarray, w: np.ndarray, max_knots: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The knots ``(x, f(x))`` of the strictly increasing piecewise-linear isotonic map (see the module docstring)."""
    values, inverse = np.unique(p.astype(np.float64), return_inverse=True)
    weight = np.bincount(inverse, weights=w, minlength=values.size)
    positive = np.bincount(inverse, weights=w * y, minlength=values.size)
    rows = np.bincount(inverse, minlength=values.size)
    # groups of consecutive distinct values with about n / max_knots rows each
    before = np.concatenate([[0], np.cumsum(rows)[:-1]])
    group = (before * max_knots) // max(int(rows.sum()), 1)
    sums = [np.bincount(group, weights=v) for v in (weight, positive, weight * values)]
    keep = sums[0] > 0
    block_w, block_y, block_x = (s[keep] for s in sums)
    # pool adjacent violators, merging while a block's mean is not above the previous one's
    stack: list[list[float]] = []
    for bw, by, bx in zip(block_w, block_y, block_x):
        stack.append([bw, by, bx])
        while len(stack) > 1 and stack[-2][1] / stack[-2][0] >= stack[-1][1] / stack[-1][0]:
            last = stack.pop()
            stack[-1] = [stack[-1][i] + last[i] for i in range(3)]
    blocks = np.array(stack)
    x = blocks[:, 2] / blocks[:, 0]
    f = np.clip(blocks[:, 1] / blocks[:, 0], LABEL_EPS, 1 - LABEL_EPS)
    if x[0] > 0:
        x, f = np.concatenate([[0.0], x]), np.concatenate([[0.0], f])
    if x[-1] < 1:
        x, f = np.concatenate([x, [1.0]]), np.concatenate([f, [1.0]])
    return x, f


# -------------------------------------------------------------------------------------------- the maps
class TaskCalibrator(nn.Module):
    """One task's monotone map, global and per scenario: ``forward(p, scenario=None) -> calibrated p``.

    Row ``i < S`` of the parameter tables belongs to the scenario ``scenario_ids[i]``; the last row is the
    global map, used without scenario ids and for a scenario not in ``scenario_ids``. Platt keeps ``scale``
    and ``bias`` ``(S + 1,)``; isotonic keeps ``knots_x`` and ``knots_y`` ``(S + 1, K)``, rows of fewer knots
    padded by repeating their last knot. Every table is a non-persistent buffer: checkpoints store
    :meth:`config` (plain data) instead.
    """

    def __init__(self, method: str, maps: Sequence[Mapping[str, Any]], scenario_ids: Sequence[int] = ()) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
        if len(maps) != len(scenario_ids) + 1:
            raise ValueError(f"{len(maps)} calibration maps for {len(scenario_ids)} scenarios (one per scenario, "
                             "then the global one)")
        self.method = method
        self.maps = [dict(m) for m in maps]
        self.register_buffer("scenario_ids", torch.tensor(list(scenario_ids), dtype=torch.long), persistent=False)
        if method == "platt":
            self.register_buffer("scale", torch.tensor([float(m["a"]) for m in maps]), persistent=False)
            self.register_buffer("bias", torch.tensor([float(m["b"]) for m in maps]), persistent=False)
        else:
            width = max(len(m["x"]) for m in maps)
            pad = lambda v: list(v) + [v[-1]] * (width - len(v))  # noqa: E731
            self.register_buffer("knots_x", torch.tensor([pad(m["x"]) for m in maps], dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("knots_y", torch.tensor([pad(m["y"]) for m in maps], dtype=torch.float32),
                                 persistent=False)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "maps": self.maps, "scenario_ids": self.scenario_ids.tolist()}

    def rows(self, scenario: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The table row of each example: its scenario's, else the global one (the last)."""
        count = self.scenario_ids.numel()
        if scenario is None or count == 0:
            return torch.full((batch,), count, dtype=torch.long, device=device)
        match = scenario.long().reshape(-1, 1) == self.scenario_ids.reshape(1, -1)  # (B, S)
        positions = torch.arange(count, device=device).reshape(1, -1)
        found = match.any(dim=1)
        return (match.long() * positions).sum(dim=1) + (~found).long() * count

    def forward(self, p: Tensor, scenario: Tensor | None = None) -> Tensor:
        p = p.float()
        rows = self.rows(scenario, p.shape[0], p.device)
        if self.method == "platt":
            clipped = p.clamp(min=PROBABILITY_EPS, max=1 - PROBABILITY_EPS)
            logit = torch.log(clipped) - torch.log(1 - clipped)
            return torch.sigmoid(self.scale[rows] * logit + self.bias[rows])
        knots_x, knots_y = self.knots_x[rows], self.knots_y[rows]  # (B, K)
        inner = knots_x[:, 1:-1]  # the segment is the number of inner knots below p
        segment = (inner < p.reshape(-1, 1)).long().sum(dim=1, keepdim=True)  # (B, 1) in [0, K - 2]
        x0, x1 = knots_x.gather(1, segment), knots_x.gather(1, segment + 1)
        y0, y1 = knots_y.gather(1, segment), knots_y.gather(1, segment + 1)
        width = x1 - x0
        share = torch.where(width > 0, (p.reshape(-1, 1) - x0) / torch.where(width > 0, width, torch.ones_like(width)),
                            torch.zeros_like(width)).clamp(min=0.0, max=1.0)
        return (y0 + share * (y1 - y0)).reshape(-1)


class Calibration(nn.Module):
    """The calibrators of a module's binary tasks: ``forward(predictions, features)`` replaces each calibrated
    task's probability in ``predictions`` (``architecture.predictions``' output) by its calibrated one.

    ``scenario_feature`` names the feature holding the scenario ids of per-scenario maps (``None``: global maps).
    """

    def __init__(self, tasks: Mapping[str, TaskCalibrator], scenario_feature: str | None = None) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict(dict(tasks))
        self.scenario_feature = scenario_feature

    def forward(self, predictions: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scenario = features[self.scenario_feature] if self.scenario_feature is not None else None
        out = dict(predictions)
        for name, calibrator in self.tasks.items():
            out[name] = calibrator(predictions[name], scenario)
        return out

    def config(self) -> dict[str, Any]:
        """Plain data (what checkpoints store), read back by :meth:`from_config`."""
        return {"scenario_feature": self.scenario_feature,
                "tasks": {name: calibrator.config() for name, calibrator in self.tasks.items()}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Calibration:
        return cls({name: TaskCalibrator(c["method"], c["maps"], c.get("scenario_ids", ()))
                    for name, c in dict(config["tasks"]).items()}, config.get("scenario_feature"))


# ------------------------------------------------------------------------------------------- the module
def apply_calibration(module: nn.Module, predictions: dict[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``predictions`` with the module's attached calibration applied (unchanged without one)."""
    calibration = getattr(module, "calibration", None)
    return predictions if calibration is None else calibration(predictions, features)


def evaluated_outputs(module: nn.Module, outputs: dict[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The outputs the evaluation reads: the model's, corrected for negative sampling (``Task(negative_sampling_rate=
    ...)``, ``tasks.corrected_logits``), each calibrated task's logit replaced by the logit of its calibrated
    probability (float64, clipped to ``[1e-12, 1 - 1e-12]``)."""
    out = corrected_logits(module.model.tasks, outputs)
    calibration = getattr(module, "calibration", None)
    if calibration is None:
        return out
    calibrated = calibration(module.model.predictions(outputs), features)
    for name in calibration.tasks:
        out[name] = torch.logit(calibrated[name].double(), eps=1e-12)
    return out


def save_calibration(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Store the module's calibration (plain data) in ``checkpoint[CHECKPOINT_KEY]``."""
    calibration = getattr(module, "calibration", None)
    if calibration is not None:
        checkpoint[CHECKPOINT_KEY] = calibration.config()


def load_calibration(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Attach the calibration a checkpoint holds (or detach the module's when it holds none)."""
    config = checkpoint.get(CHECKPOINT_KEY)
    module.calibration = None if config is None else Calibration.from_config(config).to(_device(module))


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def _batches(data: Any) -> Iterable[Any]:
    """The validation batches of a data module (``setup("validate")``, ``val_dataloader``, its
    ``on_before_batch_transfer``), or the batches of an iterable."""
    if isinstance(data, L.LightningDataModule):
        data.setup("validate")
        loader = data.val_dataloader()
        if isinstance(loader, list) and not loader:
            raise ValueError(f"{type(data).__name__} has no validation split to calibrate on; give val=...")
        return (data.on_before_batch_transfer(batch, 0) for batch in loader)
    return data


def scenario_feature_of(module: nn.Module, datamodule: Any) -> str:
    """The feature whose ids pick a per-scenario map: the domain feature of a multi-scenario architecture, else
    the data module's ``scenario`` column when it is a feature of the model."""
    model = module.model
    if getattr(model, "multi_scenario", False):
        return model.domain_feature
    column = getattr(datamodule, "scenario", None)
    names = [f.name for f in model.features]
    if column and column in names:
        return column
    raise ValueError(
        f"by_scenario=True needs the scenario id among the model's features, so that the exports can apply the "
        f"per-scenario maps: {type(model).__name__} is not multi-scenario and the data module's scenario column "
        f"({column!r}) is not one of its features {names}"
    )


@torch.no_grad()
def calibrate(
    module: nn.Module,
    datamodule: Any,
    method: str = "isotonic",
    by_scenario: bool = False,
    tasks: Sequence[str] | None = None,
    max_knots: int = 1000,
) -> nn.Module:
    """Fit a calibrator per binary task on ``datamodule``'s validation split, attach it, return ``module``.

    Args:
        module: a ``MultiTaskLightningModule``.
        datamodule: a Lightning data module with a validation split (``ParquetDataModule(val=...)``), or an
            iterable of batches.
        method: ``"isotonic"`` or ``"platt"`` (see the module docstring).
        by_scenario: also fit one map per scenario (see the module docstring); the task's global map is fitted
            too, for unseen scenarios and those whose rows are of one class.
        tasks: the binary tasks to calibrate (default: every binary task of the module).
        max_knots: the isotonic map's most groups (knots, less the two ends).

    Rows whose label is the ignore label or NaN are left out; a batch's sample weights (``Task(sample_weight=...)``)
    weigh the fit. A task without both classes among its valid rows raises ``ValueError``. Any calibration the
    module had is replaced (the new one is fitted on the model's own probabilities).
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    if max_knots < 1:
        raise ValueError(f"max_knots must be >= 1, got {max_knots}")
    binary = [t.name for t in module.tasks if t.kind == "binary"]
    names = list(binary if tasks is None else tasks)
    unknown = [n for n in names if n not in binary]
    if unknown or not names:
        raise ValueError(f"calibrate: {unknown or names} are not binary tasks of the module (binary tasks: {binary})")
    scenario_feature = scenario_feature_of(module, datamodule) if by_scenario else None
    by_name = {t.name: t for t in module.tasks}
    ignore = module.hparams.get("ignore_label", -1) if hasattr(module, "hparams") else -1
    was_training = module.training
    module.eval()
    device = _device(module)
    rows: dict[str, list[list[Tensor]]] = {n: [[], [], [], []] for n in names}
    for batch in _batches(datamodule):
        batch = move_data_to_device(batch, device)
        features = batch["features"]
        predictions = module.model.predictions(module.model(features))
        for name in names:
            labels = batch["labels"][by_name[name].name].float()
            keep = ~torch.isnan(labels) & ((labels != ignore) if ignore is not None else True)
            weight = (batch.get("weights") or {}).get(name)
            part = rows[name]
            part[0].append(predictions[name][keep].double().cpu())
            part[1].append(labels[keep].double().cpu())
            part[2].append(torch.ones_like(part[1][-1]) if weight is None else weight[keep].double().cpu())
            if scenario_feature is not None:
                part[3].append(features[scenario_feature][keep].long().cpu())
    module.train(was_training)
    calibrators = {}
    for name in names:
        p, y, w = (torch.cat(v).numpy() if v else np.zeros(0) for v in rows[name][:3])
        if not ((y == 1) & (w > 0)).any() or not ((y == 0) & (w > 0)).any():
            raise ValueError(f"calibrate: task {name!r} needs positive and negative rows (with weight > 0) in the "
                             f"validation split; it has {int((y == 1).sum())} positive of {y.size} valid rows")
        fit = (lambda a, b, c: dict(zip("ab", fit_platt(a, b, c)))) if method == "platt" else (
            lambda a, b, c: dict(zip("xy", (v.tolist() for v in fit_isotonic(a, b, c, max_knots)))))
        maps, ids = [], []
        if scenario_feature is not None:
            scenarios = torch.cat(rows[name][3]).numpy()
            for scenario in np.unique(scenarios):
                rows_of = scenarios == scenario
                ys, ws = y[rows_of], w[rows_of]
                if ((ys == 1) & (ws > 0)).any() and ((ys == 0) & (ws > 0)).any():
                    maps.append(fit(p[rows_of], ys, ws))
                    ids.append(int(scenario))
        maps.append(fit(p, y, w))
        calibrators[name] = TaskCalibrator(method, maps, ids)
    module.calibration = Calibration(calibrators, scenario_feature).to(device)
    return module


# ------------------------------------------------------------------------------------------ the command line
class Calibrate(L.Callback):
    """At the end of ``fit``: :func:`calibrate` the module on the data module's validation split and save the
    calibrated module as ``calibrated.ckpt`` in the checkpoint folder (``ModelCheckpoint.dirpath``, else
    ``<log_dir>/checkpoints``). The module used is the best checkpoint's when a ``ModelCheckpoint`` kept one.

    From YAML: ``trainer.callbacks: [{class_path: mtl_lightning.calibration.Calibrate, init_args: {method: platt}}]``.
    """

    def __init__(self, method: str = "isotonic", by_scenario: bool = False, filename: str = "calibrated.ckpt") -> None:
        if method not in METHODS:
            raise ValueError(f"Calibrate: method must be one of {METHODS}, got {method!r}")
        self.method, self.by_scenario, self.filename = method, by_scenario, filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        if best:
            state = trainer.strategy.load_checkpoint(best)
            pl_module.load_state_dict(state["state_dict"])
        calibrate(pl_module, trainer.datamodule, self.method, self.by_scenario)
        folder = Path(getattr(checkpoint, "dirpath", None) or Path(trainer.log_dir or trainer.default_root_dir)
                      / "checkpoints")
        self.path = folder / self.filename
        trainer.save_checkpoint(self.path)


__all__ = ["calibrate", "Calibration", "TaskCalibrator", "Calibrate", "fit_platt", "fit_isotonic",
           "apply_calibration", "evaluated_outputs", "save_calibration", "load_calibration", "METHODS"]

