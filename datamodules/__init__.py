"""Lightning data modules for mtl-lightning."""

from .parquet import ParquetBatches, ParquetDataModule, infer_features, read_split, resolve_paths

__all__ = ["ParquetDataModule", "ParquetBatches", "infer_features", "read_split", "resolve_paths"]
