"""The layout of a run directory: every file name regvi writes into one, and the keys of the
results file. Nothing else in regvi spells these names; this module imports nothing heavy, so
the quick CLI commands (``regvi sweep status``) can read it.

A run directory (``regvi train``) holds::

    config.yaml            the resolved, validated config (what ``resume=`` reads back)
    checkpoints/last.ckpt  the latest training state, while the run is unfinished
    model/                 model.pt (weights) and model.json (class, arguments, set-up)
    history.csv            per-epoch metrics
    figures/*.png          loss curves, posterior predictive check, UMAP, (multimodal)
                           attribution; evaluation and differential-expression figures
    results.h5ad | .h5mu   the input cells with the latents and normalized values (by model)
    metrics.json, metrics.csv, neighbourhood_correlation.csv.gz   (``regvi evaluate``)
    predict/<time>/        ``regvi predict`` outputs (a run directory of their own)
    map/<time>/            ``regvi map`` outputs: the query's results file (latent, predicted
                           labels), the mapped model, figures/map_umap.png
    de/de_<groupby>.csv    ``regvi de`` tables (figures/de_<groupby>_volcano.png, _dotplot.png)
    wandb/, wandb_run_id, csv_logs/   tracking
    .hydra/                Hydra's copy of the composed config (CLI runs)
    .regvi_status          state of a sweep element (``regvi sweep status``)
    .regvi_preempted       a multi-node element's ranks stopped on a pre-emption signal
"""

from __future__ import annotations

import re
from pathlib import Path

# ----------------------------------------------------------------- files of a run directory
RUN_CONFIG = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
#: The checkpoint file inside :data:`CHECKPOINT_DIR` (written by ``regvi.train``'s callback).
LAST_CHECKPOINT = "last.ckpt"
MODEL_DIR = "model"
MODEL_WEIGHTS = "model.pt"
MODEL_METADATA = "model.json"
#: The model's own copy of its history, inside :data:`MODEL_DIR`.
MODEL_HISTORY = "history.csv"
HISTORY_CSV = "history.csv"
FIGURES_DIR = "figures"
#: Figures every ``regvi train`` run draws into :data:`FIGURES_DIR`.
LOSS_CURVES_FIGURE = "loss_curves.png"
PPC_FIGURE = "posterior_predictive_check.png"
RESULTS_H5AD = "results.h5ad"
RESULTS_H5MU = "results.h5mu"
#: The results file each model writes, by ``model.name``.
RESULTS_FILES = {"rna": RESULTS_H5AD, "multimodal": RESULTS_H5MU}
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
SCIB_CSV = "scib_metrics.csv"
NEIGHBOURHOOD_CSV = "neighbourhood_correlation.csv.gz"
PREDICT_DIR = "predict"
MAP_DIR = "map"
#: Joint UMAP of reference and query cells (``regvi map``), in the map directory's figures.
MAP_UMAP_FIGURE = "map_umap.png"
DE_DIR = "de"
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = "config.yaml"
WANDB_ID_FILE = "wandb_run_id"
CSV_LOG_DIR = "csv_logs"
STATUS_FILE = ".regvi_status"
#: Left by global rank 0 of a multi-node sweep element stopped by a pre-emption signal (its
#: checkpoint written), for the element's launching process (torchrun's exit code does not
#: say so).
PREEMPTED_MARKER = ".regvi_preempted"

# ----------------------------------------------------------------- files of a sweep directory
MANIFEST = "manifest.json"
JOB_SCRIPT = "job.sh"
LOG_DIR = "logs"
SUMMARY_CSV = "summary.csv"

# ----------------------------------------------------------------- keys in the results file
#: obsm key of the joint latent (posterior mean of z).
LATENT_KEY = "X_regvi"
#: layer of the normalized (denoised) values.
NORMALIZED_LAYER = "regvi_normalized"
#: uns key holding the run's config as YAML.
CONFIG_UNS_KEY = "regvi_config"
UMAP_KEY = "X_umap"
#: obs column of ``regvi map`` results: the uncertainty of the transferred label.
PREDICTION_UNCERTAINTY = "regvi_prediction_uncertainty"
#: obs column of the joint reference + query UMAP (``regvi map``): ``reference`` or ``query``.
MAP_SOURCE = "origin"


def predicted_label_column(labels_key: str) -> str:
    """obs column of ``regvi map`` results: the label transferred from the reference
    (``regvi_predicted_<labels_key>``)."""
    return f"regvi_predicted_{labels_key}"


def modality_latent_key(modality: str) -> str:
    """obsm key of one modality's block of the joint latent (``X_regvi_rna``)."""
    return f"{LATENT_KEY}_{modality}"


def measured_column(modality: str) -> str:
    """obs column saying whether a cell was measured in ``modality``."""
    return f"regvi_measured_{modality}"


def _file_safe(name: str) -> str:
    """``name`` with every character other than letters, digits, ``.``, ``-``, ``_`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


def de_table_path(run_dir: str | Path, groupby: str) -> Path:
    """``<run_dir>/de/de_<groupby>.csv`` (``regvi de``)."""
    return Path(run_dir) / DE_DIR / f"de_{_file_safe(groupby)}.csv"


def de_figure_path(run_dir: str | Path, groupby: str, kind: str) -> Path:
    """``<run_dir>/figures/de_<groupby>_<kind>.png`` (``kind``: ``volcano`` or ``dotplot``)."""
    return Path(run_dir) / FIGURES_DIR / f"de_{_file_safe(groupby)}_{kind}.png"


def checkpoint_path(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt``."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def results_path(run_dir: str | Path) -> Path | None:
    """The results file in ``run_dir`` (whichever model wrote it), or None when there is none."""
    for name in RESULTS_FILES.values():
        path = Path(run_dir) / name
        if path.exists():
            return path
    return None


def run_config_path(run_dir: str | Path) -> Path | None:
    """The saved config of a run: Hydra's ``.hydra/config.yaml`` (CLI runs), else
    ``config.yaml`` (written by every run); None when neither exists."""
    for path in (Path(run_dir) / HYDRA_DIR / HYDRA_CONFIG, Path(run_dir) / RUN_CONFIG):
        if path.exists():
            return path
    return None
