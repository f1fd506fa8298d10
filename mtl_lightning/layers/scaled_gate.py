"""The scaled-sigmoid gate of PEPNet (Gate NU) and POSO: ``scale * sigmoid(MLP(x))``."""

from __future__ import annotations

from torch import Tensor, nn

from .mlp import MLP


class ScaledSigmoidGate(nn.Module):
    """``scale * sigmoid(W2 relu(W1 x + b1) + b2)``, values in ``(0, scale)``; ``(B, in) -> (B, out)``.

    With ``scale = 2`` a gate that has learnt nothing (output 1 at logit 0)
    leaves its input unchanged, and it can amplify as well as damp.
    """

    def __init__(self, input_dim: int, hidden: int, output_dim: int, scale: float = 2.0) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"gate hidden size must be >= 1, got {hidden}")
        if scale <= 0:
            raise ValueError(f"gate scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.mlp = MLP(input_dim, (hidden,), output_dim=output_dim, activation="relu")
        self.output_dim = output_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.mlp(x).sigmoid()
