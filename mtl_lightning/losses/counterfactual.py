"""Counterfactual (entire-space) CVR losses of ESCM², as pure functions.

Wang, H. et al. "ESCM²: Entire Space Counterfactual Multi-Task Model for
Post-Click Conversion Rate Estimation." SIGIR 2022 (IPS and DR regularisers);
the DR estimator follows Wang, X. et al. "Doubly Robust Joint Learning for
Recommendation on Data Missing Not at Random." ICML 2019.

Notation, for the rows of one batch:

* o_i   the click label (1 clicked, 0 not);
* ô_i   the propensity: the predicted CTR sigma(click logit), **detached** (no
        gradient reaches the CTR tower through it) and clipped to
        ``propensity_clip = (low, high)``;
* r_i   the conversion label, given on clicked rows (1/0); on non-clicked rows
        it is the ignore label (or anything: o_i = 0 multiplies it away);
* r̂_i  the predicted CVR (from the conversion logit);
* e_i   = BCE(r_i, r̂_i), the per-row conversion log-loss;
* ê_i   the imputed error, the DR imputation output (a real value per row);
* D     every impression of the batch whose click label is valid (not the
        ignore label, not NaN), clicked or not; a clicked row whose conversion
        label is missing is left out of D.

IPS:  L_CVR = 1/|D| sum_D o_i e_i / ô_i

DR:   L_CVR = 1/|D| sum_D [ ê_i + o_i (e_i - ê_i) / ô_i ]
      L_IMP = 1/|D| sum_D o_i (e_i - ê_i)^2 / ô_i      (trains the imputation output)

Gradients (joint learning as in DR-JL): L_CVR treats ê_i as a constant, so it
trains the CVR prediction only; L_IMP treats e_i as a constant, so it trains
the imputation output only. Neither loss sends gradient through ô_i. With no
row in D the losses are an exact 0 that keeps the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .masked import masked_mean, valid_mask

MODES = ("ips", "dr")


def propensity(click_logits: Tensor, clip: tuple[float, float] = (0.01, 1.0)) -> Tensor:
    """ô = clip(sigmoid(click logit)), detached from the graph."""
    low, high = clip
    return torch.sigmoid(click_logits.detach().float()).clamp(min=low, max=high)


def _prepare(
    click_labels: Tensor, conversion_logits: Tensor, conversion_labels: Tensor, ignore_label: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mask of D, o, e)``: o and e are 0 outside D, so no NaN can leak into a sum."""
    click_labels = click_labels.float()
    conversion_labels = conversion_labels.float()
    click_valid = valid_mask(click_labels, ignore_label)
    o = torch.where(click_valid, click_labels, torch.zeros_like(click_labels))
    conversion_valid = valid_mask(conversion_labels, ignore_label)
    mask = click_valid & ((o == 0) | conversion_valid)
    observed = (o > 0) & mask
    r = torch.where(observed, conversion_labels, torch.zeros_like(conversion_labels))
    e = F.binary_cross_entropy_with_logits(conversion_logits.float(), r, reduction="none")
    return mask, torch.where(mask, o, torch.zeros_like(o)), torch.where(observed, e, torch.zeros_like(e))


def ips_cvr_loss(
    click_logits: Tensor,
    click_labels: Tensor,
    conversion_logits: Tensor,
    conversion_labels: Tensor,
    propensity_clip: tuple[float, float] = (0.01, 1.0),
    ignore_label: float | None = -1,
) -> Tensor:
    """IPS: ``1/|D| sum_D o_i e_i / ô_i`` (see the module docstring)."""
    mask, o, e = _prepare(click_labels, conversion_logits, conversion_labels, ignore_label)
    return masked_mean(o * e / propensity(click_logits, propensity_clip), mask)


def dr_cvr_loss(
    click_logits: Tensor,
    click_labels: Tensor,
    conversion_logits: Tensor,
    conversion_labels: Tensor,
    imputed_errors: Tensor,
    propensity_clip: tuple[float, float] = (0.01, 1.0),
    ignore_label: float | None = -1,
) -> Tensor:
    """DR: ``1/|D| sum_D [ê_i + o_i (e_i - ê_i) / ô_i]``, ê_i held constant."""
    mask, o, e = _prepare(click_labels, conversion_logits, conversion_labels, ignore_label)
    e_hat = torch.where(mask, imputed_errors.detach().float(), torch.zeros_like(e))
    return masked_mean(e_hat + o * (e - e_hat) / propensity(click_logits, propensity_clip), mask)


def dr_imputation_loss(
    click_logits: Tensor,
    click_labels: Tensor,
    conversion_logits: Tensor,
    conversion_labels: Tensor,
    imputed_errors: Tensor,
    propensity_clip: tuple[float, float] = (0.01, 1.0),
    ignore_label: float | None = -1,
) -> Tensor:
    """The imputation output's loss ``1/|D| sum_D o_i (e_i - ê_i)^2 / ô_i``, e_i held constant."""
    mask, o, e = _prepare(click_labels, conversion_logits.detach(), conversion_labels, ignore_label)
    e_hat = torch.where(mask, imputed_errors.float(), torch.zeros_like(e))
    return masked_mean(o * (e - e_hat) ** 2 / propensity(click_logits, propensity_clip), mask)


@dataclass(frozen=True)
class CounterfactualCVR:
    """Which outputs the counterfactual CVR loss reads, as plain data (stored in checkpoints).

    ``MultiTaskLightningModule(..., counterfactual=CounterfactualCVR("dr"))``
    replaces the masked loss of ``conversion_task`` with the IPS or DR loss
    (so it is weighted like any task, with ``Task.weight`` or the weighting
    strategy) and, for DR, adds ``imputation_weight * L_IMP`` to the total.

    Args:
        mode: ``"ips"`` or ``"dr"``.
        click_task: the task whose logit gives the propensity and whose label is o.
        conversion_task: the task whose logit is r̂ and whose label is r.
        propensity_clip: ``(low, high)`` bounds of ô, ``0 < low <= high <= 1``.
        imputation_output: the model output holding ê (DR only), e.g. ESCM's
            imputation tower, or a regression task of any architecture.
        imputation_weight: weight of L_IMP in the total loss (DR only).
    """

    mode: str
    click_task: str = "ctr"
    conversion_task: str = "cvr"
    propensity_clip: tuple[float, float] = (0.01, 1.0)
    imputation_output: str = "imputation"
    imputation_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CounterfactualCVR: mode must be one of {MODES}, got {self.mode!r}")
        clip = tuple(float(v) for v in self.propensity_clip)
        if len(clip) != 2 or not 0.0 < clip[0] <= clip[1] <= 1.0:
            raise ValueError(
                f"CounterfactualCVR: propensity_clip must be (low, high) with 0 < low <= high <= 1, "
                f"got {self.propensity_clip!r}"
            )
        object.__setattr__(self, "propensity_clip", clip)
        if self.click_task == self.conversion_task:
            raise ValueError(f"CounterfactualCVR: click_task and conversion_task are both {self.click_task!r}")
        if self.imputation_weight < 0:
            raise ValueError(f"CounterfactualCVR: imputation_weight must be >= 0, got {self.imputation_weight}")

    def to_config(self) -> dict[str, Any]:
        config = asdict(self)
        config["propensity_clip"] = list(self.propensity_clip)
        return config

    @classmethod
    def from_config(cls, config: CounterfactualCVR | Mapping[str, Any]) -> CounterfactualCVR:
        """The object itself, or one built from a dict of its fields (plain data; no ``class_path`` is imported)."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"counterfactual must be a CounterfactualCVR or a dict of its fields, got {type(config).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in config if k not in names)
        if unknown:
            raise ValueError(f"counterfactual: unknown keys {unknown}; CounterfactualCVR takes {names}")
        return cls(**dict(config))

    def _arguments(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> list[Tensor]:
        return [outputs[self.click_task], labels[self.click_task], outputs[self.conversion_task],
                labels[self.conversion_task]]

    def cvr_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor], ignore_label: float | None) -> Tensor:
        """L_CVR for a batch (``outputs`` and ``labels`` keyed by task/output name)."""
        if self.mode == "ips":
            return ips_cvr_loss(*self._arguments(outputs, labels), self.propensity_clip, ignore_label)
        return dr_cvr_loss(*self._arguments(outputs, labels), outputs[self.imputation_output],
                           self.propensity_clip, ignore_label)

    def imputation_loss(
        self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor], ignore_label: float | None
    ) -> Tensor | None:
        """``imputation_weight * L_IMP`` for DR; ``None`` for IPS."""
        if self.mode != "dr":
            return None
        loss = dr_imputation_loss(*self._arguments(outputs, labels), outputs[self.imputation_output],
                                  self.propensity_clip, ignore_label)
        return self.imputation_weight * loss


def check_counterfactual(cf: CounterfactualCVR, tasks: Sequence[Any], model: Any) -> None:
    """``ValueError`` unless ``cf``'s click and conversion tasks are binary tasks among ``tasks`` and, for DR, the
    imputation output is an output of ``model`` (``model.output_names``) that is not one of ``tasks``."""
    by_name = {t.name: t for t in tasks}
    for role, name in (("click_task", cf.click_task), ("conversion_task", cf.conversion_task)):
        if name not in by_name:
            raise ValueError(f"counterfactual {role}={name!r} is not one of the trained tasks {list(by_name)}")
        if by_name[name].kind != "binary":
            raise ValueError(f"counterfactual {role}={name!r} must be a binary task, it is {by_name[name].kind}")
    if cf.mode == "dr":
        if cf.imputation_output not in model.output_names:
            raise ValueError(
                f"counterfactual mode 'dr' reads the imputation output {cf.imputation_output!r}, which "
                f"{type(model).__name__} does not return (outputs: {model.output_names}); use ESCM, or "
                "give the architecture a regression task of that name"
            )
        if cf.imputation_output in by_name:
            raise ValueError(
                f"{cf.imputation_output!r} is DR's imputation output, trained by the imputation loss; "
                "leave it out of the module's tasks"
            )


__all__ = ["CounterfactualCVR", "check_counterfactual", "propensity", "ips_cvr_loss", "dr_cvr_loss", "dr_imputation_loss", "MODES"]
