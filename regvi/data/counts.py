"""A minibatch of counts kept sparse from disk to device.

A :class:`SparseCounts` holds the CSR pieces of one minibatch (values, column indices, row
offsets). It is what the data loader yields and what the modules read: it is pinned and moved
to the device as three small tensors, and everything the models need from the counts is
computed from the stored entries, so a minibatch is never densified on the host:

* row totals (library sizes) are segment sums over the stored values;
* the encoder input ``log1p(x * scale)`` and its dropout touch the stored values only (both
  map zero to zero); the encoders' first layer reads the stored entries directly on the CPU
  (see :class:`regvi.nn.InputLinear`), and scatters them into a dense matrix for a GEMM on
  accelerators;
* the negative-binomial likelihood needs the counts only where they are non-zero (see
  :func:`regvi.distributions.gamma_poisson_log_prob_sparse`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch


class SparseCounts:
    """CSR minibatch: ``values`` (nnz,), ``columns`` (nnz,) and ``offsets`` (n_cells + 1,).

    Row ids and flat (row-major) positions of the stored entries are derived on the tensors'
    device when first needed and cached on the object (one minibatch, used many times).
    """

    __slots__ = (
        "values",
        "columns",
        "offsets",
        "n_features",
        "row_log_factorials",
        "_rows",
        "_flat",
        "_transpose",
        "_dropped",
        "_dense",
    )

    def __init__(
        self,
        values: torch.Tensor,
        columns: torch.Tensor,
        offsets: torch.Tensor,
        n_features: int,
        row_log_factorials: torch.Tensor | None = None,
    ):
        self.values = values
        self.columns = columns
        self.offsets = offsets
        self.n_features = int(n_features)
        #: per cell :math:`\sum_g \log x_{ng}!` when the data set supplies it (see
        #: :class:`regvi.data.loader.LogFactorialCache`); else the likelihood sums it over
        #: the stored entries
        self.row_log_factorials = row_log_factorials
        self._rows: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None
        self._transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._dropped: tuple[float, SparseCounts] | None = None
        self._dense: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scipy(cls, matrix: sp.spmatrix | sp.sparray, canonical: bool = False) -> SparseCounts:
        """From a scipy sparse matrix (converted to canonical float32 CSR if needed).

        ``canonical=True`` says ``matrix`` is a CSR matrix known to be in canonical form (no
        duplicated entries), e.g. a row slice of one, and skips the check, a pass over its
        entries."""
        csr = matrix if canonical and sp.issparse(matrix) else sp.csr_matrix(matrix)
        if not canonical and not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()  # duplicated entries would split a count in two
        return cls(
            torch.from_numpy(np.asarray(csr.data, dtype=np.float32)),
            # scipy's index dtype kept (int32 unless huge): every op here accepts it, and no
            # copy is made per minibatch
            torch.from_numpy(_index_array(csr.indices, csr.indptr.dtype)),
            torch.from_numpy(_index_array(csr.indptr, csr.indptr.dtype)),
            csr.shape[1],
        )

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseCounts:
        """From a dense ``(cells, features)`` tensor (its non-zero entries are stored)."""
        rows, columns = torch.nonzero(dense, as_tuple=True)
        counts = torch.bincount(rows, minlength=dense.shape[0])
        offsets = torch.zeros(dense.shape[0] + 1, dtype=torch.int64, device=dense.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(dense[rows, columns].float(), columns, offsets, dense.shape[1])

    def with_values(self, values: torch.Tensor) -> SparseCounts:
        """The same sparsity pattern holding ``values`` (derived indices are shared)."""
        out = SparseCounts(values, self.columns, self.offsets, self.n_features)
        out._rows, out._flat = self._rows, self._flat
        return out

    def row_range(self, start: int, stop: int) -> SparseCounts:
        """Rows ``start:stop`` (views of the stored entries; only the offsets are new)."""
        offsets = self.offsets[start : stop + 1]
        first, last = int(offsets[0]), int(offsets[-1])
        log_factorials = self.row_log_factorials
        return SparseCounts(
            self.values[first:last],
            self.columns[first:last],
            offsets - first,
            self.n_features,
            None if log_factorials is None else log_factorials[start:stop],
        )

    # ------------------------------------------------------------------ shape and transfer
    @property
    def n_cells(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_features)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: Any, non_blocking: bool = False) -> SparseCounts:
        """Moved to ``device`` (the three CSR tensors only; derived indices are rebuilt).
        Off the CPU the indices become int64, the dtype the accelerator path was validated
        with (the CPU keeps scipy's int32 for its sparse kernels)."""
        index_dtype = None if torch.device(device).type == "cpu" else torch.int64
        log_factorials = self.row_log_factorials
        return SparseCounts(
            self.values.to(device, non_blocking=non_blocking),
            self.columns.to(device, dtype=index_dtype, non_blocking=non_blocking),
            self.offsets.to(device, dtype=index_dtype, non_blocking=non_blocking),
            self.n_features,
            None
            if log_factorials is None
            else log_factorials.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> SparseCounts:
        """Page-locked copy, so the host-to-GPU copy can overlap compute."""
        log_factorials = self.row_log_factorials
        return SparseCounts(
            self.values.pin_memory(),
            self.columns.pin_memory(),
            self.offsets.pin_memory(),
            self.n_features,
            None if log_factorials is None else log_factorials.pin_memory(),
        )

    # ------------------------------------------------------------------ derived indices
    @property
    def rows(self) -> torch.Tensor:
        """Row (cell) index of every stored entry, ``(nnz,)``."""
        if self._rows is None:
            cells = torch.arange(self.n_cells, device=self.offsets.device)
            # output_size avoids a device sync on GPU
            self._rows = torch.repeat_interleave(
                cells, torch.diff(self.offsets), output_size=self.values.shape[0]
            )
        return self._rows

    @property
    def flat_index(self) -> torch.Tensor:
        """Position of every stored entry in the row-major ``(cells, features)`` matrix."""
        if self._flat is None:
            self._flat = self.rows * self.n_features + self.columns
        return self._flat

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transpose ``(features, cells)`` in CSR form, i.e. this minibatch in CSC form:
        ``(feature_offsets, rows, values)``, the stored values in feature-major order (by cell
        within a feature) with their cells' indices; cached, used for products with
        :math:`X^\\top`.

        On the CPU, scipy's linear-time CSR-to-CSC conversion (a counting sort, faster than a
        stable sort of the columns); elsewhere, a stable sort on the device.
        """
        if self._transpose is None:
            on_cpu = self.device.type == "cpu"
            self._transpose = _transpose_scipy(self) if on_cpu else _transpose_by_sort(self)
        return self._transpose

    # ------------------------------------------------------------------ operations
    def row_sums(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Per-cell sum of ``values`` (default: the counts), ``(n_cells,)``."""
        values = self.values if values is None else values
        # a segment reduction over the CSR offsets: parallel over cells, unlike a scatter-add
        return torch.segment_reduce(values, "sum", offsets=self.offsets)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Entries of a dense ``(cells, features)`` tensor at the stored positions."""
        return dense.reshape(-1).index_select(0, self.flat_index)

    def to_dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ``(cells, features)`` matrix holding ``values`` (default: the stored values,
        densified once and cached)."""
        if values is None and self._dense is not None:
            return self._dense
        source = self.values if values is None else values
        out = source.new_zeros(self.n_cells * self.n_features)
        # in place: one cells x features buffer, not a zero buffer and a filled copy
        out = out.index_put_((self.flat_index,), source).view(self.n_cells, self.n_features)
        if values is None:
            self._dense = out
        return out

    def dropout(self, p: float, training: bool) -> SparseCounts:
        """The minibatch after dropout with probability ``p`` (itself when not ``training``).

        Dropout maps zero to zero, so only the stored entries are drawn: the same
        distribution as dropout on the dense matrix, at a fraction of the random draws, and
        by uniform draws and a comparison (``bernoulli_`` is slower on CPU, see
        ``docs/performance.md``).
        The result is cached on this object, so every encoder reading this minibatch sees
        the same dropped-out input: one mask (and on accelerators one densification) per
        minibatch. Each encoder's input is still a proper dropout sample; only the masks of
        the encoders of one modality are shared (as if they were one wider first layer).
        Dropped entries stay stored, as zeros: the pattern is shared with this object.
        """
        if not training or p == 0.0:
            return self
        if self._dropped is None or self._dropped[0] != p:
            keep = torch.rand_like(self.values) >= p
            self._dropped = (p, self.with_values(self.values * keep / (1.0 - p)))
        return self._dropped[1]

    def __repr__(self) -> str:
        return f"SparseCounts(shape={self.shape}, nnz={self.values.shape[0]}, device={self.device})"


def _transpose_scipy(counts: SparseCounts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`SparseCounts.transpose` on the CPU: scipy's CSR-to-CSC counting sort."""
    csc = sp.csr_matrix(
        (counts.values.detach().numpy(), counts.columns.numpy(), counts.offsets.numpy()),
        shape=counts.shape,
    ).tocsc()
    # scipy's index dtype (int32 unless the minibatch is huge), one dtype for both arrays
    rows = csc.indices.astype(csc.indptr.dtype, copy=False)
    return torch.from_numpy(csc.indptr), torch.from_numpy(rows), torch.from_numpy(csc.data)


def _transpose_by_sort(counts: SparseCounts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`SparseCounts.transpose` on any device: a stable sort of the columns."""
    order = torch.argsort(counts.columns, stable=True)
    per_feature = torch.bincount(counts.columns, minlength=counts.n_features)
    feature_offsets = torch.zeros(counts.n_features + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(per_feature, 0, out=feature_offsets[1:])
    rows = counts.rows.index_select(0, order)
    return feature_offsets, rows, counts.values.detach().index_select(0, order)


def _index_array(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as the signed integer ``dtype`` (int32 or int64) shared by a CSR's indices
    and offsets (embedding-bag products need one dtype for both)."""
    dtype = np.int32 if np.dtype(dtype) == np.int32 else np.int64
    return array.astype(dtype, copy=False)


def as_sparse_counts(counts: SparseCounts | torch.Tensor) -> SparseCounts:
    """``counts`` as :class:`SparseCounts` (dense tensors are converted)."""
    if isinstance(counts, SparseCounts):
        return counts
    return SparseCounts.from_dense(counts)
