"""Training: the Lightning plan and callbacks (separate from the torch modules)."""

from regvi.train.callbacks import (
    LAST_CHECKPOINT,
    ElboEarlyStopping,
    EpochCheckpoint,
    HistoryCallback,
    ThrottledProgressBar,
)
from regvi.train.plan import TrainingPlan

__all__ = [
    "LAST_CHECKPOINT",
    "ElboEarlyStopping",
    "EpochCheckpoint",
    "HistoryCallback",
    "ThrottledProgressBar",
    "TrainingPlan",
]
