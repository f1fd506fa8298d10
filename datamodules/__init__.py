"""Lightning data modules for mtl-lightning."""

from .base import MultiTaskDataModule
from .encoders import DenseNormalizer, HashingEncoder, VocabularyEncoder
from .parquet import ParquetBatches, ParquetDataModule, infer_features, read_split, resolve_paths
from .paths import DataFile
from .predictions import ParquetPredictionWriter
from .storage import RetryPolicy
from .streaming import ParquetStream

__all__ = [
    "ParquetDataModule", "MultiTaskDataModule", "ParquetBatches", "ParquetStream", "ParquetPredictionWriter",
    "VocabularyEncoder", "HashingEncoder", "DenseNormalizer", "infer_features", "read_split", "resolve_paths",
    "DataFile", "RetryPolicy",
]
