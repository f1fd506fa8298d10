"""The ``torch.export`` path: an exported program (``.pt2``) and, where a C++ compiler is present, its
AOTInductor-compiled CPU package.

:func:`export_program` writes

* ``model.pt2``: the ``torch.export`` program of the serving model (the same as ``predict``: OOV ids -> 0,
  probabilities / values, tables in ``table_dtype``, dense parameters in ``dense_dtype``) with a dynamic batch
  dimension (any batch size from 1 up). ``torch.export.load("model.pt2").module()({"user_id": ids, ...})``
  returns ``{task: (B,)}``; the preprocessing fingerprint is its extra file ``preprocessing_fingerprint``
  (``torch.export.load(path, extra_files={"preprocessing_fingerprint": ""})``);
* ``model.aoti.pt2`` (``compile=True``, the default, and a C++ compiler found): the program compiled by
  AOTInductor for this machine's CPU, served with :func:`load_program` (``load_program("model.aoti.pt2")``,
  called the same way), or ``torch._inductor.aoti_load_package`` / C++'s
  ``torch::inductor::AOTIModelPackageLoader`` given CONTIGUOUS tensors (see :class:`CompiledProgram`), no
  Python model code needed. It carries the fingerprint in its metadata
  (``get_metadata()["preprocessing_fingerprint"]``).
  The compiled code targets the instruction set of the machine that compiled it (its metadata names it,
  ``AOTI_CPU_ISA``). Where no compiler is found (``$CXX`` or ``g++``, as ``torch._inductor`` looks for one)
  the compile is skipped with a warning that says so, and ``model.pt2`` is what serves.

``model.preprocessing.json`` and the verification report are written beside them, as for the other exports.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .quantized import serving_copy
from .serving_model import ServingModel

FINGERPRINT_FILE = "preprocessing_fingerprint"  # the extra file of model.pt2, the metadata key of model.aoti.pt2


def compiled_path(path: str | Path) -> Path:
    """Where the AOTInductor package of ``model.pt2`` goes: ``model.aoti.pt2``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.aoti{path.suffix}")


def cpp_compiler() -> str | None:
    """The C++ compiler AOTInductor would use (``$CXX``, else ``g++``), or ``None`` when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor that cannot look on this platform
        return None


def program(serving: nn.Module, example: Mapping[str, Tensor]) -> torch.export.ExportedProgram:
    """``torch.export`` of a serving module called as ``serving(features)``, the batch dimension dynamic (>= 1)."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(serving, (dict(example),), dynamic_shapes={"features": {n: {0: batch} for n in example}},
                                   strict=False)


def write_program(model: nn.Module, path: str | Path, example: Mapping[str, Tensor], fingerprint: str,
                  table_dtype: str = "float32", dense_dtype: str = "float32", compile: bool = True) -> Path | None:
    """Write ``model.pt2`` (and ``model.aoti.pt2`` where compiled) for ``model``; the AOTInductor package's path,
    or ``None`` where the compile was not asked for or skipped. See the module docstring."""
    serving = serving_copy(ServingModel(model), table_dtype, dense_dtype)
    exported = program(serving, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(exported, str(path), extra_files={FINGERPRINT_FILE: fingerprint})
    target = compiled_path(path)
    target.unlink(missing_ok=True)  # never leave an earlier export's package beside this program
    if not compile:
        return None
    compiler = cpp_compiler()
    if compiler is None:
        warnings.warn(f"AOTInductor compile skipped: no C++ compiler found (torch._inductor looks for $CXX, else g++); "
                      f"{path} holds the exported program, served with torch.export.load({str(path)!r}).module(). "
                      "Install g++ (or set CXX) and export again to get the compiled package", stacklevel=3)
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(target),
            inductor_configs={"aot_inductor.metadata": {FINGERPRINT_FILE: fingerprint}})
    return target


class CompiledProgram:
    """An AOTInductor package called as ``package(features) -> {task: (B,)}``, each input made contiguous first.

    The compiled code reads its inputs with the strides it was compiled for (contiguous) and does not check
    them: a column sliced out of a wider batch (every second id, say) would be read as if it were contiguous,
    silently giving wrong outputs. ``torch._inductor.aoti_load_package`` itself (and C++'s
    ``AOTIModelPackageLoader``) must be given contiguous tensors; ``AOTI_RUNTIME_CHECK_INPUTS=1`` makes the
    package check them.
    """

    def __init__(self, path: str | Path) -> None:
        self.loader = torch._inductor.aoti_load_package(str(path))

    def __call__(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.loader({name: value.contiguous() for name, value in features.items()})

    def get_metadata(self) -> dict[str, str]:
        return self.loader.get_metadata()


def load_program(path: str | Path) -> Any:
    """The callable serving ``path``: the AOTInductor package (``*.aoti.pt2``, a :class:`CompiledProgram`) or the
    exported program's module (``torch.export.load(path).module()``)."""
    path = Path(path)
    if path.name.endswith(".aoti.pt2"):
        return CompiledProgram(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path)).module()


__all__ = ["compiled_path", "cpp_compiler", "program", "write_program", "load_program", "CompiledProgram",
           "FINGERPRINT_FILE"]
