"""mtl-lightning: multi-task recommendation architectures trained by one Lightning module."""

from .features import DenseFeature, SequenceFeature, SparseFeature
from .module import MultiTaskLightningModule
from .tasks import Task
from . import distributed  # noqa: F401  (registers Trainer(strategy="torchrec"); imports no TorchRec)

__all__ = ["SparseFeature", "DenseFeature", "SequenceFeature", "Task", "MultiTaskLightningModule"]
__version__ = "0.1.0"
