"""The one MLP block used everywhere (bottoms, experts, towers)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "prelu": nn.PReLU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}


def activation_layer(name: str) -> nn.Module:
    """An activation module by name (``relu``, ``gelu``, ``silu``, ``tanh``, ``sigmoid``, ``prelu`` ...)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class MLP(nn.Sequential):
    """``Linear -> [BatchNorm] -> activation -> [Dropout]`` per hidden size, then an optional output ``Linear``.

    ``output_dim`` is the width of what it returns: the output layer's size when
    ``output_dim`` is given (no activation after it), else the last hidden size
    (or ``input_dim`` when ``hidden`` is empty, making the block an identity).
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int] = (),
        output_dim: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(activation_layer(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        super().__init__(*layers)
        self.input_dim = input_dim
        self.output_dim = width

    def last_linear(self) -> nn.Linear:
        """The block's last ``nn.Linear`` (GradNorm's W when this block is the last shared one)."""
        linears = [m for m in self if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("this MLP has no linear layer")
        return linears[-1]
