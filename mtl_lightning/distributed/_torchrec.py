"""The one place that imports TorchRec, lazily: the library imports and runs without it."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = (
    "TorchRec is not installed. On a CPU machine with torch 2.13: "
    "pip install tensordict pyre-extensions && pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 "
    "(`make setup` does this; --no-deps keeps torchrec's requirements from pulling the CUDA build of fbgemm "
    "and an old torchmetrics). On a GPU machine install the fbgemm-gpu and torchrec builds made for your "
    "torch and CUDA versions: release 1.N is built for torch 2.(N+5) (docs/distributed.md, 'Sharded embeddings')"
)


def torchrec_available() -> bool:
    """Whether ``torchrec`` and its fbgemm kernels import."""
    try:
        require_torchrec()
    except ImportError:
        return False
    return True


def require_torchrec() -> ModuleType:
    """``import torchrec`` or ``ImportError`` saying how to install it."""
    try:
        import fbgemm_gpu  # noqa: F401  (the kernels; torchrec imports them too, with a less helpful error)
        return importlib.import_module("torchrec")
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
