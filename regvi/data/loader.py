"""Minibatches straight from CSR, and the train/validation split.

A minibatch is one fancy-indexing slice of the CSR matrix (a sorted index array, so the slice
is a single pass over ``indptr``) handed on as :class:`~regvi.data.counts.SparseCounts`: it is
never densified on the host, and there is no per-cell Python loop. The DataLoader receives
whole index batches from a batch sampler (``batch_size=None``), so collation does nothing.

Training fetches several minibatches at a time (``minibatches_per_fetch``): the sampler hands
the DataLoader a list of index arrays, the data set answers with a list of minibatches cut from
one gather, and the training plan takes one optimiser step per minibatch. The minibatches and
their order are those of a one-at-a-time loader; what is saved is the fixed cost of each fetch
(Lightning's per-batch loop and hooks, the DataLoader's iteration, the slicing calls), a
noticeable share of a small-batch CPU step (measured in ``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from regvi.data.counts import SparseCounts
from regvi.data.io import OnDiskCsrRows
from regvi.errors import DataError

#: a training fetch holds at most this many cells by default: enough that its fixed cost is
#: negligible against its steps at any batch size, few enough to keep the fetch small (the
#: figures are in docs/performance.md) ...
CELLS_PER_FETCH = 2048
#: ... and at most this many stored entries (8 MB of CSR), so wide data sets do not hold
#: many minibatches at once: on wide data a step is long, the fixed cost saved is a small
#: share of it, and holding many minibatches costs tens of MB of peak memory (figures in
#: docs/performance.md)
ENTRIES_PER_FETCH = 2**20


def default_minibatches_per_fetch(batch_size: int, entries_per_cell: float = 0.0) -> int:
    """Minibatches a training fetch holds by default: as many as fit in
    :data:`CELLS_PER_FETCH` cells and :data:`ENTRIES_PER_FETCH` stored entries, at least 1."""
    by_cells = CELLS_PER_FETCH // int(batch_size)
    by_entries = ENTRIES_PER_FETCH // max(1, int(batch_size * entries_per_cell))
    return max(1, min(by_cells, by_entries))


class CsrMinibatchDataset(Dataset):
    """Indexable by an array of cell indices; returns a dict of tensors for those cells.

    ``X`` is float32 CSR (cells x features); ``covariates`` are per-cell arrays (codes or
    continuous values) whose first axis is cells. Keys of the returned dict: ``"x"`` (the
    counts as :class:`SparseCounts`) plus the covariate names.
    """

    def __init__(self, X: sp.csr_matrix, covariates: Mapping[str, np.ndarray]):
        self.X = X
        self._canonical = in_memory_canonical(X)
        self._gather_at_once = sp.issparse(X)  # in memory: a fetch's rows in one slice
        # on disk: rows read with one HDF5 read per run of consecutive cells
        self._rows = X if sp.issparse(X) or not hasattr(X, "group") else OnDiskCsrRows(X)
        self._log_factorials = LogFactorialCache(X.shape[0])
        self.covariates = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in covariates.items()
        }

    def __len__(self) -> int:
        return self._rows.shape[0]

    def __getstate__(self) -> dict:
        # an on-disk matrix travels as its reader (which reopens the file), for spawned
        # data-parallel processes: anndata's backed matrix holds h5py objects
        state = dict(self.__dict__)
        if isinstance(self._rows, OnDiskCsrRows):
            state["X"] = None
        return state

    def entries_per_cell(self) -> float:
        """Mean stored entries a cell (see :func:`stored_entries_per_cell`)."""
        return stored_entries_per_cell(self._rows)

    def __getitem__(self, indices) -> dict[str, Any] | list[dict[str, Any]]:
        """An index array gives one minibatch (its cells in ascending order); a list of index
        arrays gives a list of minibatches, one for each (see :meth:`minibatches`)."""
        if isinstance(indices, list):
            return self.minibatches(indices)
        return self._gather(np.sort(np.asarray(indices, dtype=np.int64)))

    def in_order(self, indices: np.ndarray) -> dict[str, Any]:
        """The cells ``indices`` as one batch in the order given (for inference, where the
        caller's order is the output's): read in ascending order, then put in place."""
        idx = np.ascontiguousarray(indices, dtype=np.int64)  # torch takes no negative strides
        order = np.argsort(idx, kind="stable")
        if np.array_equal(order, np.arange(idx.size)):
            return self._gather(idx)
        rows = self._rows[idx[order]]
        return self._gather(idx, rows[np.argsort(order)])

    def minibatches(self, index_arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        """One minibatch for each index array (each in ascending cell order).

        In memory, all of them are cut from one gather of their concatenated rows: one
        fancy-indexing call per fetch instead of one per minibatch, whose fixed cost
        dominates at small batches. From an on-disk matrix the
        fetch's rows are read in one pass (in file order: one read per run of consecutive
        cells), and each minibatch's rows are taken from that in memory."""
        sorted_arrays = [np.sort(np.asarray(a, dtype=np.int64)) for a in index_arrays]
        if len(sorted_arrays) == 1:
            return [self._gather(sorted_arrays[0])]
        if not self._gather_at_once:
            rows = np.sort(np.concatenate(sorted_arrays))
            fetched = self._rows[rows]
            return [self._gather(idx, fetched[np.searchsorted(rows, idx)]) for idx in sorted_arrays]
        block = self._gather(np.concatenate(sorted_arrays))
        bounds = np.cumsum([0, *(idx.size for idx in sorted_arrays)])
        return [
            _rows_of_minibatch(block, int(start), int(stop))
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def _gather(self, idx: np.ndarray, rows: sp.csr_matrix | None = None) -> dict[str, Any]:
        """The minibatch of the cells ``idx``, in that order (ascending unless ``rows``, their
        counts in that order, are given)."""
        tidx = torch.from_numpy(idx)
        batch: dict[str, Any] = {name: values[tidx] for name, values in self.covariates.items()}
        rows = self._rows[idx] if rows is None else rows
        counts = SparseCounts.from_scipy(rows, canonical=self._canonical)
        counts.row_log_factorials = self._log_factorials.for_rows(tidx, counts)
        batch["x"] = counts
        return batch


def stored_entries_per_cell(X: object) -> float:
    """Mean stored entries a row of an in-memory sparse matrix or of an on-disk one read by
    :class:`~regvi.data.io.OnDiskCsrRows` (from its ``indptr``); the column count of any
    other (a bound)."""
    if sp.issparse(X) or isinstance(X, OnDiskCsrRows):
        return float(X.indptr[-1]) / max(1, X.shape[0])
    return float(X.shape[1])


def _rows_of_minibatch(block: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every entry of a gathered block (views; an object appearing
    under two keys, such as a multimodal batch's ``x``, stays one object)."""
    cut: dict[int, Any] = {}
    out = {}
    for key, value in block.items():
        if id(value) not in cut:
            if isinstance(value, SparseCounts):
                cut[id(value)] = value.row_range(start, stop)
            else:
                cut[id(value)] = value[start:stop]
        out[key] = cut[id(value)]
    return out


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
    short run saves, and read an on-disk file once more); memory is 9 bytes a cell. The sums
    are float64: a cell's is of the size of its counts times their log (thousands of nats),
    and in float32 its rounding alone put the likelihood 0.01 nats off.
    """

    def __init__(self, n_cells: int):
        self.sums = torch.zeros(n_cells, dtype=torch.float64)
        self.known = torch.zeros(n_cells, dtype=torch.bool)

    def for_rows(self, rows: torch.Tensor, counts: SparseCounts) -> torch.Tensor:
        """The sums of the cells ``rows`` whose counts (in that order) are ``counts``."""
        if not bool(self.known[rows].all()):
            self.sums[rows] = counts.row_sums(torch.lgamma(counts.values + 1.0).double())
            self.known[rows] = True
        return self.sums[rows]


def _distributed() -> bool:
    """Whether this process belongs to a torch.distributed process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) outside a process group."""
    if _distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _SubsetBatchSampler(Sampler):
    """Batches of indices drawn from a fixed subset of cells, handed out
    ``minibatches_per_fetch`` at a time (as a list of index arrays, the last list possibly
    shorter).

    The shuffling draws come from the sampler's own ``torch.Generator``, seeded afresh each
    epoch from ``(seed, epoch)`` (:meth:`set_epoch`, which Lightning calls at the start of
    every epoch; iterating without it advances the epoch by one a pass), never from the
    global RNG. ``seed`` defaults to a number drawn from torch's global generator when the
    sampler is made, so ``torch.manual_seed`` still decides the order.

    Under DDP every process therefore draws the same permutation in every epoch, whatever
    else (dropout, the model's noise) it has drawn from its global RNG (processes whose
    seeds differ, as unseeded processes launched apart would, take rank 0's: one broadcast
    at the first epoch), and keeps every ``world_size``-th cell of it from its rank on,
    after trimming the permutation to a multiple of ``world_size``: the ranks' cells are
    disjoint and all ranks run the same number of steps (at most ``world_size - 1`` cells
    sit out an epoch, different ones each epoch when shuffling). A resumed run continues the
    same sequence of permutations.

    With ``shuffle_block_cells=B`` (shuffling only) the subset is cut into blocks of ``B``
    consecutive cells and the *blocks* are permuted; each fetch then pools the cells of its
    blocks and permutes them before cutting its minibatches (under DDP each process takes a
    contiguous share of the block order). A minibatch thus mixes cells of about
    ``fetch / B`` random blocks, and an on-disk matrix is read in runs of ``B`` cells instead
    of one read per cell. Every cell is still seen once an epoch; the price is that cells
    of one block tend to share fetches, which matters only if the file is ordered by
    something the model should not see together (sorting by batch, say) and ``B`` is large.
    """

    def __init__(
        self,
        subset: np.ndarray,
        batch_size: int,
        shuffle: bool,
        minibatches_per_fetch: int = 1,
        shuffle_block_cells: int | None = None,
        seed: int | None = None,
    ):
        self.subset = np.asarray(subset, dtype=np.int64)
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.minibatches_per_fetch = max(1, int(minibatches_per_fetch))
        self.block_cells = int(shuffle_block_cells) if shuffle and shuffle_block_cells else 0
        self.drop_last = False
        if seed is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64)) if shuffle else 0
        self.seed = int(seed)
        self.epoch = 0
        self._seed_agreed = False
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation the next pass draws."""
        self.epoch = int(epoch)

    def resume_within_epoch(self, epoch: int, fetches_done: int) -> None:
        """The next pass over ``epoch`` leaves out its first ``fetches_done`` fetches (drawn as
        before, so the rest are the same): a run resumed from a checkpoint written inside an
        epoch continues with the cells it had not yet trained on."""
        self._skip = (int(epoch), int(fetches_done))

    def _generator(self) -> torch.Generator:
        """This epoch's generator, seeded from ``(seed, epoch)``."""
        _, world = _process_group()
        if world > 1 and self.shuffle and not self._seed_agreed and _distributed():
            # every process must draw the same permutations: take rank 0's seed
            seed = [self.seed]
            torch.distributed.broadcast_object_list(seed, src=0)
            self.seed, self._seed_agreed = int(seed[0]), True
        state = np.random.SeedSequence((self.seed, self.epoch)).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def _rank_cells(self, generator: torch.Generator) -> np.ndarray:
        rank, world = _process_group()
        n = self.subset.size
        if self.block_cells:
            n_blocks = -(-n // self.block_cells)
            starts = torch.randperm(n_blocks, generator=generator).numpy() * self.block_cells
            order = (starts[:, None] + np.arange(self.block_cells)).ravel()
            order = order[order < n]
            share = n // world  # a contiguous share of the block order, whole blocks kept
            return self.subset[order[rank * share : (rank + 1) * share]]
        order = torch.randperm(n, generator=generator).numpy() if self.shuffle else np.arange(n)
        if world > 1:
            order = order[: (n // world) * world][rank::world]
        return self.subset[order]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        generator = self._generator()
        skip = self._skip[1] if self._skip and self._skip[0] == self.epoch else 0
        self._skip = None
        self.epoch += 1  # the next pass, unless set_epoch says otherwise
        cells = self._rank_cells(generator)
        per_fetch = self.batch_size * self.minibatches_per_fetch
        for number, (first, end) in enumerate(_pieces(cells.size, per_fetch)):
            pooled = cells[first:end]
            if self.block_cells:
                pooled = pooled[torch.randperm(pooled.size, generator=generator).numpy()]
            if number < skip:
                continue
            yield [pooled[start:stop] for start, stop in _pieces(pooled.size, self.batch_size)]

    def _n_cells(self) -> int:
        """This process's cells in one pass."""
        _, world = _process_group()
        return self.subset.size // world if world > 1 else self.subset.size

    @property
    def n_minibatches(self) -> int:
        """Minibatches (optimiser steps, when training) in one pass over this process's cells."""
        return len(_pieces(self._n_cells(), self.batch_size))

    def __len__(self) -> int:
        return len(_pieces(self._n_cells(), self.batch_size * self.minibatches_per_fetch))


def _pieces(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive pieces of ``size`` covering ``range(n)``, except that a
    last piece of one element joins the piece before it: a training minibatch of one cell
    would make BatchNorm fail (no variance to normalise by), so the last minibatch of a pass
    has ``size + 1`` cells instead (and so does the fetch that holds it)."""
    starts = list(range(0, n, size))
    if size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], n], strict=True)) if starts else []


def make_dataloader(
    dataset: CsrMinibatchDataset,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
    minibatches_per_fetch: int = 1,
    shuffle_block_cells: int | None = None,
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader over ``indices`` whose items are lists of ``minibatches_per_fetch`` whole
    minibatches (fewer in the last item of a pass); ``shuffle_block_cells`` and ``seed`` (of
    the shuffling, by default drawn from torch's global generator): see
    :class:`_SubsetBatchSampler`."""
    if batch_size < 1:
        raise DataError(f"data.batch_size must be at least 1 (got {batch_size})")
    if minibatches_per_fetch < 1:
        raise DataError(
            f"data.minibatches_per_fetch must be at least 1 (got {minibatches_per_fetch})"
        )
    if shuffle_block_cells is not None and shuffle_block_cells < 1:
        raise DataError(
            f"data.shuffle_block_cells must be at least 1 or null (got {shuffle_block_cells})"
        )
    sampler = _SubsetBatchSampler(
        indices, batch_size, shuffle, minibatches_per_fetch, shuffle_block_cells, seed
    )
    return DataLoader(
        dataset,
        sampler=sampler,
        worker_init_fn=_reopen_on_disk_data if num_workers > 0 else None,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def _reopen_on_disk_data(worker_id: int) -> None:
    """In a DataLoader worker (a forked process), open on-disk counts afresh rather than
    read through the parent's HDF5 handle."""
    rows = getattr(torch.utils.data.get_worker_info().dataset, "_rows", None)
    if isinstance(rows, OnDiskCsrRows):
        rows.reopen()


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
