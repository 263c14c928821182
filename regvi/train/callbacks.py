"""Lightning callbacks: per-epoch history, crash-safe checkpoints, early stopping."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from regvi.run.layout import LAST_CHECKPOINT


class HistoryCallback(pl.Callback):
    """Collects every epoch-level metric into :attr:`records` (one dict per epoch).

    Validation runs before ``on_train_epoch_end`` in Lightning 2, so each record holds the
    epoch's training and validation values together. The records are part of the checkpoint,
    so a resumed run keeps the history of the epochs before the interruption.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks run before the module's own epoch-end hook: make sure the epoch's
        # training means are logged first (idempotent).
        if hasattr(pl_module, "log_epoch_metrics"):
            pl_module.log_epoch_metrics("train")
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        for name, value in trainer.callback_metrics.items():
            if name == "loss":
                continue
            row[name] = float(value)
        self.records.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.records)


class ElboEarlyStopping(pl.Callback):
    """Stop when the validation ELBO stops improving once the KL warm-up is over, and give
    back the weights of the best such epoch.

    During the warm-up the model is fitted to an objective with a KL weight below 1, so its
    validation ELBO (always the full ELBO) compares models fitted to different objectives;
    on small data it peaks there, and stopping at that peak returns a model that never
    paid the full KL price for the information it keeps in z (on a 4k-cell data set:
    batch mixing 0.69 instead of 0.81, see ``docs/integration.md``). So epochs count only
    once the training plan's ``kl_weight`` has reached 1. Training stops after
    ``patience`` such epochs without an improvement of at least ``min_delta``; with
    ``restore_best`` the module ends with the weights of the epoch with the lowest
    validation ELBO after the warm-up (model choice by the held-out bound on
    log p(x), as in standard early stopping). The validation ELBO is summed over processes
    under DDP, so every rank takes the same decision.
    """

    def __init__(
        self,
        monitor: str = "elbo_validation",
        min_delta: float = 0.0,
        patience: int = 45,
        restore_best: bool = True,
    ):
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.patience = int(patience)
        self.restore_best = restore_best
        self.best = float("inf")  # lowest value seen (the weights kept)
        self.reference = float("inf")  # the last value that reset the patience count
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or float(getattr(pl_module, "kl_weight", 1.0)) < 1.0:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value < self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            if self.restore_best:
                self._best_state = {
                    k: v.detach().clone() for k, v in pl_module.state_dict().items()
                }
        if value < self.reference - self.min_delta:
            self.reference, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._best_state is not None:
            pl_module.load_state_dict(self._best_state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "reference": self.reference,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best_state": self._best_state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]
        self.reference = state_dict["reference"]
        self.best_epoch = state_dict["best_epoch"]
        self.wait = state_dict["wait"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self._best_state = state_dict["best_state"]


class EpochCheckpoint(pl.Callback):
    """Writes ``<dirpath>/last.ckpt`` atomically: once before the first step (so even a run
    that fails in its first epoch leaves a loadable checkpoint), after every
    ``every_n_epochs`` epochs, provided ``min_interval_s`` seconds have passed since the
    last write, and after the last epoch (or an early stop). A kill during a write leaves
    the previous checkpoint intact. Put it last in the callback list so the checkpoint
    holds the other callbacks' state for the finished epoch.

    The time floor bounds the cost on small data, where epochs are short and a write every
    epoch would be a noticeable share of the training time (see ``docs/performance.md``),
    while a kill loses at most ``min_interval_s`` seconds of training either way.
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 1, min_interval_s: float = 0):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.min_interval_s = float(min_interval_s)
        self._last_write = 0.0

    @property
    def path(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    def save(self, trainer: pl.Trainer) -> None:
        """Write the checkpoint now (collective under DDP: every rank calls it)."""
        # save_checkpoint is collective under DDP (every rank calls it, rank 0 writes), so
        # the temporary name must be the same on all ranks; only rank 0 renames.
        tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._last_write = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if last or trainer.should_stop:
            self.save(trainer)
        elif epoch % self.every_n_epochs == 0 and self._interval_passed(trainer):
            self.save(trainer)

    def _interval_passed(self, trainer: pl.Trainer) -> bool:
        passed = time.monotonic() - self._last_write >= self.min_interval_s
        if trainer.world_size > 1:  # every rank must make the same (collective) call
            passed = bool(trainer.strategy.broadcast(passed, src=0))
        return passed


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, redrawn at most every ``min_interval`` seconds.

    The stock bar redraws after every batch, a fixed cost per step that is a noticeable share
    of a small CPU step (see ``docs/performance.md``); the counts shown are the same, only
    redrawn less often (and always at an epoch's end).
    """

    def __init__(self, min_interval: float = 0.25):
        super().__init__(refresh_rate=1)
        self.min_interval = min_interval
        self._last_draw = 0.0

    def _due(self, batch_idx: int, total: int | float | None) -> bool:
        now = time.monotonic()
        if now - self._last_draw >= self.min_interval or batch_idx + 1 == total:
            self._last_draw = now
            return True
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(batch_idx, self.total_train_batches):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._due(batch_idx, self.total_val_batches_current_dataloader):
            super().on_validation_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )
