"""Training: the Lightning plan and callbacks (separate from the torch modules)."""

from regvi.train.callbacks import HistoryCallback
from regvi.train.plan import TrainingPlan

__all__ = ["HistoryCallback", "TrainingPlan"]
