"""Architectures: one file per paper, each registered by name in ``ARCHITECTURES`` (see ``mtl_lightning.registry``).

Importing this package imports every module file in it, which registers every
architecture and makes each registered class importable from here
(``from mtl_lightning.architectures import MMoE``). A new architecture is one
new file with an ``@register("name")`` class; nothing here is edited by hand
(``docs/contributing.md`` has the checklist).
"""

from __future__ import annotations

from ..registry import ARCHITECTURES, import_submodules
from .base import MultiScenarioArchitecture, MultiTaskArchitecture

import_submodules(__name__, __path__, skip=("base",))
globals().update({cls.__name__: cls for cls in ARCHITECTURES.values()})

__all__ = ["ARCHITECTURES", "MultiTaskArchitecture", "MultiScenarioArchitecture",
           *sorted(cls.__name__ for cls in ARCHITECTURES.values())]
