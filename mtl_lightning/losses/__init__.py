"""Loss functions, kept outside the models."""

from .counterfactual import CounterfactualCVR, dr_cvr_loss, dr_imputation_loss, ips_cvr_loss, propensity
from .masked import elementwise_loss, masked_loss, masked_mean, valid_mask
from .task_losses import LOSSES, bce_loss, cross_entropy_loss, default_loss, focal_loss, huber_loss, jrc_loss, mse_loss

__all__ = [
    "elementwise_loss", "masked_loss", "masked_mean", "valid_mask",
    "CounterfactualCVR", "ips_cvr_loss", "dr_cvr_loss", "dr_imputation_loss", "propensity",
    "LOSSES", "default_loss", "bce_loss", "focal_loss", "jrc_loss", "mse_loss", "huber_loss", "cross_entropy_loss",
]
