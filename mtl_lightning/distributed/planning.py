"""Which sharding each embedding table may get: ``TorchRecStrategy``'s ``sharding=`` argument checked, and turned
into the constraints TorchRec's planner chooses within (the device's sharding types and fused kernels)."""

from __future__ import annotations

from typing import Any, Mapping

from .embedding import TableSpec

SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise", "data_parallel")
CUDA_ONLY_SHARDING = ("row_wise", "table_row_wise")


def check_sharding(sharding: str | Mapping[str, str]) -> str | dict[str, str]:
    """``sharding`` as given (``"auto"``, a type of ``SHARDING_TYPES``, or ``{feature: type}``); errors otherwise."""
    choices = ("auto", *SHARDING_TYPES)
    if isinstance(sharding, str):
        if sharding not in choices:
            raise ValueError(f"sharding must be one of {choices} or a dict {{feature: type}}, got {sharding!r}")
        return sharding
    if not isinstance(sharding, Mapping):
        raise TypeError(f"sharding must be a string or a dict {{feature: type}}, got {type(sharding).__name__}")
    bad = {k: v for k, v in sharding.items() if v not in SHARDING_TYPES}
    if bad:
        raise ValueError(f"sharding types must be among {SHARDING_TYPES}; got {bad}")
    return dict(sharding)


def requested_sharding(sharding: str | Mapping[str, str], table: str, readers: tuple[str, ...]) -> str | None:
    """The type ``sharding`` names for ``table`` (read by the features ``readers``), ``None`` for the planner's."""
    if isinstance(sharding, str):
        return None if sharding == "auto" else sharding
    named = {sharding[r] for r in readers if r in sharding}
    if len(named) > 1:
        raise ValueError(f"sharding names {sorted(named)} for features {list(readers)}, which share table "
                         f"{table!r}: give one type per table")
    return named.pop() if named else None


def table_constraints(tables: list[TableSpec], sharding: str | Mapping[str, str], embedding_optimizer: str,
                      device_type: str) -> dict[str, Any]:
    """The planner's ``ParameterConstraints`` per table; ``ValueError`` for a sharding or optimizer the device lacks."""
    from torchrec.distributed.planner import ParameterConstraints

    cuda = device_type == "cuda"
    offered = [t for t in SHARDING_TYPES if cuda or t not in CUDA_ONLY_SHARDING]
    fused_on_device = cuda or embedding_optimizer != "adam"
    constraints = {}
    for table in tables:
        wanted = requested_sharding(sharding, table.name, table.readers)
        if wanted is not None and wanted not in offered:
            raise ValueError(f"sharding {wanted!r} (table {table.name!r}) needs CUDA: TorchRec offers row-wise "
                             f"sharding only there; on {device_type} use one of {offered}")
        if wanted == "data_parallel" and table.unpooled:
            raise ValueError(
                f"table {table.name!r} is read by a max-pooled sequence, which TorchRec serves from an "
                "EmbeddingCollection; its data_parallel sharding gives wrong shapes on CPU (TorchRec 1.8): "
                f"shard it table_wise or column_wise, e.g. sharding={{{table.name!r}: 'table_wise', ...}}")
        if wanted not in (None, "data_parallel") and not fused_on_device:
            raise ValueError(
                f"embedding_optimizer='adam' has no fused kernel on {device_type} (fbgemm has fused "
                f"Adam on CUDA only), so table {table.name!r} cannot be sharded {wanted!r}; use "
                "rowwise_adagrad, adagrad or sgd, or sharding='data_parallel'")
        if wanted is not None:
            types = [wanted]
        else:
            types = [t for t in offered if (fused_on_device or t == "data_parallel")
                     and not (table.unpooled and t == "data_parallel")]
        kernels = (["dense"] if types == ["data_parallel"] else ["fused"] if "data_parallel" not in types
                   else None)
        constraints[table.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    return constraints


__all__ = ["SHARDING_TYPES", "CUDA_ONLY_SHARDING", "check_sharding", "requested_sharding", "table_constraints"]
