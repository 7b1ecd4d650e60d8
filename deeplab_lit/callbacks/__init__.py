"""Lightning callbacks and plugins: dense CRF, predictions, checkpoints and interrupts, SyncBatchNorm."""

from deeplab_lit.callbacks.crf import DenseCRFCallback
from deeplab_lit.callbacks.gallery import PredictionGallery
from deeplab_lit.callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
from deeplab_lit.callbacks.interrupt import InterruptCheckpoint, TrainingInterrupted
from deeplab_lit.callbacks.prediction_writer import PredictionWriter
from deeplab_lit.callbacks.resume import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    CheckpointWriteError,
    RandomStateCheckpoint,
)
from deeplab_lit.callbacks.summary import RunSummary
from deeplab_lit.callbacks.sync_batchnorm import SyncBatchNorm

__all__ = [
    "AtomicCheckpointIO",
    "BestAndLastCheckpoint",
    "CheckpointWriteError",
    "DenseCRFCallback",
    "InterruptCheckpoint",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PredictionGallery",
    "PredictionWriter",
    "RandomStateCheckpoint",
    "RunSummary",
    "SyncBatchNorm",
    "TrainingInterrupted",
]
