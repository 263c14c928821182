"""``train(cfg, run_dir)`` and ``resume(run_dir)``: the whole ``regvi train`` run, for every
model, as library functions.

The CLI composes the config with Hydra and calls :func:`train`; tests and notebooks call it
directly with a config from :func:`regvi.config.validate_config` (or any mapping fitting the
schema). Everything model-specific goes through the model's adapter
(:mod:`regvi.run.adapter`); file names come from :mod:`regvi.run.layout`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regvi import tracking
from regvi.config import validate_config
from regvi.errors import RegviError
from regvi.outputs import atomic_write
from regvi.run import layout
from regvi.run.adapter import adapter_for
from regvi.train.preemption import (
    REQUEUE_EXIT_CODE,
    Preempted,
    preemption_signals,
    stop_requested,
)

log = logging.getLogger("regvi")


def train_arguments(cfg: DictConfig, logger: Any = False) -> dict[str, Any]:
    """The ``model.train(...)`` arguments taken from ``data.*``, ``trainer.*`` and ``seed``:
    one mapping for every model class, so a trainer option reaches all of them."""
    t = cfg.trainer
    return {
        "max_epochs": t.max_epochs,
        "batch_size": cfg.data.batch_size,
        "validation_batch_size": cfg.data.validation_batch_size,
        "train_size": cfg.data.train_size,
        "num_workers": cfg.data.num_workers,
        "minibatches_per_fetch": cfg.data.minibatches_per_fetch,
        "shuffle_block_cells": cfg.data.shuffle_block_cells,
        "early_stopping": t.early_stopping,
        "early_stopping_patience": t.early_stopping_patience,
        "early_stopping_min_delta_per_feature": t.early_stopping_min_delta_per_feature,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "eps": t.eps,
        "kl_warmup_fraction": t.kl_warmup_fraction,
        "accelerator": t.accelerator,
        "devices": t.devices,
        "strategy": t.strategy,
        "num_nodes": t.num_nodes,
        "precision": t.precision,
        "gradient_clip_val": t.gradient_clip_val,
        "deterministic": t.deterministic,
        "split_seed": cfg.seed,
        "logger": logger,
        "enable_progress_bar": t.enable_progress_bar,
    }


def check_run_dir(cfg: DictConfig, run_dir: Path, resuming: bool) -> None:
    """Refuse to clobber a finished run, or to restart an unfinished one from scratch."""
    results = layout.results_path(run_dir)
    if results is not None and not cfg.overwrite:
        raise RegviError(
            f"{run_dir} already holds {results.name}; choose a new run directory or set "
            "overwrite=true"
        )
    if layout.checkpoint_path(run_dir).exists() and not resuming and not cfg.overwrite:
        raise RegviError(
            f"{run_dir} holds the checkpoint of an unfinished run; continue it with "
            f"`regvi train resume={run_dir}` or set overwrite=true to start again"
        )


def is_global_rank_zero() -> bool:
    """False in the processes of a torchrun-launched run other than global rank 0 (``RANK``
    is set by torchrun); True otherwise (a single process, or ddp_spawn's launching one)."""
    return os.environ.get("RANK", "0") in ("", "0")


def preempted_run(exc: BaseException, run_dir: Path) -> Preempted | None:
    """The :class:`Preempted` error to report when training stopped on a pre-emption signal
    (raised in this process, or in spawned data-parallel processes, which the launcher
    reports as another error), else None."""
    stopped = isinstance(exc, Preempted) or (
        stop_requested() is not None and layout.checkpoint_path(run_dir).exists()
    )
    if not stopped:
        return None
    detail = str(exc) if isinstance(exc, Preempted) else "stopped by a pre-emption signal"
    return Preempted(f"{detail}; continue it with `regvi train resume={run_dir}`")


def resume(run_dir: str | Path) -> Path:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved config.

    Weights, optimizer state, step counter (hence the KL warm-up position), RNG states,
    history and the W&B run id are restored, so on the CPU with the same data the result
    matches an uninterrupted run. Works for every model.
    """
    run_dir = Path(run_dir)
    saved = run_dir / layout.RUN_CONFIG
    checkpoint = layout.checkpoint_path(run_dir)
    if not saved.exists() or not checkpoint.exists():
        raise RegviError(
            f"cannot resume {run_dir}: it has no {layout.RUN_CONFIG} and "
            f"{layout.CHECKPOINT_DIR}/{layout.LAST_CHECKPOINT} (is it a regvi run directory?)"
        )
    results = layout.results_path(run_dir)
    if results is not None:
        raise RegviError(f"{run_dir} already finished (it holds {results.name}); nothing to resume")
    return train(OmegaConf.load(saved), run_dir, _resume_from=checkpoint)


def train(cfg: DictConfig | dict, run_dir: str | Path, _resume_from: Path | None = None) -> Path:
    """Train the configured model (``model.name``) and write every output into ``run_dir``;
    return it.

    Outputs: the results file (``results.h5ad`` for ``rna``, ``results.h5mu`` for
    ``multimodal``; see :mod:`regvi.run.rna` and :mod:`regvi.run.multimodal`), ``model/``
    (weights + metadata, readable by the model class's ``load``), ``history.csv``,
    ``figures/*.png``, the resolved ``config.yaml`` and ``checkpoints/last.ckpt`` (for
    :func:`resume`); with ``evaluate=true`` also the outputs of
    :func:`regvi.run.evaluate.evaluate_run`. Raises :class:`~regvi.errors.RegviError`
    subclasses for bad configuration or data; a failed run writes no results file.
    """
    cfg = validate_config(cfg)
    adapter = adapter_for(cfg.model.name)
    run_dir = Path(run_dir)
    check_run_dir(cfg, run_dir, resuming=_resume_from is not None)
    # SIGUSR2 / SIGTERM from here on: checkpoint at the next step, then Preempted
    with preemption_signals():
        return _train(cfg, adapter, run_dir, _resume_from)


def _train(cfg: DictConfig, adapter: Any, run_dir: Path, _resume_from: Path | None) -> Path:
    import lightning.pytorch as pl

    from regvi.train.host_memory import reuse_host_memory

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    data, labels_key = adapter.setup(adapter.load_data(cfg), cfg)
    model = adapter.build(data, cfg)
    log.info("%s", adapter.describe(model, data))

    run_dir.mkdir(parents=True, exist_ok=True)
    main = is_global_rank_zero()
    if _resume_from is None and main:
        atomic_write(run_dir / layout.RUN_CONFIG, lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
    logger = tracking.make_logger(cfg, run_dir)
    # the allocator setting is process-wide: applied around this run's training only, and
    # restored afterwards (a library call of model.train() leaves the allocator alone)
    with reuse_host_memory(cfg.trainer.reuse_host_memory):
        try:
            model.train(
                **train_arguments(cfg, logger),
                checkpoint_dir=run_dir / layout.CHECKPOINT_DIR,
                checkpoint_every_n_epochs=cfg.trainer.checkpoint_every_n_epochs,
                checkpoint_min_interval_s=cfg.trainer.checkpoint_min_interval_s,
                resume_from=_resume_from,
                handle_preemption=True,
            )
        except Exception as exc:
            preempted = preempted_run(exc, run_dir)
            if preempted is None:
                raise
            tracking.finish(logger, exit_code=REQUEUE_EXIT_CODE)
            raise preempted from None
    if not main:
        # a process of a multi-node (torchrun) run: global rank 0 writes every output
        return run_dir
    adapter.write_outputs(model, data, cfg, run_dir, logger, labels_key)
    if cfg.evaluate:
        from regvi.run.evaluate import evaluate_after_training

        evaluate_after_training(cfg, run_dir, logger)
    tracking.finish(logger)
    return run_dir
