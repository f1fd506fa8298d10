"""Building blocks; never imports the architectures."""

from .embedding import FeatureEmbedding
from .mlp import MLP, activation_layer
from .moe import ExpertBank, Gate, mix

__all__ = ["FeatureEmbedding", "MLP", "activation_layer", "ExpertBank", "Gate", "mix"]
