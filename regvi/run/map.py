"""``regvi map <run_dir> data.path=<query.h5ad|query.h5mu>``: map cells from new libraries
(or studies) onto a trained reference (either model) and transfer its labels.

Writes into ``<run_dir>/map/<time>/`` (or ``out_dir``) the outputs of a run for the query
cells (see :mod:`regvi.run.rna` / :mod:`regvi.run.multimodal`): the results file with
``obsm["X_regvi"]`` in the reference's latent space and, when the reference run had a labels
column, ``obs["regvi_predicted_<labels_key>"]`` and ``obs["regvi_prediction_uncertainty"]``;
the mapped model (``model/``, whose categories are the reference's and the new
ones), ``history.csv`` of the mapping, ``config.yaml`` and ``figures/``, among them
``map_umap.png``: a joint UMAP of reference and query cells coloured by origin and by label.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from regvi.errors import DataError
from regvi.outputs import atomic_write
from regvi.run import layout
from regvi.run.predict import PREDICT_KEYS, command_output_dir, load_run_model

log = logging.getLogger("regvi")

#: Keys ``regvi map`` accepts as ``key=value`` (prefixes end with a dot): those of
#: ``regvi predict`` plus the training settings of the mapping.
MAP_KEYS = (
    *(k for k in PREDICT_KEYS if not k.startswith("trainer.")),
    "trainer.",
    "data.batch_size",
    "data.num_workers",
)
#: Neighbours of the kNN label transfer.
LABEL_TRANSFER_NEIGHBOURS = 15
#: At most this many reference cells (a random subset) are drawn in the joint UMAP.
MAP_UMAP_MAX_REFERENCE_CELLS = 50_000

__all__ = ["MAP_KEYS", "map_query_run", "reference_latent"]

#: ``train_arguments`` that the mapping sets itself (see ``map_query``) or does not use.
_NOT_MAPPING_ARGUMENTS = (
    "max_epochs",
    "train_size",
    "validation_batch_size",
    "early_stopping",
    "early_stopping_patience",
    "early_stopping_min_delta_per_feature",
    "weight_decay",
    "kl_warmup_fraction",
    "strategy",
    "devices",
)


def reference_latent(results: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """obs and ``obsm["X_regvi"]`` of a run's results file (``.h5ad`` or the global ones of
    an ``.h5mu``), read without its count matrices and layers."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(results, "r") as f:
        key = f"obsm/{layout.LATENT_KEY}"
        if key not in f:
            raise DataError(f"{results} has no obsm[{layout.LATENT_KEY!r}]")
        return read_elem(f["obs"]), np.asarray(read_elem(f[key]))


def map_query_run(
    run_dir: str | Path,
    data_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    n_neighbors: int = LABEL_TRANSFER_NEIGHBOURS,
) -> Path:
    """Map the cells of ``data_path`` onto the model of the finished run ``run_dir`` with
    its ``map_query`` (new libraries and studies get new technical rows learned on the query
    alone; the reference network is frozen), transfer the reference's labels by a kNN vote in the
    latent (``n_neighbors`` neighbours among the reference cells of the run's results file;
    see :func:`regvi.metrics.knn_label_transfer`) and write the outputs into ``out_dir``
    (default ``<run_dir>/map/<timestamp>``); return ``out_dir``.

    ``overrides`` (see :data:`MAP_KEYS`): ``data.path``, ``data.layer``, ``seed``,
    ``outputs.<key>``, ``data.batch_size`` and ``trainer.<key>`` (the run's values by
    default; ``trainer.max_epochs`` defaults to scvi-tools' heuristic for the query size,
    not the reference's). New values of any categorical covariate (libraries, studies,
    kits) get their own rows (see :meth:`~regvi.model.mapping.QueryMappingMixin.map_query`).
    Raises :class:`~regvi.errors.DataError` for a query with missing features or covariate
    columns, or a known library in a new dataset.
    """
    import lightning.pytorch as pl

    from regvi.run.pipeline import train_arguments

    run_dir = Path(run_dir)
    values = dict(overrides or {})
    if data_path is not None:
        values["data.path"] = str(data_path)
    cfg, adapter, model = load_run_model(run_dir, values, "map")
    results = layout.results_path(run_dir)
    if results is None:
        raise DataError(f"{run_dir} has no results file; is it a finished regvi train run?")
    out_dir = command_output_dir(run_dir, layout.MAP_DIR, out_dir, adapter.results_file)
    query = adapter.read_matched(model, cfg)
    arguments = {k: v for k, v in train_arguments(cfg).items() if k not in _NOT_MAPPING_ARGUMENTS}
    max_epochs = values.get("trainer.max_epochs")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    mapped = model.map_query(
        query,
        max_epochs=None if max_epochs in (None, "null", "None") else int(max_epochs),
        **arguments,
    )
    if mapped.history_ is None:  # nothing to learn; the loss-curve figure needs a table
        mapped.history_ = pd.DataFrame({"epoch": []})
    latent = mapped.get_latent_representation(batch_size=cfg.outputs.batch_size)

    reference_obs, reference = reference_latent(results)
    labels_key = model.setup_.get("labels_key")
    predicted = None
    if labels_key and labels_key in reference_obs.columns:
        from regvi.metrics import knn_label_transfer

        predicted, uncertainty = knn_label_transfer(
            reference, reference_obs[labels_key], latent, k=n_neighbors, seed=cfg.seed
        )
        query.obs[layout.predicted_label_column(labels_key)] = pd.Categorical(predicted)
        query.obs[layout.PREDICTION_UNCERTAINTY] = uncertainty
        log.info(
            "labels transferred from %s (k=%d): median uncertainty %.3f",
            labels_key,
            n_neighbors,
            float(np.median(uncertainty)),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.outputs.figures:
        fig_dir = out_dir / layout.FIGURES_DIR
        fig_dir.mkdir(exist_ok=True)
        joint_umap(
            reference,
            reference_obs[labels_key] if predicted is not None else None,
            latent,
            predicted,
            labels_key,
            fig_dir / layout.MAP_UMAP_FIGURE,
            cfg.seed,
        )
    query_labels = adapter.labels_key(mapped, query)
    adapter.write_outputs(mapped, query, cfg, out_dir, False, query_labels)
    atomic_write(out_dir / layout.RUN_CONFIG, lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
    return out_dir


def joint_umap(
    reference: np.ndarray,
    reference_labels: pd.Series | None,
    query: np.ndarray,
    query_labels: np.ndarray | None,
    labels_key: str | None,
    path: Path,
    seed: int = 0,
) -> Path:
    """UMAP of reference and query latents together (at most
    :data:`MAP_UMAP_MAX_REFERENCE_CELLS` reference cells, a random subset), coloured by
    origin (``reference`` / ``query``) and, with labels, by label: the reference's own and
    the query's transferred ones."""
    import anndata as ad

    from regvi import plots

    rng = np.random.default_rng(seed)
    keep = np.arange(reference.shape[0])
    if keep.size > MAP_UMAP_MAX_REFERENCE_CELLS:
        keep = np.sort(rng.choice(keep, MAP_UMAP_MAX_REFERENCE_CELLS, replace=False))
    n_ref, n_query = keep.size, query.shape[0]
    source = np.array(["reference"] * n_ref + ["query"] * n_query)
    obs = pd.DataFrame(
        {layout.MAP_SOURCE: pd.Categorical(source, categories=["reference", "query"])},
        index=pd.RangeIndex(n_ref + n_query).astype(str),
    )
    keys = [layout.MAP_SOURCE]
    if reference_labels is not None and query_labels is not None and labels_key:
        labels = np.concatenate(
            [np.asarray(reference_labels, dtype=object)[keep], np.asarray(query_labels)]
        )
        column = f"{labels_key} (query: predicted)"
        obs[column] = pd.Categorical(pd.Series(labels).astype(str).to_numpy())
        keys.append(column)
    view = ad.AnnData(obs=obs)
    view.obsm[layout.LATENT_KEY] = np.vstack([reference[keep], query]).astype(np.float32)
    plots.compute_umap(view, use_rep=layout.LATENT_KEY, seed=seed)
    return plots.plot_embedding(view, keys, path, title_prefix="reference + query: ")
