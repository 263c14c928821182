"""A minibatch of counts kept sparse from disk to device.

A :class:`SparseCounts` holds the CSR pieces of one minibatch (values, column indices, row
offsets). It is what the data loader yields and what the modules read: it is pinned and moved
to the device as three small tensors, and everything the models need from the counts is
computed from the stored entries, so a minibatch is never densified on the host:

* row totals (library sizes) are segment sums over the stored values;
* the encoder input ``log1p(x * scale)`` and its dropout touch the stored values only (both
  map zero to zero), and are scattered into a dense matrix on the device for the matmul;
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

    __slots__ = ("values", "columns", "offsets", "n_features", "_rows", "_flat", "_dropped")

    def __init__(
        self,
        values: torch.Tensor,
        columns: torch.Tensor,
        offsets: torch.Tensor,
        n_features: int,
    ):
        self.values = values
        self.columns = columns
        self.offsets = offsets
        self.n_features = int(n_features)
        self._rows: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None
        self._dropped: tuple[float, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scipy(cls, matrix: sp.spmatrix | sp.sparray) -> SparseCounts:
        """From a scipy sparse matrix (converted to canonical float32 CSR if needed)."""
        csr = sp.csr_matrix(matrix)
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()  # duplicated entries would split a count in two
        return cls(
            torch.from_numpy(np.asarray(csr.data, dtype=np.float32)),
            torch.from_numpy(csr.indices.astype(np.int64, copy=False)),
            torch.from_numpy(csr.indptr.astype(np.int64, copy=False)),
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
        """Moved to ``device`` (the three CSR tensors only; derived indices are rebuilt)."""
        return SparseCounts(
            self.values.to(device, non_blocking=non_blocking),
            self.columns.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
            self.n_features,
        )

    def pin_memory(self) -> SparseCounts:
        """Page-locked copy, so the host-to-GPU copy can overlap compute."""
        return SparseCounts(
            self.values.pin_memory(),
            self.columns.pin_memory(),
            self.offsets.pin_memory(),
            self.n_features,
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
        """Dense ``(cells, features)`` matrix holding ``values`` (default: the counts)."""
        values = self.values if values is None else values
        out = values.new_zeros(self.n_cells * self.n_features)
        # in place: one cells x features buffer, not a zero buffer and a filled copy
        return out.index_put_((self.flat_index,), values).view(self.n_cells, self.n_features)

    def dropout_to_dense(self, p: float, training: bool) -> torch.Tensor:
        """Dense matrix of the values after dropout with probability ``p`` (none when not
        ``training``).

        Dropout maps zero to zero, so only the stored entries are drawn: the same
        distribution as dropout on the dense matrix, at a fraction of the random draws, and
        by uniform draws and a comparison (``bernoulli_`` is about twice as slow on CPU).
        The result is cached on this object, so every encoder reading this minibatch sees
        the same dropped-out input: one mask and one densification per minibatch. Each
        encoder's input is still a proper dropout sample; only the masks of the encoders
        of one modality are shared (as if they were one wider first layer).
        """
        if not training or p == 0.0:
            return self.to_dense()
        if self._dropped is None or self._dropped[0] != p:
            keep = torch.rand_like(self.values) >= p
            self._dropped = (p, self.to_dense(self.values * keep / (1.0 - p)))
        return self._dropped[1]

    def __repr__(self) -> str:
        return f"SparseCounts(shape={self.shape}, nnz={self.values.shape[0]}, device={self.device})"


def as_sparse_counts(counts: SparseCounts | torch.Tensor) -> SparseCounts:
    """``counts`` as :class:`SparseCounts` (dense tensors are converted)."""
    if isinstance(counts, SparseCounts):
        return counts
    return SparseCounts.from_dense(counts)
