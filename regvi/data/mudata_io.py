"""Reading MuData (.h5mu) multiome files: modality layout, shared cells, per-modality counts.

Rules (SPEC section 3, documented in :class:`regvi.model.RegularizedMultimodalVI`):

* **Modalities** are named by the data config (a list of names, or a mapping name -> count
  layer, ``None`` meaning ``X``); when not configured, every modality of the file is used with
  its ``X``. They are always handled in alphabetical order of their names.
* **Shared cells.** Every cell must be measured in every selected modality. A cell missing
  from a modality is an error by default (``missing_cells="error"``), naming the modality and
  the cells; ``missing_cells="mask"`` instead gives it an all-zero row there, which the model
  treats as "not measured" (see the all-zero rule below).
* **All-zero rows** (a cell whose counts in a modality sum to 0) mean "not measured in this
  modality": the model removes that modality's likelihood and KL terms for the cell and sets
  its latent block to the prior. This is decided in the module from the row total.
* **Counts** of each modality are validated as raw whole numbers (CSR float32, never
  densified here); an error names the modality.
* **obs columns** (covariates, labels) come from the MuData's global ``obs``; a column found
  only in a modality's ``obs`` is taken from the first modality (alphabetically) that has it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from regvi.data.counts import SparseCounts
from regvi.data.features import match_features
from regvi.data.io import count_matrix
from regvi.data.loader import (
    CsrMinibatchDataset,
    LogFactorialCache,
    in_memory_canonical,
    stored_entries_per_cell,
)
from regvi.errors import DataError

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
MISSING_CELL_RULES = ("error", "mask")


def read_h5mu(path: str | Path) -> Any:
    """Read a ``.h5mu`` file fully into memory, with errors that name the problem."""
    import mudata

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir() or path.suffix.lower() != ".h5mu":
        raise DataError(f"the multimodal model needs a MuData .h5mu file (got {path.name!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return mudata.read_h5mu(path)
    except Exception as exc:  # h5py/mudata raise many types for corrupt or foreign files
        raise DataError(f"could not read {path} as an .h5mu file: {exc}") from exc


def resolve_modalities(
    mdata: Any, modalities: Sequence[str] | Mapping[str, str | None] | None
) -> dict[str, str | None]:
    """``{modality: count layer or None}`` in alphabetical order of the names.

    ``modalities`` is a list of names (counts in ``X``), a mapping name -> layer, or ``None``
    (every modality of ``mdata``).
    """
    available = list(mdata.mod.keys())
    if modalities is None:
        layers: dict[str, str | None] = {m: None for m in available}
    elif isinstance(modalities, Mapping):
        layers = {str(m): (None if v is None else str(v)) for m, v in modalities.items()}
    elif isinstance(modalities, str):
        layers = {modalities: None}
    else:
        layers = {str(m): None for m in modalities}
    if not layers:
        raise DataError("no modality selected: data.modalities is empty")
    absent = [m for m in layers if m not in mdata.mod]
    if absent:
        raise DataError(
            f"modality {', '.join(map(repr, absent))} named in data.modalities is not in the "
            f"data (available modalities: {', '.join(available) or 'none'})"
        )
    for name in layers:
        if not _NAME.match(name):
            raise DataError(
                f"modality name {name!r} must contain only letters, digits, '_' and '-'"
            )
    for name, layer in layers.items():
        if layer is not None and layer not in mdata.mod[name].layers:
            have = ", ".join(mdata.mod[name].layers.keys()) or "(none)"
            raise DataError(
                f"layer {layer!r} not found in modality {name!r}; available layers: {have}"
            )
    return dict(sorted(layers.items()))


def shared_cells(mdata: Any, names: Sequence[str], missing_cells: str = "error") -> pd.Index:
    """The cells used by the model: those of the selected modalities, in ``mdata`` order.

    With ``missing_cells="error"`` a cell absent from any selected modality is an error that
    names the modality; with ``"mask"`` the union is used (absent = all-zero row = masked).
    """
    if missing_cells not in MISSING_CELL_RULES:
        raise DataError(
            f"missing_cells={missing_cells!r} is not one of {', '.join(MISSING_CELL_RULES)}"
        )
    per_modality = {m: pd.Index(mdata.mod[m].obs_names) for m in names}
    union = pd.Index(mdata.obs_names)
    union = union[
        union.isin(np.unique(np.concatenate([v.to_numpy() for v in per_modality.values()])))
    ]
    if missing_cells == "error":
        for m, cells in per_modality.items():
            absent = union.difference(cells)
            if len(absent):
                shown = ", ".join(map(repr, list(absent[:3])))
                raise DataError(
                    f"{len(absent)} cell(s) are not shared: missing from modality {m!r} "
                    f"(e.g. {shown}); subset to the shared cells (muon.pp.intersect_obs) "
                    "or set missing_cells='mask'"
                )
    return union


def shared_obs(mdata: Any, names: Sequence[str], cells: pd.Index) -> pd.DataFrame:
    """obs of ``cells``: global columns first, then modality-only columns (see module doc)."""
    obs = mdata.obs.reindex(cells).copy()
    for m in names:
        mod_obs = mdata.mod[m].obs
        for col in mod_obs.columns:
            if col not in obs.columns:
                obs[col] = mod_obs[col].reindex(cells)
    return obs


def modality_counts(mdata: Any, name: str, layer: str | None, cells: pd.Index) -> sp.csr_matrix:
    """Validated float32 CSR counts of one modality, rows aligned to ``cells``.

    Cells absent from the modality get all-zero rows (only reachable with
    ``missing_cells="mask"``). The matrix is never densified.
    """
    adata = mdata.mod[name]
    try:
        X = count_matrix(adata, layer)
    except DataError as exc:
        raise DataError(f"modality {name!r}: {exc}") from None
    own = pd.Index(adata.obs_names)
    if own.equals(cells):
        return X
    rows = own.get_indexer(cells)
    present = rows >= 0
    # Selection matrix S (cells x own cells) with one 1 per present cell: S @ X reorders rows.
    select = sp.csr_matrix(
        (np.ones(int(present.sum()), np.float32), (np.flatnonzero(present), rows[present])),
        shape=(len(cells), len(own)),
    )
    return (select @ X).tocsr()


def feature_aligned(adata: Any, feature_names: Sequence[str], modality: str) -> Any:
    """``adata`` (one modality) with its features in the model's order; missing features are
    an error (see :func:`regvi.data.features.match_features`)."""
    return match_features(adata, feature_names, f"{modality!r} features")


class MultiModalDataset(CsrMinibatchDataset):
    """Minibatches of several CSR count matrices sharing cells (one per modality).

    Items: ``x_<modality>`` (:class:`SparseCounts` of the minibatch's rows), the covariate
    arrays, and ``x`` — the same object as the first modality's ``x_<m>`` (no copy), which
    the training plan reads for the minibatch size.
    """

    def __init__(self, matrices: Mapping[str, sp.csr_matrix], covariates: Mapping[str, np.ndarray]):
        names = list(matrices)
        super().__init__(matrices[names[0]], covariates)
        self.matrices = dict(matrices)
        self._canonical_matrices = {
            name: in_memory_canonical(X) for name, X in self.matrices.items()
        }
        self._log_factorial_sums = {
            name: self._log_factorials if X is self.X else LogFactorialCache(X.shape[0])
            for name, X in self.matrices.items()
        }
        self._gather_at_once = all(sp.issparse(X) for X in self.matrices.values())

    def entries_per_cell(self) -> float:
        return sum(stored_entries_per_cell(X) for X in self.matrices.values())

    def _gather(self, idx: np.ndarray, rows: sp.csr_matrix | None = None) -> dict[str, Any]:
        batch = super()._gather(idx, rows)
        cells = torch.from_numpy(idx)
        for name, X in self.matrices.items():
            if X is self.X:
                batch[f"x_{name}"] = batch["x"]
                continue
            counts = SparseCounts.from_scipy(X[idx], canonical=self._canonical_matrices[name])
            counts.row_log_factorials = self._log_factorial_sums[name].for_rows(cells, counts)
            batch[f"x_{name}"] = counts
        return batch
