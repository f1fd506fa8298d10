"""Smaller served models: embedding tables stored in float16 or row-wise INT8, dense layers in float16.

Used by the exports only (``mtl_lightning.export``, ``mtl_lightning.exported_program``); training never
sees these classes. :func:`serving_copy` returns a frozen copy of a serving module whose
``FeatureEmbedding`` layers are replaced by :class:`QuantizedFeatureEmbedding`:

* ``table_dtype="float32"``: the tables as trained (the layers are not replaced: the copy is the float32 model);
* ``table_dtype="float16"``: every table row stored in float16 and converted to float32 after the lookup;
* ``table_dtype="int8"``: row-wise quantized as FBGEMM's fused 8-bit row-wise format does: row ``r`` keeps
  ``d`` unsigned bytes ``q[r]``, a scale ``s[r] = (max(w[r]) - min(w[r])) / 255`` and an offset
  ``o[r] = min(w[r])`` (here both stored in float16: 4 bytes a row, as FBGEMM's 4- and 2-bit rows do), with
  ``q[r] = round((w[r] - o[r]) / s[r])`` computed against the float16 ``s``/``o`` and clipped to ``[0, 255]``.
  A lookup gathers the bytes, the scale and the offset of its rows and returns ``q * s + o`` in float32 (the
  table itself is never dequantized as a whole). A row's error is at most about ``s[r] / 2`` per value.

Every lookup of the input layer reads the converted tables: the grouped sparse lookups, sparse features
reading a sequence's table, pooled sequences (gather, then the masked mean / sum / max of
``layers.pooling.POOLINGS``) and the sequences read by encoders (DIN, attention, transformer).

``dense_dtype="float16"`` stores every other parameter (MLPs, experts, gates, towers, encoders,
interactions, ...) in float16 and converts it to float32 where it is used (a parametrization: ``weight``
reads ``original.float()``), so the file holds half the bytes and the arithmetic stays float32. Buffers
(normalisation statistics, ...) and an attached calibration (``ServingModel.calibration``) stay float32.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .features import DenseFeature, Feature, SparseFeature
from .layers.embedding import FeatureEmbedding
from .layers.pooling import POOLINGS

TABLE_DTYPES = ("float32", "float16", "int8")
DENSE_DTYPES = ("float32", "float16")
INT8_LEVELS = 255  # uint8 codes 0..255


def check_dtypes(table_dtype: str, dense_dtype: str) -> None:
    """Refuse a table or dense dtype the exports do not serve, naming the choices."""
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {list(TABLE_DTYPES)}, got {table_dtype!r}")
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype must be one of {list(DENSE_DTYPES)}, got {dense_dtype!r}")


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise INT8 of a ``(rows, d)`` table: ``(codes uint8 (rows, d), scale fp16 (rows,), offset fp16 (rows,))``.

    ``weight[r] ~= codes[r] * scale[r] + offset[r]`` (see the module docstring). A constant row gets scale 0 and
    is restored exactly up to the float16 offset.
    """
    weight = weight.detach().float()
    low, high = weight.min(dim=1).values, weight.max(dim=1).values  # (rows,)
    offset = low.half()
    scale = ((high - low) / INT8_LEVELS).half()
    # codes against the stored (float16) scale and offset, so rounding them costs no extra error
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(low))
    codes = torch.round((weight - offset.float().unsqueeze(1)) / safe.unsqueeze(1)).clamp(0, INT8_LEVELS)
    return codes.to(torch.uint8), scale, offset


def dequantize_rows(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """``codes * scale + offset`` in float32: ``(..., d), (...), (...) -> (..., d)``."""
    return codes.float() * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)


class QuantizedTable(nn.Module):
    """The rows of one table (a fused weight or a sequence table) in ``dtype``; :meth:`rows` gathers in float32.

    ``weight`` (the buffer ``data``) holds float32 / float16 rows or, for ``int8``, uint8 codes with the
    per-row float16 ``scale`` and ``offset`` buffers.
    """

    def __init__(self, weight: Tensor, dtype: str) -> None:
        super().__init__()
        if dtype not in TABLE_DTYPES:
            raise ValueError(f"table dtype must be one of {list(TABLE_DTYPES)}, got {dtype!r}")
        if weight.is_meta:
            raise ValueError("the embedding tables are deferred (meta tensors); call materialize_tables() or load "
                             "the trained weights before exporting")
        self.dtype = dtype
        self.embedding_dim = int(weight.shape[1])
        weight = weight.detach().cpu()
        if dtype == "int8":
            codes, scale, offset = quantize_rows(weight)
            self.register_buffer("data", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", offset)
        else:
            self.register_buffer("data", weight.to(torch.float16 if dtype == "float16" else torch.float32).clone())

    def rows(self, ids: Tensor) -> Tensor:
        """The float32 rows ``ids`` (any shape) of the table: ``(*ids.shape, d)``."""
        flat = ids.reshape(-1)
        gathered = self.data.index_select(0, flat)  # (N, d): only the rows read are converted
        if self.dtype == "int8":
            gathered = dequantize_rows(gathered, self.scale.index_select(0, flat), self.offset.index_select(0, flat))
        return gathered.float().reshape(ids.shape + (self.embedding_dim,))

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(ids)


class QuantizedFeatureEmbedding(FeatureEmbedding):
    """A :class:`FeatureEmbedding` whose tables are :class:`QuantizedTable` s (for export only; see the module
    docstring). Built from a trained layer by :meth:`from_float`; the views, encoders and interaction are the
    layer's own."""

    fused: nn.ModuleDict
    tables: nn.ModuleDict

    @classmethod
    def from_float(cls, layer: FeatureEmbedding, dtype: str) -> "QuantizedFeatureEmbedding":
        """A copy of ``layer`` (sharing its non-table modules) with every table converted to ``dtype``."""
        converted = cls.__new__(cls)
        converted.__dict__.update(layer.__dict__)
        converted._modules = dict(layer._modules)
        converted._parameters = dict(layer._parameters)
        converted._buffers = dict(layer._buffers)
        converted.fused = nn.ModuleDict({k: QuantizedTable(h.weight, dtype) for k, h in layer.fused.items()})
        converted.tables = nn.ModuleDict({k: QuantizedTable(h.weight, dtype) for k, h in layer.tables.items()})
        converted.table_seed = None  # the tables hold values: nothing deferred is left
        return converted

    @property
    def deferred(self) -> bool:
        return False

    def _holders(self) -> list[nn.Module]:  # type: ignore[override]
        return [*self.fused.values(), *self.tables.values()]

    @property
    def sparse(self) -> bool:  # type: ignore[override]
        return False

    def embedding_parameters(self) -> list[nn.Parameter]:
        return []  # the tables are buffers

    def _lookup(self, x: Mapping[str, Tensor], key: str) -> Tensor:
        names = self._groups[key]
        ids = torch.stack([self._column(x, n) for n in names], dim=1)  # (B, n)
        self._check_ids(ids, getattr(self, f"_vocab_{key}"), names)
        return self.fused[key].rows(ids + getattr(self, f"_offsets_{key}"))  # (B, n, d)

    def _sequence_rows(self, f: Feature, value: Tensor) -> Tensor:
        """``(B, L, d)`` rows of sequence ``f``'s table (padding positions read row 0 of the table; masked later)."""
        holder, offset = self._sequence_table(f, value)
        return holder.rows(value if offset == 0 else value + offset)  # type: ignore[operator]

    def _embed(self, f: Feature, value: Tensor) -> Tensor:
        if isinstance(f, DenseFeature):
            value = value.float()
            return value.unsqueeze(-1) if value.dim() == 1 else value
        if isinstance(f, SparseFeature):
            return self.tables[self._table_of[f.name]].rows(value)  # type: ignore[operator]  (B, d)
        return POOLINGS[f.pooling](self._sequence_rows(f, value), value != 0)  # (B, d)

    def _sequence(self, f: Feature, value: Tensor) -> tuple[Tensor, Tensor]:
        return self._sequence_rows(f, value), value


class _Float32(nn.Module):
    """Parametrization: a parameter stored in float16, read as float32."""

    def forward(self, stored: Tensor) -> Tensor:
        return stored.float()


def _dense_to_float16(module: nn.Module, keep: nn.Module | None = None) -> None:
    """Store every floating parameter of ``module`` (the tables are buffers by now) in float16, read as float32;
    the parameters of ``keep`` stay float32."""
    kept = {id(m) for m in keep.modules()} if keep is not None else set()
    for owner in list(module.modules()):
        if id(owner) in kept:
            continue
        for name, parameter in list(owner.named_parameters(recurse=False)):
            if parameter.is_floating_point() and not parametrize.is_parametrized(owner, name):
                parametrize.register_parametrization(owner, name, _Float32(), unsafe=True)
                # parametrize keeps the original's dtype; the stored tensor is swapped for its float16 copy after
                owner.parametrizations[name].original = nn.Parameter(parameter.detach().half(), requires_grad=False)


def convert_tables(module: nn.Module, table_dtype: str) -> nn.Module:
    """Replace every ``FeatureEmbedding`` inside ``module`` (in place) by its :class:`QuantizedFeatureEmbedding`
    (``float32``: nothing to replace)."""
    if table_dtype == "float32":
        return module
    converted: dict[int, nn.Module] = {}
    for owner in list(module.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, FeatureEmbedding) and not isinstance(child, QuantizedFeatureEmbedding):
                if id(child) not in converted:
                    converted[id(child)] = QuantizedFeatureEmbedding.from_float(child, table_dtype)
                setattr(owner, name, converted[id(child)])
    return module


def serving_copy(module: nn.Module, table_dtype: str = "float32", dense_dtype: str = "float32") -> nn.Module:
    """A frozen CPU copy of ``module`` (a serving module) with tables in ``table_dtype`` and dense parameters in
    ``dense_dtype``, in evaluation mode; ``module`` is left as it is."""
    check_dtypes(table_dtype, dense_dtype)
    copied = copy.deepcopy(module).cpu().eval()
    convert_tables(copied, table_dtype)
    if dense_dtype == "float16":  # an attached calibration (a few knots or two numbers a task) stays float32
        _dense_to_float16(copied, keep=getattr(copied, "calibration", None))
    return copied.requires_grad_(False)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer ``module`` holds (each tensor once)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


__all__ = ["TABLE_DTYPES", "DENSE_DTYPES", "QuantizedTable", "QuantizedFeatureEmbedding", "quantize_rows",
           "dequantize_rows", "convert_tables", "serving_copy", "check_dtypes", "stored_bytes"]
