"""Training: the Lightning plan and callbacks (separate from the torch modules)."""

from regvi.train.callbacks import (
    LAST_CHECKPOINT,
    EpochCheckpoint,
    HistoryCallback,
    ThrottledProgressBar,
)
from regvi.train.plan import TrainingPlan

__all__ = [
    "LAST_CHECKPOINT",
    "EpochCheckpoint",
    "HistoryCallback",
    "ThrottledProgressBar",
    "TrainingPlan",
]
