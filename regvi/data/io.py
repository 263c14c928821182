"""Reading AnnData files and validating count matrices (no model code here)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from regvi.errors import DataError

_H5AD_SUFFIXES = (".h5ad",)


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an ``.h5ad`` file fully into memory, with errors that name the problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, not an .h5ad file: {path}")
    if path.suffix.lower() not in _H5AD_SUFFIXES:
        raise DataError(f"data file must be an .h5ad file (got {path.name!r})")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for corrupt or foreign files
        raise DataError(f"could not read {path} as an .h5ad file: {exc}") from exc
    return adata


def count_matrix(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """The counts of ``adata`` (``X`` or ``layers[layer]``) as validated float32 CSR.

    Checks: at least one cell and one gene, unique cell and gene names, finite, non-negative,
    whole-number values, and at least one gene with a non-zero count. Only the stored
    (non-zero) values of a sparse matrix are inspected, so validation costs O(nnz).
    """
    where = "X" if layer is None else f"layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        available = ", ".join(adata.layers.keys()) or "(none)"
        raise DataError(f"layer {layer!r} not found in the data; available layers: {available}")
    if adata.n_obs == 0:
        raise DataError("the data has zero cells")
    if adata.n_vars == 0:
        raise DataError("the data has zero genes")
    for axis, names in (("cell", adata.obs_names), ("gene", adata.var_names)):
        if not names.is_unique:
            dups = names[names.duplicated()].unique()
            shown = ", ".join(repr(d) for d in dups[:5])
            raise DataError(
                f"{len(dups)} duplicate {axis} name(s) (e.g. {shown}); make them unique "
                f"(adata.{'obs' if axis == 'cell' else 'var'}_names_make_unique())"
            )
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise DataError(f"the data has no count matrix in {where}")
    if isinstance(X, ad.abc.CSCDataset | ad.abc.CSRDataset):  # backed sparse
        X = X.to_memory()
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr()
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    values = X.data
    if values.size:
        if not np.all(np.isfinite(values)):
            n_bad = int((~np.isfinite(values)).sum())
            raise DataError(f"counts in {where} contain {n_bad} NaN or infinite value(s)")
        if values.min() < 0:
            raise DataError(
                f"counts in {where} contain negative values (min {values.min():g}); "
                "regvi needs raw counts"
            )
        if not np.all(np.mod(values, 1) == 0):
            example = values[np.mod(values, 1) != 0][0]
            raise DataError(
                f"counts in {where} are not whole numbers (e.g. {example:g}); regvi needs raw "
                "integer counts, not normalised or log-transformed values (use data.layer=... "
                "to pick a raw-count layer)"
            )
    if X.nnz == 0 or not np.any(X.data > 0):
        raise DataError(f"every count in {where} is zero: no gene is expressed")
    X.sum_duplicates()
    return X
