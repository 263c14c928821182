"""Lightning callbacks: per-epoch history."""

from __future__ import annotations

import lightning.pytorch as pl
import pandas as pd


class HistoryCallback(pl.Callback):
    """Collects every epoch-level metric into :attr:`records` (one dict per epoch).

    Validation runs before ``on_train_epoch_end`` in Lightning 2, so each record holds the
    epoch's training and validation values together.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        for name, value in trainer.callback_metrics.items():
            if name == "loss":
                continue
            row[name] = float(value)
        self.records.append(row)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.records)
