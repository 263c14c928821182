"""Writing run outputs atomically.

Every file is written under a temporary name in its final directory and renamed into place
(atomic on POSIX), so an interrupted run never leaves a truncated results file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import pandas as pd

RESULTS_H5AD = "results.h5ad"
HISTORY_CSV = "history.csv"
FIGURES_DIR = "figures"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "config.yaml"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path`` (same suffix, so writers that
    pick a format from it still work), then rename it to ``path``. On failure the temporary
    file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    return atomic_write(path, adata.write_h5ad)


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))
