"""``train(cfg, run_dir)``: the whole ``regvi train`` run as a library function.

The CLI composes the config with Hydra and calls this; tests and notebooks call it directly
with a config from :func:`regvi.config.validate_config` (or any mapping fitting the schema).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import anndata as ad
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from regvi import tracking
from regvi.config import validate_config
from regvi.data.io import read_h5ad
from regvi.errors import RegviError
from regvi.model import AmbientRegularizedSCVI
from regvi.outputs import (
    CHECKPOINT_DIR,
    FIGURES_DIR,
    HISTORY_CSV,
    MODEL_DIR,
    RESULTS_H5AD,
    RUN_CONFIG,
    atomic_write,
    write_csv_atomic,
    write_h5ad_atomic,
)
from regvi.train import LAST_CHECKPOINT

log = logging.getLogger("regvi")
LATENT_KEY = "X_regvi"
NORMALIZED_LAYER = "regvi_normalized"


def load_input(cfg: DictConfig) -> ad.AnnData:
    """The input AnnData: ``data.path`` or, when null, the built-in simulated dataset."""
    if cfg.data.path is None:
        from regvi.datasets import simulate

        s = cfg.data.simulate
        adata, _ = simulate(
            n_cells=s.n_cells,
            n_genes=s.n_genes,
            n_cell_types=s.n_cell_types,
            n_batches=s.n_batches,
            seed=s.seed,
        )
        return adata
    return read_h5ad(cfg.data.path, backed=cfg.data.backed)


def _covariate_arguments(cfg: DictConfig) -> dict[str, Any]:
    covariates = OmegaConf.to_container(cfg.covariates, resolve=True)
    if cfg.data.path is None and not any(covariates.values()):
        # The built-in dataset's batches are its libraries.
        covariates["batch_key"] = "batch"
    return covariates


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
        "precision": t.precision,
        "gradient_clip_val": t.gradient_clip_val,
        "deterministic": t.deterministic,
        "reuse_host_memory": t.reuse_host_memory,
        "split_seed": cfg.seed,
        "logger": logger,
        "enable_progress_bar": t.enable_progress_bar,
    }


def _check_run_dir(cfg: DictConfig, run_dir: Path, resuming: bool) -> None:
    """Refuse to clobber a finished run, or to restart an unfinished one from scratch."""
    if (run_dir / RESULTS_H5AD).exists() and not cfg.overwrite:
        raise RegviError(
            f"{run_dir} already holds {RESULTS_H5AD}; choose a new run directory or set "
            "overwrite=true"
        )
    checkpoint = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if checkpoint.exists() and not resuming and not cfg.overwrite:
        raise RegviError(
            f"{run_dir} holds the checkpoint of an unfinished run; continue it with "
            f"`regvi train resume={run_dir}` or set overwrite=true to start again"
        )


def resume(run_dir: str | Path) -> Path:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved config.

    Weights, optimizer state, step counter (hence the KL warm-up position), RNG states,
    history and the W&B run id are restored, so on the CPU with the same data the result
    matches an uninterrupted run.
    """
    run_dir = Path(run_dir)
    saved = run_dir / RUN_CONFIG
    checkpoint = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not saved.exists() or not checkpoint.exists():
        raise RegviError(
            f"cannot resume {run_dir}: it has no {RUN_CONFIG} and {CHECKPOINT_DIR}/"
            f"{LAST_CHECKPOINT} (is it a regvi run directory?)"
        )
    if (run_dir / RESULTS_H5AD).exists():
        raise RegviError(f"{run_dir} already finished (it holds {RESULTS_H5AD}); nothing to resume")
    return train(OmegaConf.load(saved), run_dir, _resume_from=checkpoint)


def train(cfg: DictConfig | dict, run_dir: str | Path, _resume_from: Path | None = None) -> Path:
    """Train the configured model and write every output into ``run_dir``; return it.

    Outputs: ``results.h5ad`` (input cells + ``obsm["X_regvi"]``, ``obsm["X_umap"]`` and the
    ``regvi_normalized`` layer), ``model/`` (weights + metadata, readable by
    :meth:`AmbientRegularizedSCVI.load`), ``history.csv``, ``figures/*.png``, the resolved
    ``config.yaml`` and ``checkpoints/last.ckpt`` (for :func:`resume`).
    Raises :class:`~regvi.errors.RegviError` subclasses for bad configuration or data; a
    failed run writes no results file.
    """
    cfg = validate_config(cfg)
    if cfg.model.name == "multimodal":
        from regvi.workflow_multimodal import train_multimodal

        return train_multimodal(cfg, run_dir, resume_from=_resume_from)
    run_dir = Path(run_dir)
    _check_run_dir(cfg, run_dir, resuming=_resume_from is not None)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    adata = load_input(cfg)
    labels_key = cfg.data.labels_key
    if labels_key is None and cfg.data.path is None:
        labels_key = "cell_type"
    AmbientRegularizedSCVI.setup_anndata(
        adata, layer=cfg.data.layer, labels_key=labels_key, **_covariate_arguments(cfg)
    )
    rna_only = ("name", "modalities")  # keys that are not AmbientRegularizedSCVI arguments
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in rna_only}
    model = AmbientRegularizedSCVI(adata, **model_kwargs)
    log.info(
        "data: %d cells x %d genes; model: n_latent=%d n_hidden=%d n_layers=%d",
        adata.n_obs,
        adata.n_vars,
        cfg.model.n_latent,
        cfg.model.n_hidden,
        cfg.model.n_layers,
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    if _resume_from is None:
        atomic_write(run_dir / RUN_CONFIG, lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
    logger = tracking.make_logger(cfg, run_dir)
    model.train(
        **train_arguments(cfg, logger),
        checkpoint_dir=run_dir / CHECKPOINT_DIR,
        checkpoint_every_n_epochs=cfg.trainer.checkpoint_every_n_epochs,
        checkpoint_min_interval_s=cfg.trainer.checkpoint_min_interval_s,
        resume_from=_resume_from,
    )
    write_outputs(model, adata, cfg, run_dir, logger, labels_key)
    if cfg.evaluate:
        from regvi.evaluate import evaluate_after_training

        evaluate_after_training(cfg, run_dir, logger)
    tracking.finish(logger)
    return run_dir


def write_outputs(
    model: AmbientRegularizedSCVI,
    adata: ad.AnnData,
    cfg: DictConfig,
    run_dir: Path,
    logger: Any = False,
    labels_key: str | None = None,
) -> dict[str, Path]:
    """Compute latent / normalized expression / UMAP and write results, model, history and
    figures into ``run_dir`` (each atomically), with a progress bar."""
    from regvi import plots

    o = cfg.outputs
    steps = ["latent", "normalized expression", "UMAP + figures", "model", RESULTS_H5AD]
    written: dict[str, Path] = {}
    figures: dict[str, Path] = {}
    streamed: dict[str, Any] = {}
    bar = tqdm(steps, desc="writing outputs", disable=not cfg.trainer.enable_progress_bar)
    for step in bar:
        bar.set_postfix_str(step)
        if step == "latent":
            adata.obsm[LATENT_KEY] = model.get_latent_representation(
                batch_size=o.batch_size, progress="latent"
            )
        elif step == "normalized expression" and o.normalized_expression:
            # Streamed into the results file batch by batch when it is written: never a
            # dense cells x genes array in memory.
            def fill(dataset, model=model) -> None:
                model.get_normalized_expression(
                    library_size=o.normalized_library_size,
                    batch_size=o.batch_size,
                    out=dataset,
                    progress="normalized expression",
                )

            streamed[NORMALIZED_LAYER] = fill
        elif step == "UMAP + figures" and o.figures:
            fig_dir = run_dir / FIGURES_DIR
            fig_dir.mkdir(exist_ok=True)
            figures["loss_curves"] = plots.plot_loss_curves(
                model.history, fig_dir / "loss_curves.png"
            )
            plots.compute_umap(adata, use_rep=LATENT_KEY, seed=cfg.seed)
            keys = [k for k in (model.covariates.keys.library_key, labels_key) if k]
            figures["umap"] = plots.plot_embedding(
                adata, keys, fig_dir / "umap.png", title_prefix="regvi latent: "
            )
            written.update(figures)
        elif step == "model":
            written["model"] = model.save(run_dir / MODEL_DIR, overwrite=True)
            written["history"] = write_csv_atomic(model.history, run_dir / HISTORY_CSV)
        elif step == RESULTS_H5AD:
            adata.uns["regvi_config"] = OmegaConf.to_yaml(cfg)
            target = adata
            if adata.isbacked:
                # Out-of-core input: write everything but X from memory, then copy X from the
                # input file inside HDF5 (never loaded).
                target = ad.AnnData(
                    obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=dict(adata.uns)
                )
            written["results"] = write_h5ad_atomic(
                target,
                run_dir / RESULTS_H5AD,
                streamed,
                copy_x_from=adata.filename if adata.isbacked else None,
            )
    tracking.log_figures(logger, figures)
    log.info("outputs written to %s", os.fspath(run_dir))
    return written
