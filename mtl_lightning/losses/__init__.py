"""Loss functions, kept outside the models."""

from .masked import elementwise_loss, masked_loss, masked_mean, valid_mask

__all__ = ["elementwise_loss", "masked_loss", "masked_mean", "valid_mask"]
