"""Feature interactions between the input layer and an architecture's bottom, chosen by name.

The interface and the registry ``INTERACTIONS`` are in ``base.py``. An
interaction is one file in this package whose class carries
``@register_interaction("name")``: importing this package imports every module
in it, which registers every interaction and makes each class importable from
here. Nothing here is edited by hand to add one (``docs/contributing.md``).
"""

from __future__ import annotations

from ..registry import import_submodules
from .base import INTERACTIONS, Interaction, create_interaction, register_interaction

import_submodules(__name__, __path__, skip=("base",))
globals().update({cls.__name__: cls for cls in INTERACTIONS.values()})

__all__ = ["Interaction", "INTERACTIONS", "register_interaction", "create_interaction",
           *sorted(cls.__name__ for cls in INTERACTIONS.values())]
