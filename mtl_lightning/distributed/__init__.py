"""Lightning strategies beyond DDP: TorchRec-sharded embedding tables (``TorchRecStrategy``).

Importing this package never imports TorchRec; building a ``TorchRecStrategy``
does, and says how to install it when it is missing.
"""

from __future__ import annotations

from ._torchrec import INSTALL_HINT, require_torchrec, torchrec_available
from .checkpoint import consolidate, is_sharded_checkpoint
from .strategy import EMBEDDING_OPTIMIZERS, SHARDING_TYPES, TorchRecStrategy, refused_weighting

__all__ = ["TorchRecStrategy", "refused_weighting", "SHARDING_TYPES", "EMBEDDING_OPTIMIZERS", "consolidate",
           "is_sharded_checkpoint", "torchrec_available", "require_torchrec", "INSTALL_HINT"]
