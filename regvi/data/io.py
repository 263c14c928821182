"""Reading AnnData files and validating count matrices (no model code here)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from regvi.errors import DataError

_H5AD_SUFFIXES = (".h5ad",)


def read_h5ad(path: str | Path, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file, with errors that name the problem.

    ``backed=True`` opens it read-only without loading ``X`` (obs, var and the other small
    fields are read): training then reads minibatches from disk (out-of-core).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, not an .h5ad file: {path}")
    if path.suffix.lower() not in _H5AD_SUFFIXES:
        raise DataError(f"data file must be an .h5ad file (got {path.name!r})")
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for corrupt or foreign files
        raise DataError(f"could not read {path} as an .h5ad file: {exc}") from exc
    return adata


def count_matrix(adata: ad.AnnData, layer: str | None = None, keep_backed: bool = False):
    """The counts of ``adata`` (``X`` or ``layers[layer]``) as validated float32 CSR.

    With ``keep_backed=True`` and an AnnData opened with ``backed="r"`` whose counts are
    stored as CSR, the on-disk matrix is returned (validated chunk by chunk) instead of being
    loaded: rows are then read per minibatch.

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
    if isinstance(X, ad.abc.CSRDataset) and keep_backed:
        # Out-of-core: validate chunk by chunk, keep reading rows from disk.
        any_positive = False
        for _, _, chunk in row_chunks(X):
            _check_values(chunk.data, where)
            any_positive = any_positive or bool(np.any(chunk.data > 0))
        if not any_positive:
            raise DataError(f"every count in {where} is zero: no gene is expressed")
        return X
    if isinstance(X, ad.abc.CSCDataset | ad.abc.CSRDataset):  # backed sparse
        X = X.to_memory()
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else X.tocsr()
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    _check_values(X.data, where)
    if X.nnz == 0 or not np.any(X.data > 0):
        raise DataError(f"every count in {where} is zero: no gene is expressed")
    X.sum_duplicates()
    return X


def _check_values(values: np.ndarray, where: str) -> None:
    """Stored values must be finite, non-negative whole numbers."""
    if not values.size:
        return
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


def row_chunks(X, chunk_rows: int = 8192):
    """Yield ``(start, stop, csr_chunk)`` over the rows of an in-memory CSR matrix or a
    backed (on-disk) one; each chunk is float32 CSR, so passes over the data keep memory
    bounded by ``chunk_rows`` rows."""
    n = X.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        chunk = X[start:stop]
        chunk = chunk.tocsr() if sp.issparse(chunk) else sp.csr_matrix(chunk)
        yield start, stop, chunk.astype(np.float32, copy=False)


class OnDiskCsrRows:
    """Rows of an on-disk (anndata ``backed="r"``) CSR matrix, read with one HDF5 read of
    ``data`` and one of ``indices`` per run of consecutive rows.

    ``indptr`` is held in memory (8 bytes a cell), so a run's entries are located without
    touching the file. Reading a minibatch of random cells costs about what anndata's own
    row indexing does (one read per cell); reading cells that come in runs (blocks of
    consecutive cells, see ``shuffle_block_cells``) costs one read per run.
    """

    def __init__(self, X) -> None:
        group = X.group
        self.filename, self.group_name = group.file.filename, group.name
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape = tuple(X.shape)

    def __getstate__(self) -> dict:
        # h5py objects cannot be pickled (data-parallel processes are spawned): the file is
        # opened again, read-only, where the reader is unpickled
        return {k: v for k, v in self.__dict__.items() if k not in ("data", "indices")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reopen()

    def reopen(self) -> None:
        """Open the file afresh, read-only (in a new process: HDF5 handles are not shared
        safely across a fork)."""
        group = h5py.File(self.filename, "r")[self.group_name]
        self.data, self.indices = group["data"], group["indices"]

    def __getitem__(self, rows: np.ndarray) -> sp.csr_matrix:
        """The rows ``rows`` (ascending, distinct) as an in-memory CSR matrix."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        data = np.empty(int(indptr[-1]), dtype=self.data.dtype)
        indices = np.empty(int(indptr[-1]), dtype=self.indices.dtype)
        if rows.size:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            first = np.concatenate([[0], breaks])
            last = np.concatenate([breaks, [rows.size]])
            for begin, end in zip(first, last, strict=True):
                lo, hi = self.indptr[rows[begin]], self.indptr[rows[end - 1] + 1]
                if hi > lo:  # h5py slicing: less overhead a call than read_direct
                    data[indptr[begin] : indptr[end]] = self.data[lo:hi]
                    indices[indptr[begin] : indptr[end]] = self.indices[lo:hi]
        return sp.csr_matrix((data, indices, indptr), shape=(rows.size, self.shape[1]))
