"""Minibatches straight from CSR, and the train/validation split.

A minibatch is one fancy-indexing slice of the CSR matrix (a sorted index array, so the slice
is a single pass over ``indptr``) handed on as :class:`~regvi.data.counts.SparseCounts`: it is
never densified on the host, and there is no per-cell Python loop. The DataLoader receives
whole index batches from a ``BatchSampler`` (``batch_size=None``), so collation does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from regvi.data.counts import SparseCounts
from regvi.errors import DataError


class CsrMinibatchDataset(Dataset):
    """Indexable by an array of cell indices; returns a dict of tensors for those cells.

    ``X`` is float32 CSR (cells x features); ``covariates`` are per-cell arrays (codes or
    continuous values) whose first axis is cells. Keys of the returned dict: ``"x"`` (the
    counts as :class:`SparseCounts`) plus the covariate names.
    """

    def __init__(self, X: sp.csr_matrix, covariates: Mapping[str, np.ndarray]):
        self.X = X
        self._canonical = in_memory_canonical(X)
        self._log_factorials = LogFactorialCache(X.shape[0])
        self.covariates = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in covariates.items()
        }

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        idx = np.sort(np.asarray(indices, dtype=np.int64))
        # self.X is in-memory CSR or an on-disk (backed) CSR dataset: either way one slice.
        tidx = torch.from_numpy(idx)
        batch = {name: values[tidx] for name, values in self.covariates.items()}
        counts = SparseCounts.from_scipy(self.X[idx], canonical=self._canonical)
        counts.row_log_factorials = self._log_factorials.for_rows(tidx, counts)
        batch["x"] = counts
        return batch


def in_memory_canonical(X: object) -> bool:
    """Whether ``X`` is an in-memory CSR matrix in canonical form: its row slices are then
    canonical too, so minibatches need no check (checked once here, not per minibatch; an
    on-disk matrix is checked per minibatch)."""
    return isinstance(X, sp.csr_matrix | sp.csr_array) and bool(X.has_canonical_format)


class LogFactorialCache:
    r"""Per-cell :math:`\sum_g \log x_{ng}!`, a constant of the data in the negative-binomial
    log-likelihood, remembered as minibatches are drawn.

    A cell's sum is computed from the first minibatch that holds it (the same log-gamma
    evaluations the likelihood would make on that minibatch's entries) and reused every
    later epoch, which saves a third of the likelihood's log-gamma evaluations from the
    second epoch on. There is no up-front pass over the data (one would cost more than a
    short run saves, and read an on-disk file once more); memory is 5 bytes a cell.
    """

    def __init__(self, n_cells: int):
        self.sums = torch.zeros(n_cells)
        self.known = torch.zeros(n_cells, dtype=torch.bool)

    def for_rows(self, rows: torch.Tensor, counts: SparseCounts) -> torch.Tensor:
        """The sums of the cells ``rows`` whose counts (in that order) are ``counts``."""
        if not bool(self.known[rows].all()):
            self.sums[rows] = counts.row_sums(torch.lgamma(counts.values + 1.0))
            self.known[rows] = True
        return self.sums[rows]


def _process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _SubsetBatchSampler(Sampler):
    """Batches of indices drawn from a fixed subset of cells.

    Under DDP every process draws the same permutation (the global RNG is seeded alike on
    all ranks) and keeps every ``world_size``-th cell of it from its rank on, after trimming
    the permutation to a multiple of ``world_size``: the ranks' cells are disjoint and all
    ranks run the same number of steps (at most ``world_size - 1`` cells sit out an epoch,
    different ones each epoch when shuffling).
    """

    def __init__(self, subset: np.ndarray, batch_size: int, shuffle: bool):
        self.subset = np.asarray(subset, dtype=np.int64)
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.drop_last = False

    def _rank_cells(self) -> np.ndarray:
        rank, world = _process_group()
        if self.shuffle:
            order = torch.randperm(self.subset.size).numpy()
        else:
            order = np.arange(self.subset.size)
        if world > 1:
            order = order[: (order.size // world) * world][rank::world]
        return self.subset[order]

    def __iter__(self):
        cells = self._rank_cells()
        for start in range(0, cells.size, self.batch_size):
            yield cells[start : start + self.batch_size]

    def __len__(self) -> int:
        _, world = _process_group()
        n = self.subset.size // world if world > 1 else self.subset.size
        return -(-n // self.batch_size)


def make_dataloader(
    dataset: CsrMinibatchDataset,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``indices`` whose items are whole minibatches."""
    if batch_size < 1:
        raise DataError(f"data.batch_size must be at least 1 (got {batch_size})")
    return DataLoader(
        dataset,
        sampler=_SubsetBatchSampler(indices, batch_size, shuffle),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def stratified_split(
    strata: np.ndarray, train_size: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split cells into train/validation so each stratum (library) keeps ``train_size``.

    Within every stratum, ``round((1 - train_size) * n)`` cells go to validation; a stratum of
    one cell stays in training. ``train_size=1`` gives an empty validation set.
    """
    if not 0.0 < train_size <= 1.0:
        raise DataError(f"train_size must be in (0, 1] (got {train_size})")
    rng = np.random.default_rng(seed)
    strata = np.asarray(strata)
    train, val = [], []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        rng.shuffle(members)
        n_val = int(round((1.0 - train_size) * members.size))
        n_val = min(n_val, members.size - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
