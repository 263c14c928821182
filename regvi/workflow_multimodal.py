"""``regvi train model=multimodal``: train :class:`RegularizedMultimodalVI` and write its outputs.

:func:`regvi.workflow.train` validates the config and hands multimodal runs to
:func:`train_multimodal`. Outputs in the run directory: ``results.h5mu`` (the input MuData with
``obsm["X_regvi"]`` — the joint latent, blocks in alphabetical order of modality names —,
``obsm["X_regvi_<modality>"]``, ``obsm["X_umap"]``, each asked modality's
``layers["regvi_normalized"]``, and in ``obs`` the attribution scores
``regvi_attr_<decoder>_z_<block>``, the shares ``regvi_attr_share_<decoder>_z_<block>`` and
``regvi_measured_<modality>``), ``model/``, ``history.csv`` and ``figures/`` (loss curves,
``umap.png`` and ``attribution.png``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import lightning.pytorch as pl
import numpy as np
from omegaconf import DictConfig, OmegaConf

from regvi import tracking
from regvi.attribution import attribution_obs_columns
from regvi.data.mudata_io import read_h5mu, resolve_modalities, shared_cells
from regvi.errors import ConfigError, RegviError
from regvi.model.multimodal import DEFAULTS, MODALITY_COVARIATE_ROLES, RegularizedMultimodalVI
from regvi.outputs import (
    FIGURES_DIR,
    HISTORY_CSV,
    MODEL_DIR,
    write_csv_atomic,
    write_h5mu_atomic,
)
from regvi.workflow import (
    LATENT_KEY,
    NORMALIZED_LAYER,
    _covariate_arguments,
    train_arguments,
)

log = logging.getLogger("regvi")
RESULTS_H5MU = "results.h5mu"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_multiome(cfg: DictConfig) -> Any:
    """``data.path`` as MuData or, when null, a simulated RNA + ATAC multiome."""
    if cfg.data.path is not None:
        return read_h5mu(cfg.data.path)
    import mudata

    from regvi.datasets import simulate_multiome

    # data.simulate's keys are simulate_multiome's arguments; as many peaks as genes.
    rna, atac, _ = simulate_multiome(**_plain(cfg.data.simulate), n_peaks=cfg.data.simulate.n_genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"rna": rna, "atac": atac})
    mdata.obs = rna.obs.copy()
    return mdata


def model_arguments(cfg: DictConfig, names: list[str]) -> tuple[dict, dict]:
    """Model keyword arguments (per-modality dicts where ``model.modalities`` overrides a
    scalar) and the per-modality covariate roles, for the data's modalities ``names``."""
    options = _plain(cfg.model)
    options.pop("name", None)
    per = options.pop("modalities", None) or {}
    absent = sorted(set(per) - set(names))
    if absent:
        log.info("model.modalities: ignoring %s (not in the data)", ", ".join(absent))
    covariates: dict[str, dict] = {}
    for m in names:
        for key in per.get(m) or {}:
            if key not in DEFAULTS and key not in MODALITY_COVARIATE_ROLES:
                raise ConfigError(f"model.modalities.{m}.{key} is not a model option or role")
        covariates[m] = {
            k: v for k, v in (per.get(m) or {}).items() if k in MODALITY_COVARIATE_ROLES
        }
    kwargs: dict[str, Any] = {}
    for key in DEFAULTS:
        given = {m: per[m][key] for m in names if key in (per.get(m) or {})}
        if key in options:
            kwargs[key] = {m: given.get(m, options[key]) for m in names} if given else options[key]
        elif given:
            kwargs[key] = given
    return kwargs, {m: c for m, c in covariates.items() if c}


def train_multimodal(cfg: DictConfig, run_dir: str | Path, resume_from: Path | None = None) -> Path:
    """Train the multimodal model on ``cfg`` (already validated) and write every output."""
    if resume_from is not None:
        raise RegviError("resume is not supported for model=multimodal yet; start a new run")
    run_dir = Path(run_dir)
    if (run_dir / RESULTS_H5MU).exists() and not cfg.overwrite:
        raise RegviError(f"{run_dir} already holds {RESULTS_H5MU}; choose a new run directory")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    mdata = load_multiome(cfg)
    layers = resolve_modalities(mdata, _plain(cfg.data.modalities))
    cells = shared_cells(mdata, list(layers), cfg.data.missing_cells)
    if not cells.equals(mdata.obs_names):  # cells only in unused modalities
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mdata = mdata[cells].copy()
    kwargs, modality_covariates = model_arguments(cfg, list(layers))
    labels_key = cfg.data.labels_key
    if labels_key is None and cfg.data.path is None:
        labels_key = "cell_type"
    RegularizedMultimodalVI.setup_mudata(
        mdata,
        modalities=layers,
        labels_key=labels_key,
        missing_cells=cfg.data.missing_cells,
        modality_covariates=modality_covariates,
        **_covariate_arguments(cfg),
    )
    model = RegularizedMultimodalVI(mdata, **kwargs)
    log.info(
        "data: %d cells; %s; latent blocks %s",
        mdata.n_obs,
        ", ".join(f"{m} {len(f)} features" for m, f in model.feature_names.items()),
        {m: (s.start, s.stop) for m, s in model.latent_blocks.items()},
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = tracking.make_logger(cfg, run_dir)
    model.train(**train_arguments(cfg, logger))
    write_multimodal_outputs(model, mdata, cfg, run_dir, logger, labels_key)
    tracking.finish(logger)
    return run_dir


def write_multimodal_outputs(
    model: RegularizedMultimodalVI,
    mdata: Any,
    cfg: DictConfig,
    run_dir: Path,
    logger: Any = False,
    labels_key: str | None = None,
) -> dict[str, Path]:
    """Latents, normalized values, attribution, UMAP and figures, model and ``results.h5mu``
    (each file written atomically)."""
    from regvi import plots

    o = cfg.outputs
    written: dict[str, Path] = {}
    bars = cfg.trainer.enable_progress_bar
    joint = model.get_latent_representation(
        batch_size=o.batch_size, progress="latent" if bars else None
    )
    mdata.obsm[LATENT_KEY] = joint
    for m, cols in model.latent_blocks.items():
        mdata.obsm[f"{LATENT_KEY}_{m}"] = joint[:, cols]
        totals = np.asarray(model._dataset().matrices[m].sum(axis=1)).ravel()
        mdata.obs[f"regvi_measured_{m}"] = totals > 0
    asked = _plain(o.normalized_modalities)
    asked = model.modality_names if asked is None else [asked] if isinstance(asked, str) else asked
    # Streamed into the results file batch by batch when it is written, in each modality's
    # own cell order: never a dense cells x features array in memory.
    streamed: dict[str, dict[str, Any]] = {}
    for m in asked if o.normalized_expression else []:

        def fill(dataset, modality=m) -> None:
            model.get_normalized_expression(
                modality,
                indices=mdata.obs_names.get_indexer(mdata.mod[modality].obs_names),
                library_size=o.normalized_library_size,
                batch_size=o.batch_size,
                out=dataset,
                progress=f"normalized {modality}" if bars else None,
            )

        streamed[m] = {NORMALIZED_LAYER: fill}
    table = model.get_modality_attribution(
        batch_size=None if o.batch_size is None else min(o.batch_size, 256),
        progress="attribution" if bars else None,
    )
    for col, values in attribution_obs_columns(table).items():
        mdata.obs[col] = values.to_numpy()
    if o.figures:
        fig_dir = run_dir / FIGURES_DIR
        fig_dir.mkdir(exist_ok=True)
        written["loss_curves"] = plots.plot_loss_curves(model.history, fig_dir / "loss_curves.png")
        view = ad.AnnData(obs=mdata.obs.copy())
        view.obsm[LATENT_KEY] = joint
        mdata.obsm["X_umap"] = plots.compute_umap(view, use_rep=LATENT_KEY, seed=cfg.seed)
        keys = [k for k in (model.shared_covariates.keys.library_key, labels_key) if k]
        measured = [f"regvi_measured_{m}" for m in model.modality_names]
        keys += [k for k in measured if not view.obs[k].all()] or ([] if keys else measured[:1])
        written["umap"] = plots.plot_embedding(
            view, keys, fig_dir / "umap.png", title_prefix="regvi latent: "
        )
        written["attribution"] = plots.plot_attribution_scatter(view, fig_dir / "attribution.png")
    figures = {k: v for k, v in written.items() if k != "model"}
    written["model"] = model.save(run_dir / MODEL_DIR, overwrite=True)
    written["history"] = write_csv_atomic(model.history, run_dir / HISTORY_CSV)
    mdata.uns["regvi_config"] = OmegaConf.to_yaml(cfg)
    written["results"] = write_h5mu_atomic(mdata, run_dir / RESULTS_H5MU, streamed)
    tracking.log_figures(logger, figures)
    log.info("outputs written to %s", os.fspath(run_dir))
    return written
