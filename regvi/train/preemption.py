"""Pre-emption: a warning signal makes a run checkpoint at the next step and exit for requeue.

Batch systems warn a job before they kill it: LSF sends the signal chosen with ``bsub -wa``
(regvi's LSF launcher asks for ``SIGUSR2``) ``-wt`` minutes before a run limit or a
pre-emption, and requeues a job that exits with a code listed in ``-Q``; ``kill`` and most
schedulers send ``SIGTERM``. While a run is training, either signal only sets a flag
(:func:`preemption_signals` installs the handlers); :class:`PreemptionCallback` looks at the
flag after every training batch (all processes agree under data-parallel training, so every
rank stops at the same step), writes the checkpoint and raises :class:`Preempted`. The CLI
turns that into exit code :data:`REQUEUE_EXIT_CODE`; ``resume=<run_dir>`` (or the requeued
sweep element, which finds its checkpoint) continues the run where it stopped, with the same
result as an uninterrupted run on the CPU.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl

from regvi.errors import REQUEUE_EXIT_CODE, Preempted

__all__ = ["REQUEUE_EXIT_CODE", "Preempted", "PreemptionCallback", "preemption_signals"]
#: Signals that stop a run at the next step with a checkpoint.
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)

_received: list[int] = []  # signal numbers received by this process (a flag per process)


def stop_requested() -> int | None:
    """The pre-emption signal this process received, or None."""
    return _received[0] if _received else None


def clear() -> None:
    """Forget a received signal (a new run in the same process starts afresh)."""
    _received.clear()


def _handle(signum: int, frame: Any) -> None:
    if not _received:
        _received.append(int(signum))


def _handle_and_forward(signum: int, frame: Any) -> None:
    _handle(signum, frame)
    # the processes a ddp_spawn run trains in do not get a signal sent to this process
    # alone: pass it on (harmless when the whole process group was signalled). Only the
    # launching process forwards: a training process's children are data-loader workers.
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError):
            os.kill(child.pid, signum)


def install_handlers(forward: bool = False) -> dict[int, Any]:
    """Make :data:`PREEMPTION_SIGNALS` set the flag (and, with ``forward``, pass the signal on
    to this process's child processes); return the handlers replaced (empty when not in the
    main thread, where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in PREEMPTION_SIGNALS:
        previous[int(sig)] = signal.getsignal(sig)
        signal.signal(sig, _handle_and_forward if forward else _handle)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back handlers returned by :func:`install_handlers`."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def preemption_signals() -> Iterator[None]:
    """Within the block, a pre-emption signal sets the flag instead of killing the process
    (so a signal during data loading stops the run when training starts)."""
    clear()
    previous = install_handlers(forward=True)
    try:
        yield
    finally:
        restore_handlers(previous)
        clear()


class PreemptionCallback(pl.Callback):
    """After every training batch (after the epoch's end instead of its last batch): if a
    pre-emption signal arrived (in any process), write the checkpoint with ``save``
    (collective under DDP) and raise :class:`Preempted`.

    Installs the handlers for the duration of training (Lightning installs its own SIGTERM
    handler when fitting starts, and a spawned process starts with none) and restores the
    previous ones at teardown.
    """

    def __init__(self, save: Callable[[pl.Trainer], None]):
        self.save = save
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._previous = install_handlers()
        self._check(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            # the epoch's last batch (the same on every rank): stop once the epoch has ended
            # (validation, history), at an ordinary epoch-end checkpoint. One written here
            # would resume past the epoch's end without running it.
            return
        self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        requested = stop_requested() is not None
        if trainer.world_size > 1:  # every rank stops at the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        self.save(trainer)
        signum = stop_requested()
        clear()  # handled: a later run in this process starts afresh
        name = signal.Signals(signum).name if signum else "a pre-emption signal (another rank)"
        raise Preempted(
            f"stopped by {name} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            "the checkpoint is written"
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        restore_handlers(self._previous)
        self._previous = {}
