"""Writing run outputs atomically: results files, history, figures.

Every file is written under a temporary name in its final directory and renamed into place,
so an interrupted run never leaves a truncated results file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import pandas as pd

from regvi.model.base import atomic_write_bytes

RESULTS_H5AD = "results.h5ad"
HISTORY_CSV = "history.csv"
FIGURES_DIR = "figures"
MODEL_DIR = "model"


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` (gzip-free, fast) via a temporary file and a rename."""
    path = Path(path)

    def _write(tmp: Path) -> None:
        adata.write_h5ad(tmp)

    # anndata picks the format from the suffix; keep .h5ad on the temporary name.
    tmp_target = path.with_name(f".{path.stem}.tmp-{os.getpid()}.h5ad")
    try:
        _write(tmp_target)
        os.replace(tmp_target, path)
    finally:
        if tmp_target.exists():
            tmp_target.unlink()
    return path


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write_bytes(Path(path), lambda p: frame.to_csv(p, index=False))
