"""Architectures: one file per paper, each registered by name (see ``mtl_lightning.registry``)."""

from .aitm import AITM
from .base import MultiTaskArchitecture
from .escm import ESCM
from .esmm import ESMM
from .mmoe import MMoE
from .ple import PLE
from .shared_bottom import SharedBottom

__all__ = ["MultiTaskArchitecture", "SharedBottom", "MMoE", "PLE", "ESMM", "ESCM", "AITM"]
