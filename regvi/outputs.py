"""Writing run outputs atomically.

Every file is written under a temporary name in its final directory and renamed into place
(atomic on POSIX), so an interrupted run never leaves a truncated results file behind. The
files' names are in :mod:`regvi.run.layout`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the quick CLI commands need only atomic_write
    import anndata as ad
    import h5py
    import pandas as pd


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


LayerFiller = Callable[["h5py.Dataset"], None]


def write_h5ad_atomic(
    adata: ad.AnnData,
    path: str | Path,
    streamed_layers: Mapping[str, LayerFiller] | None = None,
    copy_x_from: str | Path | None = None,
) -> Path:
    """Write ``adata`` to ``path`` via a temporary file and a rename.

    ``streamed_layers`` maps a layer name to ``fill(dataset)``: the layer is created in the
    file as an (n_obs, n_vars) float32 HDF5 dataset (anndata's dense-array encoding, chunked
    by rows) and ``fill`` writes it batch by batch (``dataset[i:j] = values``), so a cells x
    genes layer is never held in memory. It reads back as an ordinary layer.
    ``copy_x_from``: an .h5ad whose ``X`` is copied into the file HDF5-to-HDF5 (for
    ``adata`` without X, e.g. results of an out-of-core run).
    """

    import h5py

    def _write(tmp: Path) -> None:
        adata.write_h5ad(tmp)
        if copy_x_from is not None:
            with h5py.File(copy_x_from, "r") as src, h5py.File(tmp, "a") as dst:
                if "X" in dst:
                    del dst["X"]
                src.copy(src["X"], dst, "X")
        if streamed_layers:
            with h5py.File(tmp, "a") as f:
                _stream_layers(f["layers"], adata.shape, streamed_layers)

    return atomic_write(path, _write)


def write_h5mu_atomic(
    mdata: Any,
    path: str | Path,
    streamed_layers: Mapping[str, Mapping[str, LayerFiller]] | None = None,
) -> Path:
    """Write a MuData object to ``path`` via a temporary file and a rename;
    ``streamed_layers`` maps a modality to ``{layer: fill}``, streamed into that modality's
    layers as in :func:`write_h5ad_atomic` (shape: the modality's cells x features)."""

    import h5py

    def _write(tmp: Path) -> None:
        with warnings.catch_warnings():  # mudata's notice about its future defaults
            warnings.simplefilter("ignore", FutureWarning)
            mdata.write_h5mu(tmp)
        if streamed_layers:
            with h5py.File(tmp, "a") as f:
                for modality, layers in streamed_layers.items():
                    group = f[f"mod/{modality}/layers"]
                    _stream_layers(group, mdata.mod[modality].shape, layers)

    return atomic_write(path, _write)


def _stream_layers(
    group: h5py.Group, shape: tuple[int, int], layers: Mapping[str, LayerFiller]
) -> None:
    """Create each layer in ``group`` as a row-chunked float32 dataset (~1 MB chunks, in
    anndata's dense-array encoding) and let its filler write it."""
    n_obs, n_vars = shape
    rows_per_chunk = max(1, min(n_obs, (1 << 20) // (4 * max(n_vars, 1))))
    for name, fill in layers.items():
        if name in group:  # the input already had a layer of that name: replaced
            del group[name]
        dataset = group.create_dataset(
            name, shape=(n_obs, n_vars), dtype="float32", chunks=(rows_per_chunk, n_vars)
        )
        dataset.attrs["encoding-type"] = "array"
        dataset.attrs["encoding-version"] = "0.2.0"
        fill(dataset)


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (no index) to ``path`` atomically."""
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))
