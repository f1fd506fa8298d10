"""Building blocks; never imports the architectures."""

from .domain import check_feature_names, domain_ids, feature_slices, resolve_domain
from .embedding import FeatureEmbedding, deferred_tables
from .hard_concrete import HardConcreteGate
from .mlp import MLP, activation_layer
from .moe import ExpertBank, Gate, mix
from .partitioned_norm import PartitionedNorm
from .pooling import POOLINGS, pool_sequence, sequence_embeddings
from .scaled_gate import ScaledSigmoidGate

__all__ = [
    "FeatureEmbedding", "deferred_tables", "MLP", "activation_layer", "ExpertBank", "Gate", "mix",
    "HardConcreteGate", "PartitionedNorm", "ScaledSigmoidGate", "POOLINGS", "pool_sequence", "sequence_embeddings",
    "resolve_domain", "domain_ids", "feature_slices", "check_feature_names",
]

# sequence encoders and feature-interaction blocks (issue 23)
from .interactions import CrossNetworkV2, MaskBlock, MaskNet, SENet  # noqa: E402
from .sequence import (  # noqa: E402
    SEQUENCE_ENCODERS, BSTEncoder, Dice, DINAttention, SequenceEncoder, TargetAttention, masked_softmax,
    sequence_encoder,
)

__all__ += [
    "CrossNetworkV2", "MaskBlock", "MaskNet", "SENet",
    "SEQUENCE_ENCODERS", "BSTEncoder", "Dice", "DINAttention", "SequenceEncoder", "TargetAttention", "masked_softmax",
    "sequence_encoder",
]
