"""Architectures: one file per paper, each registered by name (see ``mtl_lightning.registry``)."""

from .aitm import AITM
from .apg import APG
from .base import MultiTaskArchitecture
from .cross_stitch import CrossStitch
from .escm import ESCM
from .esmm import ESMM
from .hmoe import HMoE
from .mmoe import MMoE
from .pepnet import PEPNet
from .ple import PLE
from .poso import POSOMLP, POSOMMoE
from .shared_bottom import SharedBottom
from .snr import SNRAver, SNRTrans
from .star import STAR

__all__ = [
    "MultiTaskArchitecture", "SharedBottom", "MMoE", "PLE", "ESMM", "ESCM", "AITM", "SNRTrans", "SNRAver",
    "CrossStitch", "HMoE", "PEPNet", "POSOMLP", "POSOMMoE", "APG", "STAR",
]
