"""``regvi evaluate <run_dir>``: integration metrics of a trained run (either model),
optionally beside baselines (PCA of log-normalised counts, scvi-tools' SCVI), written as
``metrics.json``, ``metrics.csv`` and figures into the run directory (and to W&B when the run
used it).

The metrics themselves live in :mod:`regvi.metrics`; what is measured in a run comes from
its model's adapter (:meth:`regvi.run.adapter.ModelAdapter.evaluation_data`): the RNA
model's latent, or the multimodal model's joint latent and each modality's block.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from regvi import metrics
from regvi.data.covariates import CovariateKeys
from regvi.errors import ConfigError, DataError, RegviError
from regvi.outputs import atomic_write, write_csv_atomic
from regvi.run import layout
from regvi.run.adapter import EvaluationData, adapter_for_class
from regvi.run.layout import METRICS_CSV, METRICS_JSON, NEIGHBOURHOOD_CSV, SCIB_CSV

log = logging.getLogger("regvi")

BASELINES = ("pca", "scvi")
BENCH_HINT = 'pip install "regvi[bench]"'
MIN_MARKERS = 10
FALLBACK_MARKERS = 200

__all__ = [
    "default_marker_path",
    "load_markers",
    "select_markers",
    "evaluate_run",
    "evaluate_after_training",
    "pca_embedding",
    "scvi_embedding",
    "wide_table",
]


# --------------------------------------------------------------------------- markers
def default_marker_path() -> Path:
    """The curated human immune / bone-marrow marker list shipped with regvi."""
    return Path(str(resources.files("regvi.resources") / "immune_bone_marrow_markers.csv"))


def load_markers(path: str | Path | None = None) -> pd.DataFrame:
    """A marker table with columns ``gene, cell_type, lineage, category`` (the shipped list
    when ``path`` is None)."""
    path = default_marker_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise DataError(f"marker list not found: {path}")
    table = pd.read_csv(path)
    missing = [c for c in ("gene", "cell_type", "lineage", "category") if c not in table.columns]
    if missing:
        raise DataError(
            f"marker list {path} lacks column(s) {', '.join(missing)} "
            "(expected gene, cell_type, lineage, category)"
        )
    return table


def select_markers(
    var_names: Sequence[str],
    lognorm: sp.csr_matrix,
    markers: pd.DataFrame,
    min_markers: int = MIN_MARKERS,
    fallback_n: int = FALLBACK_MARKERS,
) -> tuple[np.ndarray, str]:
    """Column indices of the marker genes found in ``var_names`` (case-insensitive), and a
    note. With fewer than ``min_markers`` found (e.g. non-human or simulated data) the
    ``fallback_n`` genes of highest variance of the log-normalised expression are used."""
    upper = pd.Index([str(v).upper() for v in var_names])
    wanted = pd.unique(markers["gene"].astype(str).str.upper())
    idx = np.flatnonzero(upper.isin(wanted))
    if idx.size >= min_markers:
        return idx, f"{idx.size} of {len(wanted)} listed markers found in the data"
    mean = np.asarray(lognorm.mean(axis=0)).ravel()
    var = np.asarray(lognorm.multiply(lognorm).mean(axis=0)).ravel() - mean**2
    n = min(fallback_n, len(var_names))
    top = np.sort(np.argsort(-var, kind="stable")[:n])
    return top, (
        f"only {idx.size} listed markers found in the data; used the {n} most variable genes"
    )


# --------------------------------------------------------------------------- baselines
def pca_embedding(lognorm: sp.csr_matrix, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised counts (scaled genes, top 2000 by variance when there are more),
    the standard uncorrected baseline."""
    from sklearn.decomposition import TruncatedSVD

    X = sp.csr_matrix(lognorm)
    mean = np.asarray(X.mean(axis=0)).ravel()
    var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2
    if X.shape[1] > 2000:
        keep = np.sort(np.argsort(-var)[:2000])
        X, mean, var = X[:, keep], mean[keep], var[keep]
    sd = np.sqrt(np.maximum(var, 1e-12))
    dense = (X.toarray() - mean) / sd
    n_comps = int(max(2, min(n_comps, dense.shape[0] - 1, dense.shape[1] - 1)))
    svd = TruncatedSVD(n_components=n_comps, algorithm="arpack", random_state=seed)
    return svd.fit_transform(dense).astype(np.float32)


def scvi_embedding(
    counts: sp.csr_matrix,
    obs: pd.DataFrame,
    keys: CovariateKeys,
    n_latent: int,
    max_epochs: int | None = None,
    accelerator: str = "auto",
    seed: int = 0,
) -> np.ndarray:
    """Train scvi-tools' SCVI on the same counts and covariates: ``batch_key`` = the library
    key, categorical covariates = the dataset and technical keys; return its latent mean."""
    try:
        import scvi
    except ImportError:
        raise RegviError(f"--baseline scvi needs scvi-tools: {BENCH_HINT}") from None
    scvi.settings.seed = seed
    cats = [k for k in [keys.dataset_key, *keys.technical_covariate_keys] if k]
    cats = [k for k in dict.fromkeys(cats) if k != keys.library_key]
    cols = [k for k in [keys.library_key, *cats] if k]
    adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs[cols].copy())
    for c in cols:
        adata.obs[c] = adata.obs[c].astype(str).astype("category")
    scvi.model.SCVI.setup_anndata(
        adata, batch_key=keys.library_key, categorical_covariate_keys=cats or None
    )
    model = scvi.model.SCVI(adata, n_latent=n_latent)
    model.train(max_epochs=max_epochs, accelerator=accelerator, enable_progress_bar=False)
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


# --------------------------------------------------------------------------- the run
def _read_run(run_dir: Path) -> tuple[EvaluationData, dict[str, Any]]:
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    if layout.results_path(run_dir) is None:
        names = " or ".join(layout.RESULTS_FILES.values())
        raise DataError(f"{run_dir} has no {names}; is it a finished regvi train run?")
    meta_path = run_dir / layout.MODEL_DIR / layout.MODEL_METADATA
    if not meta_path.exists():
        raise DataError(
            f"{run_dir} has no {layout.MODEL_DIR}/{layout.MODEL_METADATA}; is it a regvi train run?"
        )
    meta = json.loads(meta_path.read_text())
    adapter = adapter_for_class(meta.get("class", ""), meta_path)
    if not (run_dir / adapter.results_file).exists():
        raise DataError(
            f"{run_dir} has no {adapter.results_file}; is it a finished regvi train run?"
        )
    return adapter.evaluation_data(run_dir, meta), meta


def _mixing_key(keys: CovariateKeys) -> tuple[str | None, str]:
    """The obs column whose mixing is measured: the finest technical unit available."""
    for key, what in (
        (keys.library_key, "library_key"),
        (keys.dataset_key, "dataset_key"),
        (keys.technical_covariate_keys[0] if keys.technical_covariate_keys else None, "technical"),
    ):
        if key:
            return key, what
    return None, "none"


def evaluate_run(
    run_dir: str | Path,
    labels_key: str | None = None,
    baseline: str | Sequence[str] | None = None,
    markers: str | Path | None = None,
    n_neighbors: int = 15,
    silhouette_max_cells: int = metrics.SILHOUETTE_MAX_CELLS,
    max_queries: int = metrics.MAX_QUERIES,
    scib: bool = False,
    figures: bool = True,
    log_wandb: bool = True,
    logger: Any = None,
    baseline_max_epochs: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Compute integration metrics of a ``regvi train`` run and write them into it.

    Reads the results file (``obsm["X_regvi"]``, counts, obs) and ``model/model.json`` (the
    model class and its set-up: layer, labels key, covariate keys). A multimodal run is
    measured on its joint latent (``regvi``) and on each modality's block
    (``regvi_<modality>``, on the cells measured in it); its marker genes come from the RNA
    modality, and ``metrics.json`` also holds ``modality_attribution``: each decoder's mean
    share of attribution per latent block. Batch mixing is measured on the library key
    (else the dataset key, else the first technical key); biological conservation on
    ``labels_key`` (default: the one the model was set up with). ``baseline`` adds ``"pca"``
    (log-normalised counts) and/or ``"scvi"`` (scvi-tools SCVI trained on the same counts and
    covariates; needs the ``bench`` extra). ``scib=True`` also runs scib-metrics'
    Benchmarker (``bench`` extra) and writes ``scib_metrics.csv``.

    Writes (atomically) ``metrics.json``, ``metrics.csv`` (long table: method, metric, value,
    category, note), ``neighbourhood_correlation.csv.gz`` (per-cell values for regvi) and
    ``figures/metrics.png`` + ``figures/umap_comparison.png``. Logs the table and figures to
    W&B: into ``logger`` when it is a WandbLogger (``regvi train`` with ``evaluate``), else
    to a new run (job type ``evaluate``) in the run's project/group when the run's
    ``config.yaml`` says ``logger.name=wandb`` and ``log_wandb`` is true.

    Returns the long metrics table.
    """
    run_dir = Path(run_dir)
    data, meta = _read_run(run_dir)
    view = data.view
    setup = meta.get("setup", {})
    keys = CovariateKeys(**data.covariate_keys) if data.covariate_keys else None
    if keys is None:
        keys = CovariateKeys.resolve(**setup.get("covariates", {}))
    labels_key = labels_key or setup.get("labels_key")
    if labels_key and labels_key not in view.obs.columns:
        raise DataError(
            f"labels column {labels_key!r} not found in the run's results; available: "
            f"{', '.join(map(str, view.obs.columns[:20]))}"
        )
    baselines = _parse_baselines(baseline)
    batch_key, batch_role = _mixing_key(keys)
    purpose = {
        "library_key": keys.library_key,
        "dataset_key": keys.dataset_key,
        "technical_covariate_keys": list(keys.technical_covariate_keys),
    }
    obs = view.obs
    n_cells = obs.shape[0]
    # unlabelled cells (NaN) take no part in label metrics
    labelled = obs[labels_key].notna().to_numpy() if labels_key else np.ones(n_cells, bool)
    counts = data.counts
    lognorm = metrics.log_normalise(counts)
    marker_table = load_markers(markers)
    marker_idx, marker_note = select_markers(data.var_names, lognorm, marker_table)
    marker_expr = lognorm[:, marker_idx]

    embeddings: dict[str, np.ndarray] = dict(data.embeddings)
    for name in baselines:
        log.info("computing the %s baseline", name)
        if name == "pca":
            embeddings["pca"] = pca_embedding(lognorm, seed=seed)
        elif name == "scvi":
            if not keys.library_key:
                raise ConfigError("--baseline scvi needs a library (batch) key in the run")
            embeddings["scvi"] = scvi_embedding(
                counts,
                obs,
                keys,
                n_latent=embeddings["regvi"].shape[1],
                max_epochs=baseline_max_epochs,
                seed=seed,
            )

    tables = []
    per_cell_regvi = None
    for name, X in embeddings.items():
        # an embedding of one modality is measured on the cells measured in it
        cells = data.cell_masks.get(name, np.ones(n_cells, bool))
        log.info("metrics of %s (%d cells x %d dims)", name, int(cells.sum()), X.shape[1])
        sel = labelled & cells
        table = metrics.integration_metrics(
            X[sel],
            obs[batch_key].to_numpy()[sel] if batch_key else None,
            obs[labels_key].to_numpy()[sel] if labels_key else None,
            n_neighbors=n_neighbors,
            max_queries=max_queries,
            silhouette_max_cells=silhouette_max_cells,
            seed=seed,
        )
        graph = metrics.knn_graph(X[cells], n_neighbors, seed=seed)
        per_cell = metrics.neighbourhood_correlation(
            marker_expr[np.flatnonzero(cells)],
            graph.indices,
            obs[cells],
            library_key=purpose["library_key"],
            dataset_key=purpose["dataset_key"],
            technical_keys=purpose["technical_covariate_keys"],
        )
        if name == "regvi":
            per_cell_regvi = per_cell
        table = pd.concat(
            [table, metrics.summarise_neighbourhood_correlation(per_cell)], ignore_index=True
        )
        table.insert(0, "method", name)
        tables.append(table)
    long = pd.concat(tables, ignore_index=True)

    scib_table = None
    if scib:
        scib_table = run_scib_benchmarker(view, embeddings, batch_key, labels_key)

    written = _write_outputs(
        run_dir,
        long,
        per_cell_regvi,
        scib_table,
        info={
            "run_dir": str(run_dir),
            "model": meta.get("class"),
            "n_cells": int(n_cells),
            "batch_key": batch_key,
            "batch_key_role": batch_role,
            "labels_key": labels_key,
            "purpose_keys": purpose,
            "markers": {
                "list": str(markers or default_marker_path().name),
                "note": marker_note,
                "n_genes": int(marker_idx.size),
            },
            "n_neighbors": n_neighbors,
            "silhouette_max_cells": silhouette_max_cells,
            "max_queries": max_queries,
            "clustering": "KMeans with k = number of labels",
            **data.info,
        },
    )
    figs: dict[str, Path] = {}
    if figures:
        fig_dir = run_dir / layout.FIGURES_DIR
        figs["metrics"] = plot_metrics(long, fig_dir / "metrics.png")
        keys_to_plot = [k for k in (batch_key, labels_key) if k]
        if keys_to_plot:
            figs["umap_comparison"] = plot_umaps(
                view, embeddings, keys_to_plot, fig_dir / "umap_comparison.png", seed
            )
    _log_wandb(run_dir, long, scib_table, figs, logger, log_wandb)
    log.info("metrics written to %s", written[METRICS_CSV])
    return long


def _parse_baselines(baseline: str | Sequence[str] | None) -> list[str]:
    if not baseline:
        return []
    items = [baseline] if isinstance(baseline, str) else list(baseline)
    names = [p.strip().lower() for item in items for p in str(item).split(",") if p.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(
            f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def evaluate_after_training(cfg: Any, run_dir: str | Path, logger: Any = None) -> pd.DataFrame:
    """The ``evaluate: true`` step at the end of ``regvi train`` (same W&B run)."""
    return evaluate_run(
        run_dir,
        labels_key=cfg.data.labels_key,
        log_wandb=logger is not None and logger is not False,
        logger=logger if logger is not False else None,
        seed=cfg.seed,
    )


def wide_table(long: pd.DataFrame) -> pd.DataFrame:
    """Metrics as rows, methods as columns (metric order kept)."""
    wide = long.pivot_table(index="metric", columns="method", values="value", dropna=False)
    order = list(dict.fromkeys(long["metric"]))
    methods = list(dict.fromkeys(long["method"]))
    return wide.reindex(index=order, columns=methods)


def _json_value(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _write_outputs(
    run_dir: Path,
    long: pd.DataFrame,
    per_cell: pd.DataFrame | None,
    scib_table: pd.DataFrame | None,
    info: dict[str, Any],
) -> dict[str, Path]:
    written = {METRICS_CSV: write_csv_atomic(long, run_dir / METRICS_CSV)}
    payload = {
        **info,
        "metrics": {
            method: {r.metric: _json_value(r.value) for r in part.itertuples()}
            for method, part in long.groupby("method", sort=False)
        },
        "notes": {
            r.metric: r.note
            for r in long.drop_duplicates("metric").itertuples()
            if isinstance(r.note, str) and r.note
        },
    }
    if scib_table is not None:
        payload["scib_metrics"] = json.loads(scib_table.to_json(orient="index"))
    text = json.dumps(payload, indent=1)
    written[METRICS_JSON] = atomic_write(run_dir / METRICS_JSON, lambda p: p.write_text(text))
    if per_cell is not None:
        written[NEIGHBOURHOOD_CSV] = atomic_write(
            run_dir / NEIGHBOURHOOD_CSV, lambda p: per_cell.to_csv(p, compression="gzip")
        )
    if scib_table is not None:
        written[SCIB_CSV] = atomic_write(run_dir / SCIB_CSV, lambda p: scib_table.to_csv(p))
    return written


def run_scib_benchmarker(
    adata: ad.AnnData,
    embeddings: dict[str, np.ndarray],
    batch_key: str | None,
    labels_key: str | None,
) -> pd.DataFrame:
    """scib-metrics' Benchmarker on every embedding; its results table (unscaled)."""
    try:
        from scib_metrics.benchmark import Benchmarker
    except ImportError:
        raise RegviError(f"--scib needs scib-metrics: {BENCH_HINT}") from None
    if not batch_key or not labels_key:
        raise ConfigError("--scib needs both a batch (library) key and a labels key")
    work = ad.AnnData(obs=adata.obs[[batch_key, labels_key]].copy())
    work = work[work.obs[labels_key].notna().to_numpy()].copy()
    keep = adata.obs[labels_key].notna().to_numpy()
    for name, X in embeddings.items():
        work.obsm[f"X_{name}"] = np.asarray(X)[keep]
    bm = Benchmarker(
        work,
        batch_key=batch_key,
        label_key=labels_key,
        embedding_obsm_keys=[f"X_{n}" for n in embeddings],
        n_jobs=-1,
    )
    bm.benchmark()
    return bm.get_results(min_max_scale=False)


# --------------------------------------------------------------------------- figures
def plot_metrics(long: pd.DataFrame, path: Path) -> Path:
    """Grouped horizontal bar chart: one group per metric, one bar per method."""
    from matplotlib.figure import Figure

    from regvi.plots import _save_figure

    shown = long[~long["metric"].str.startswith("nbr_frac_")]
    wide = wide_table(shown)
    n_metrics, n_methods = wide.shape
    fig = Figure(figsize=(7.0, 0.3 * n_metrics * max(1, n_methods) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    height = 0.8 / max(n_methods, 1)
    y = np.arange(n_metrics)
    for j, method in enumerate(wide.columns):
        values = wide[method].to_numpy(dtype=float)
        pos = y + (j - (n_methods - 1) / 2) * height
        ax.barh(pos, np.nan_to_num(values), height=height, label=method, color=f"C{j}")
        for p, v in zip(pos, values, strict=True):
            if np.isfinite(v):
                ax.text(max(v, 0) + 0.01, p, f"{v:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, list(wide.index), fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("score (higher is better; nbr_corr: Pearson r)", fontsize=8)
    ax.set_xlim(min(0.0, float(np.nanmin(wide.to_numpy(dtype=float), initial=0)) - 0.05), 1.12)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("integration metrics", fontsize=10)
    return _save_figure(fig, path)


def plot_umaps(
    adata: ad.AnnData,
    embeddings: dict[str, np.ndarray],
    color_keys: list[str],
    path: Path,
    seed: int = 0,
) -> Path:
    """UMAPs of each embedding side by side (columns), coloured by each key (rows)."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from regvi.plots import _category_colors, _save_figure, compute_umap

    coords = {}
    for name, X in embeddings.items():
        if name == "regvi" and layout.UMAP_KEY in adata.obsm:
            coords[name] = np.asarray(adata.obsm[layout.UMAP_KEY])
            continue
        work = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
        work.obsm["rep"] = np.asarray(X, dtype=np.float32)
        coords[name] = compute_umap(work, use_rep="rep", seed=seed)
    n_rows, n_cols = len(color_keys), len(coords)
    fig = Figure(figsize=(4.6 * n_cols + 1.6, 4.2 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    size = float(np.clip(30_000 / max(adata.n_obs, 1), 0.3, 20.0))
    for r, key in enumerate(color_keys):
        cat = adata.obs[key].astype(str).astype("category")
        cats = list(cat.cat.categories)
        colors = np.array(_category_colors(adata, key, len(cats)))
        point_colors = colors[cat.cat.codes.to_numpy()]
        for c, (name, xy) in enumerate(coords.items()):
            ax = axes[r, c]
            ax.scatter(xy[order, 0], xy[order, 1], c=point_colors[order], s=size, linewidths=0)
            ax.set_title(f"{name}: {key}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        if len(cats) <= 30:
            handles = [
                Line2D([], [], marker="o", linestyle="", color=to_hex(colors[i]), label=str(k))
                for i, k in enumerate(cats)
            ]
            axes[r, -1].legend(
                handles=handles,
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                frameon=False,
                fontsize=7,
            )
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- W&B
def _log_wandb(
    run_dir: Path,
    long: pd.DataFrame,
    scib_table: pd.DataFrame | None,
    figures: dict[str, Path],
    logger: Any,
    enabled: bool,
) -> None:
    if not enabled:
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    payload: dict[str, Any] = {
        f"evaluate/{r.method}/{r.metric}": r.value
        for r in long.itertuples()
        if r.value is not None and math.isfinite(r.value)
    }
    payload["evaluate/metrics"] = wandb.Table(dataframe=long.fillna({"note": ""}))
    if scib_table is not None:
        payload["evaluate/scib_metrics"] = wandb.Table(dataframe=scib_table.reset_index())
    for name, p in figures.items():
        payload[f"figures/evaluate_{name}"] = wandb.Image(str(p))
    from regvi.tracking import log_after_run

    log_after_run(run_dir, payload, "evaluate", logger)
