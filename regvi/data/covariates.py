"""Covariate keys: resolving the five model keys and the purpose keys, and encoding them.

SPEC section 1. Every covariate column becomes integer codes with its category list stored, so
new data is encoded the same way and an unseen category is a clear error.

Resolution rules (``CovariateKeys.resolve``):

* ``batch_key`` (or its purpose-key equivalent ``library_key``) fans out to
  ``ambient_covariate_keys=[key]``, ``dispersion_key=key`` and ``library_size_key=key``;
  giving it together with any of those three is an error. It also conditions the decoder
  (``nn_conditioning_covariate_keys=[key]``) unless ``nn_conditioning_covariate_keys`` is
  given (``[]`` keeps the decoder batch-free, the published default). Why: batch effects
  that differ by gene *and* cell type (chemistries, 3' vs 5', studies) cannot be explained by
  the ambient and per-gene scaling terms alone, so a batch-free decoder leaves them in z;
  on three 10x chemistries kNN batch entropy was 0.30 batch-free vs 0.62 conditioned, for
  the same biology (docs/integration.md).
* ``dataset_key`` and ``technical_covariate_keys`` are broad technical axes. Unless
  ``feature_scaling_covariate_keys`` is given explicitly, they become the feature-scaling
  covariates (a study or a kit changes per-gene capture multiplicatively), then
  ``nn_conditioning_covariate_keys`` are used as the fallback (as in the published code).
* Each library must belong to exactly one dataset (checked at encoding time).
* Keys that stay unset mean "one group for all cells": no ambient background without ambient
  keys, one dispersion vector, one library-size prior.
* The encoder is batch-free unless ``encoder_covariate_keys`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from regvi.errors import ConfigError, DataError

#: Model roles that take a list of categorical keys, in a fixed order.
LIST_ROLES = (
    "ambient_covariate_keys",
    "nn_conditioning_covariate_keys",
    "feature_scaling_covariate_keys",
    "encoder_covariate_keys",
)
#: Model roles that take a single categorical key.
SINGLE_ROLES = ("dispersion_key", "library_size_key")
#: Short role names used for code arrays and parameter tables.
ROLE_NAMES = {
    "ambient_covariate_keys": "ambient",
    "nn_conditioning_covariate_keys": "nn_conditioning",
    "feature_scaling_covariate_keys": "feature_scaling",
    "encoder_covariate_keys": "encoder",
    "dispersion_key": "dispersion",
    "library_size_key": "library_size",
}


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None or value is False:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


@dataclass
class CovariateKeys:
    """The resolved mapping from model roles to obs columns (plus the purpose keys)."""

    ambient_covariate_keys: list[str] = field(default_factory=list)
    nn_conditioning_covariate_keys: list[str] = field(default_factory=list)
    feature_scaling_covariate_keys: list[str] = field(default_factory=list)
    encoder_covariate_keys: list[str] = field(default_factory=list)
    dispersion_key: str | None = None
    library_size_key: str | None = None
    continuous_covariate_keys: list[str] = field(default_factory=list)
    library_key: str | None = None
    dataset_key: str | None = None
    technical_covariate_keys: list[str] = field(default_factory=list)

    @classmethod
    def resolve(
        cls,
        batch_key: str | None = None,
        library_key: str | None = None,
        dataset_key: str | None = None,
        technical_covariate_keys: str | Sequence[str] | None = None,
        ambient_covariate_keys: str | Sequence[str] | None = None,
        nn_conditioning_covariate_keys: str | Sequence[str] | None = None,
        feature_scaling_covariate_keys: str | Sequence[str] | None = None,
        dispersion_key: str | None = None,
        library_size_key: str | None = None,
        encoder_covariate_keys: str | Sequence[str] | None = None,
        continuous_covariate_keys: str | Sequence[str] | None = None,
    ) -> CovariateKeys:
        """Apply the fan-out and default rules of SPEC section 1 (see module docstring)."""
        if batch_key and library_key and batch_key != library_key:
            raise ConfigError(
                f"covariates.batch_key={batch_key!r} and covariates.library_key={library_key!r} "
                "name the same concept (the finest technical unit); set only one"
            )
        fan_key = batch_key or library_key
        if fan_key:
            which = "batch_key" if batch_key else "library_key"
            clashes = [
                name
                for name, value in (
                    ("ambient_covariate_keys", ambient_covariate_keys),
                    ("dispersion_key", dispersion_key),
                    ("library_size_key", library_size_key),
                )
                if value
            ]
            if clashes:
                raise ConfigError(
                    f"covariates.{which} fans out to ambient_covariate_keys, dispersion_key and "
                    f"library_size_key; do not also set {', '.join(clashes)}"
                )
            ambient_covariate_keys, dispersion_key, library_size_key = [fan_key], fan_key, fan_key
            if nn_conditioning_covariate_keys is None:
                nn_conditioning_covariate_keys = [fan_key]
        technical = _as_list(technical_covariate_keys)
        nn_cond = _as_list(nn_conditioning_covariate_keys)
        if feature_scaling_covariate_keys is None:
            broad = ([dataset_key] if dataset_key else []) + technical
            feature_scaling = broad or nn_cond
        else:
            feature_scaling = _as_list(feature_scaling_covariate_keys)
        keys = cls(
            ambient_covariate_keys=_as_list(ambient_covariate_keys),
            nn_conditioning_covariate_keys=nn_cond,
            feature_scaling_covariate_keys=feature_scaling,
            encoder_covariate_keys=_as_list(encoder_covariate_keys),
            dispersion_key=dispersion_key or None,
            library_size_key=library_size_key or None,
            continuous_covariate_keys=_as_list(continuous_covariate_keys),
            library_key=fan_key or library_size_key or None,
            dataset_key=dataset_key or None,
            technical_covariate_keys=technical,
        )
        for role in LIST_ROLES + ("continuous_covariate_keys", "technical_covariate_keys"):
            values = getattr(keys, role)
            if len(set(values)) != len(values):
                raise ConfigError(f"covariates.{role} lists a column twice: {values}")
        return keys

    def categorical_columns(self) -> list[str]:
        """Every obs column that is encoded as categories (deduplicated, ordered)."""
        cols: list[str] = []
        for role in LIST_ROLES:
            cols += getattr(self, role)
        for role in SINGLE_ROLES:
            if getattr(self, role):
                cols.append(getattr(self, role))
        for extra in (self.library_key, self.dataset_key, *self.technical_covariate_keys):
            if extra:
                cols.append(extra)
        return list(dict.fromkeys(cols))

    def role_keys(self, role: str) -> list[str]:
        """Keys of ``role`` as a list (single-key roles give zero or one key)."""
        value = getattr(self, role)
        return _as_list(value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CovariateEncoder:
    """Encodes obs columns into integer codes per model role; keeps category lists.

    ``fit`` learns the categories (pandas categorical order if the column is categorical,
    otherwise sorted order) and validates the data; ``transform`` encodes any obs table with
    the stored categories and raises :class:`DataError` for an unseen category.

    Codes of a list role are *absolute* indices into the concatenation of its keys'
    categories, shape ``(n_cells, n_keys)``; single roles give shape ``(n_cells,)`` and code 0
    for every cell when the role is unset (one group).
    """

    def __init__(self, keys: CovariateKeys, categories: Mapping[str, Sequence[str]] | None = None):
        self.keys = keys
        self.categories: dict[str, list[str]] = {k: list(v) for k, v in (categories or {}).items()}
        self.continuous_stats: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, obs: pd.DataFrame) -> CovariateEncoder:
        self._check_columns(obs)
        for col in self.keys.categorical_columns():
            self.categories[col] = self._categories_of(obs, col)
        for col in self.keys.continuous_covariate_keys:
            values = pd.to_numeric(obs[col], errors="coerce").to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise DataError(
                    f"obs column {col!r} (a continuous covariate) has non-numeric, NaN or "
                    "infinite values; fill or drop those cells"
                )
            std = float(values.std())
            self.continuous_stats[col] = (float(values.mean()), std if std > 0 else 1.0)
        self._check_library_dataset(obs)
        return self

    def _categories_of(self, obs: pd.DataFrame, col: str) -> list[str]:
        """The categories present in ``obs[col]``: in the pandas categorical order if the
        column is categorical, otherwise sorted (as strings)."""
        series = obs[col]
        self._check_no_missing(series, col)
        if isinstance(series.dtype, pd.CategoricalDtype):
            present = set(series.unique())
            return [str(c) for c in series.cat.categories if c in present]
        return sorted({str(v) for v in series.unique()})

    def add_categories(self, obs: pd.DataFrame, col: str) -> list[str]:
        """Append to ``col``'s stored categories those of ``obs[col]`` not seen so far (in
        :meth:`fit`'s order) and return them; existing codes are unchanged. Query mapping
        uses it for every categorical column: new values get codes after the known ones."""
        if col not in self.categories:
            raise DataError(f"obs column {col!r} is not a categorical covariate of the model")
        if col not in obs.columns:
            raise DataError(f"obs column {col!r} not found in the data")
        known = set(self.categories[col])
        new = [c for c in self._categories_of(obs, col) if c not in known]
        self.categories[col] = [*self.categories[col], *new]
        return new

    def _check_columns(self, obs: pd.DataFrame) -> None:
        wanted = self.keys.categorical_columns() + self.keys.continuous_covariate_keys
        missing = [c for c in wanted if c not in obs.columns]
        if missing:
            available = ", ".join(map(str, list(obs.columns)[:20])) or "(none)"
            raise DataError(
                f"obs column(s) {', '.join(repr(m) for m in missing)} not found in the data; "
                f"available obs columns: {available}"
            )

    @staticmethod
    def _check_no_missing(series: pd.Series, col: str) -> None:
        n_missing = int(series.isna().sum())
        if n_missing:
            raise DataError(
                f"obs column {col!r} has {n_missing} missing (NaN) value(s); fill them "
                "(e.g. with 'unknown') or drop those cells"
            )

    def _check_library_dataset(self, obs: pd.DataFrame) -> None:
        lib, ds = self.keys.library_key, self.keys.dataset_key
        if not lib or not ds:
            return
        pairs = obs[[lib, ds]].astype(str).drop_duplicates()
        n_datasets = pairs.groupby(lib)[ds].nunique()
        bad = n_datasets[n_datasets > 1]
        if len(bad):
            detail = "; ".join(
                f"{name!r} in {sorted(pairs.loc[pairs[lib] == name, ds])}" for name in bad.index[:5]
            )
            raise DataError(
                f"each library ({lib!r}) must belong to exactly one dataset ({ds!r}); "
                f"{len(bad)} librar{'y is' if len(bad) == 1 else 'ies are'} in several: {detail}"
            )

    # ------------------------------------------------------------------ encoding
    def n_categories(self, role: str) -> list[int]:
        """Number of categories of each key of ``role``."""
        return [len(self.categories[k]) for k in self.keys.role_keys(role)]

    def n_groups(self, role: str) -> int:
        """Number of groups of a single-key role (1 when unset)."""
        keys = self.keys.role_keys(role)
        return len(self.categories[keys[0]]) if keys else 1

    def encode_column(self, obs: pd.DataFrame, col: str) -> np.ndarray:
        if col not in obs.columns:
            raise DataError(f"obs column {col!r} not found in the data")
        series = obs[col]
        self._check_no_missing(series, col)
        cats = self.categories[col]
        codes = pd.Categorical(series.astype(str), categories=cats).codes.astype(np.int64)
        if (codes < 0).any():
            unseen = sorted(set(series.astype(str)[codes < 0]))
            shown = ", ".join(repr(u) for u in unseen[:5])
            raise DataError(
                f"obs column {col!r} has categor{'y' if len(unseen) == 1 else 'ies'} {shown} "
                f"not seen when the model was set up (known: {', '.join(cats[:10])}"
                f"{'...' if len(cats) > 10 else ''})"
            )
        return codes

    def transform(self, obs: pd.DataFrame) -> dict[str, np.ndarray]:
        """Codes for every role: ``{role_name: array}`` plus ``continuous`` (float32)."""
        out: dict[str, np.ndarray] = {}
        n = obs.shape[0]
        for role in LIST_ROLES:
            keys = self.keys.role_keys(role)
            cols, offset = [], 0
            for k in keys:
                cols.append(self.encode_column(obs, k) + offset)
                offset += len(self.categories[k])
            out[ROLE_NAMES[role]] = (
                np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.int64)
            )
        for role in SINGLE_ROLES:
            keys = self.keys.role_keys(role)
            out[ROLE_NAMES[role]] = (
                self.encode_column(obs, keys[0]) if keys else np.zeros(n, dtype=np.int64)
            )
        conts = []
        for col in self.keys.continuous_covariate_keys:
            if col not in obs.columns:
                raise DataError(f"obs column {col!r} not found in the data")
            mean, std = self.continuous_stats[col]
            values = pd.to_numeric(obs[col], errors="coerce").to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise DataError(f"obs column {col!r} has non-numeric, NaN or infinite values")
            # Standardised with the training statistics so the encoder sees unit-scale inputs.
            conts.append((values - mean) / std)
        out["continuous"] = (
            np.stack(conts, axis=1).astype(np.float32) if conts else np.zeros((n, 0), np.float32)
        )
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys.to_dict(),
            "categories": self.categories,
            "continuous_stats": {k: list(v) for k, v in self.continuous_stats.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> CovariateEncoder:
        enc = cls(CovariateKeys(**state["keys"]), state["categories"])
        enc.continuous_stats = {k: (v[0], v[1]) for k, v in state["continuous_stats"].items()}
        return enc
