"""Simulated single-cell count data drawn from regvi's own generative model, with known truth.

:func:`simulate` draws counts from exactly the generative process that regvi's VAE assumes
(a decoder producing expression fractions, per-batch ambient RNA, per-batch feature scaling,
per-group gene dispersions and a log-normal library size) and returns the ground truth next
to the counts, so that every part of the model can be checked against known values.
:func:`default_dataset` is the small embedded dataset used by ``regvi train`` without data.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from regvi.errors import DataError

__all__ = ["SimulatedTruth", "simulate", "default_dataset", "DETruth", "simulate_de"]

# Fixed constants of the generative process (documented in ``simulate``).
_TYPE_CENTRE_SD = 3.0  # c_k ~ N(0, 3^2 I)
_WITHIN_TYPE_SD = 0.5  # z_n = c_k + 0.5 * eps
_LOADINGS_PER_GENE = 2.0  # expected number of latent dimensions each gene loads on
_BASELINE_LOG_SD = 1.0  # baseline_g ~ LogNormal(log(1 / n_genes), 1)
_BASELINE_SCALE = 10.0  # baseline_g is multiplied by this (see docstring)
_AMBIENT_BATCH_SD = 0.5  # s_{b,g} = f * soup_g * exp(N(0, 0.5^2))
_DISPERSION_GENE_SD = 0.2  # theta_{d,g} = level_d * exp(N(0, 0.2^2))
_TARGET_CHUNK_ELEMENTS = 4_000_000  # cells per chunk = min(2000, this // n_genes)
_MAX_CHUNK_CELLS = 2000


@dataclass
class SimulatedTruth:
    """Ground truth of a simulated dataset (see :func:`simulate` for the notation).

    Attributes
    ----------
    cell_type : numpy.ndarray of int, shape (n_cells,)
        Cell type index ``k_n``.
    batch : numpy.ndarray of int, shape (n_cells,)
        Batch index ``b_n``.
    z : numpy.ndarray of float, shape (n_cells, n_latent)
        Latent state ``z_n``.
    rho : numpy.ndarray of float32, shape (n_cells, n_genes), or None
        Decoder output ``rho_{n,g}`` (fraction of the library); ``None`` when the simulation
        was run with ``return_rho=False``.
    ambient : numpy.ndarray of float, shape (n_batches, n_genes)
        Ambient RNA fraction ``s_{b,g}``.
    feature_scaling : numpy.ndarray of float, shape (n_batches, n_genes)
        Per-batch gene detection factor ``y_{b,g}``.
    dispersion : numpy.ndarray of float, shape (n_dispersion_groups, n_genes)
        Negative binomial inverse dispersion ``theta_{d,g}``.
    dispersion_group : numpy.ndarray of int, shape (n_cells,)
        Dispersion group ``d_n`` of each cell (equal to the batch).
    log_library : numpy.ndarray of float, shape (n_cells,)
        Log library size ``l_n``.
    """

    cell_type: np.ndarray
    batch: np.ndarray
    z: np.ndarray
    rho: np.ndarray | None
    ambient: np.ndarray
    feature_scaling: np.ndarray
    dispersion: np.ndarray
    dispersion_group: np.ndarray
    log_library: np.ndarray

    def expected_counts(self, cells: slice | np.ndarray | None = None) -> np.ndarray:
        """Return the negative binomial mean ``mu_{n,g}`` for the selected cells.

        Parameters
        ----------
        cells
            Cells to compute the mean for (a slice, an integer index array or a boolean mask);
            all cells when ``None``.

        Returns
        -------
        numpy.ndarray
            ``exp(l_n) * (rho_{n,g} + s_{b_n,g}) * y_{b_n,g}`` as float64, shape
            ``(n_selected_cells, n_genes)``.
        """
        if self.rho is None:
            raise DataError(
                "expected_counts needs the decoder output rho, but this truth was simulated "
                "with return_rho=False; simulate again with return_rho=True"
            )
        index = slice(None) if cells is None else cells
        rho = np.asarray(self.rho[index], dtype=np.float64)
        batch = self.batch[index]
        library = np.exp(self.log_library[index])[:, None]
        return library * (rho + self.ambient[batch]) * self.feature_scaling[batch]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DataError(f"simulate: {name} must be a positive integer, got {value!r}")
    return int(value)


def _check_real(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    strict: bool = False,
    allow_inf: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"simulate: {name} must be a real number, got {value!r}")
    result = float(value)
    if math.isnan(result) or (math.isinf(result) and not allow_inf):
        raise DataError(f"simulate: {name} must be finite, got {value!r}")
    if minimum is not None:
        if strict and not result > minimum:
            raise DataError(f"simulate: {name} must be > {minimum:g}, got {value!r}")
        if not strict and not result >= minimum:
            raise DataError(f"simulate: {name} must be >= {minimum:g}, got {value!r}")
    return result


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _balanced_labels(rng: np.random.Generator, n: int, n_labels: int) -> np.ndarray:
    """Labels 0..n_labels-1 in near-equal proportions (counts differ by at most one), shuffled."""
    labels = np.resize(rng.permutation(n_labels), n)
    return rng.permutation(labels)


def _worker_count(n_chunks: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on every platform
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8, n_chunks))


def simulate(
    n_cells: int = 3000,
    n_genes: int = 1000,
    n_cell_types: int = 6,
    n_batches: int = 3,
    n_latent: int = 8,
    dispersion_levels: Sequence[float] = (2.0, 8.0, 30.0),
    ambient_fraction: float = 0.1,
    feature_scaling_concentration: float = 20.0,
    library_log_mean: float = 8.0,
    library_log_sd: float = 0.3,
    batch_library_shift: float = 0.3,
    seed: int = 0,
    return_rho: bool = True,
) -> tuple[anndata.AnnData, SimulatedTruth]:
    r"""Simulate counts from regvi's generative model and return them with the ground truth.

    Generative process, for cells :math:`n`, genes :math:`g`, batches :math:`b`, cell types
    :math:`k` and dispersion groups :math:`d`:

    .. math::

        k_n &\sim \text{near-equal proportions over types, within every batch}, \quad
        b_n \sim \text{near-equal proportions over batches} \\
        c_k &\sim \mathcal{N}(0, 3^2 I_L), \qquad
        z_n = c_{k_n} + 0.5\,\varepsilon_n, \quad \varepsilon_n \sim \mathcal{N}(0, I_L) \\
        W_{j,g} &= m_{j,g}\, w_{j,g}, \quad m_{j,g} \sim \text{Bernoulli}(\min(1, 2/L)),
        \quad w_{j,g} \sim \mathcal{N}(0, 1) \\
        \beta_g &= \log(10\, u_g), \quad u_g \sim \text{LogNormal}(\log(1/G), 1) \\
        \tilde\rho_{n,g} &= \operatorname{softplus}(z_n^\top W_{\cdot,g} + \beta_g), \qquad
        \rho_{n,g} = \tilde\rho_{n,g} \Big/ \tfrac{1}{N}\textstyle\sum_{n'} \sum_{g'}
        \tilde\rho_{n',g'} \\
        \text{soup}_g &= \bar\rho_g \Big/ \textstyle\sum_{g'} \bar\rho_{g'}, \quad
        \bar\rho_g = \tfrac{1}{N}\textstyle\sum_n \rho_{n,g} \\
        s_{b,g} &= f_\text{amb}\, \text{soup}_g\, e^{\eta_{b,g}}, \quad
        \eta_{b,g} \sim \mathcal{N}(0, 0.5^2) \\
        y_{b,g} &\sim \text{Gamma}(\text{shape}=a, \text{rate}=a) \\
        d_n &= b_n, \qquad \theta_{d,g} = \lambda_{d \bmod |\lambda|}\, e^{\xi_{d,g}}, \quad
        \xi_{d,g} \sim \mathcal{N}(0, 0.2^2) \\
        l_n &\sim \mathcal{N}\big(\mu_l + \delta\,(b_n - (B-1)/2),\ \sigma_l^2\big) \\
        \mu_{n,g} &= e^{l_n}\, (\rho_{n,g} + s_{b_n,g})\, y_{b_n,g} \\
        x_{n,g} &\sim \text{GammaPoisson}(\theta_{d_n,g},\ \theta_{d_n,g} / \mu_{n,g})
        = \text{Poisson}\big(\text{Gamma}(\text{shape}=\theta_{d_n,g},
        \text{scale}=\mu_{n,g}/\theta_{d_n,g})\big)

    so :math:`\mathbb{E}[x_{n,g}] = \mu_{n,g}` and
    :math:`\operatorname{Var}[x_{n,g}] = \mu_{n,g} + \mu_{n,g}^2 / \theta_{d_n,g}`.
    Here :math:`L` = ``n_latent``, :math:`G` = ``n_genes``, :math:`N` = ``n_cells``,
    :math:`B` = ``n_batches``, :math:`f_\text{amb}` = ``ambient_fraction``,
    :math:`a` = ``feature_scaling_concentration``, :math:`\lambda` = ``dispersion_levels``,
    :math:`\mu_l, \sigma_l, \delta` = ``library_log_mean``, ``library_log_sd``,
    ``batch_library_shift``. The factor 10 in the decoder bias keeps the softplus in its
    exponential regime for most (about 90-95% of) cell-gene pairs while letting the few highly
    activated genes saturate into its linear regime, so no single gene takes over a cell's
    library; ``rho`` spans several orders of magnitude across genes and cell types differ
    strongly in expression. ``rho`` sums to 1 per cell on average (the ambient term adds about
    ``ambient_fraction`` more).

    Cell types are assigned within each batch in near-equal proportions, so the type
    composition is the same in every batch and every type appears in every batch.

    Parameters
    ----------
    n_cells, n_genes, n_cell_types, n_batches, n_latent
        Sizes; positive integers with ``n_cells >= n_batches * n_cell_types``.
    dispersion_levels
        Typical inverse dispersion ``theta`` of each dispersion group (group ``d`` uses
        ``dispersion_levels[d % len(dispersion_levels)]``); positive.
    ambient_fraction
        Ambient RNA as a fraction of the cell's own RNA (>= 0).
    feature_scaling_concentration
        Shape and rate of the Gamma prior of the feature scaling (> 0; ``inf`` gives y = 1).
    library_log_mean, library_log_sd, batch_library_shift
        Mean and standard deviation of the log library size, and its shift per batch step.
    seed
        Seed (non-negative integer); the result is a deterministic function of all arguments
        and does not depend on the number of CPU cores used.
    return_rho
        Whether to keep the dense ``(n_cells, n_genes)`` float32 decoder output in the truth
        (``truth.rho`` is ``None`` otherwise; the counts are identical either way).

    Returns
    -------
    adata : anndata.AnnData
        ``X``: CSR float32 whole-number counts. ``obs``: categorical ``batch`` (``batch_0``,
        ...), ``cell_type`` (``type_0``, ...) and ``dispersion_group`` (the batch labels).
        ``obsm["true_z"]``, ``varm["true_ambient"]`` (n_genes, n_batches),
        ``varm["true_feature_scaling"]`` (n_genes, n_batches), ``varm["true_dispersion"]``
        (n_genes, n_groups) and ``uns["simulation"]`` (the parameters, JSON-friendly).
    truth : SimulatedTruth
        The ground truth.

    Raises
    ------
    regvi.errors.DataError
        If an argument is invalid.
    """
    n_cells = _check_count("n_cells", n_cells)
    n_genes = _check_count("n_genes", n_genes)
    n_cell_types = _check_count("n_cell_types", n_cell_types)
    n_batches = _check_count("n_batches", n_batches)
    n_latent = _check_count("n_latent", n_latent)
    if n_cells < n_batches * n_cell_types:
        raise DataError(
            f"simulate: n_cells ({n_cells}) must be at least n_batches * n_cell_types "
            f"({n_batches} * {n_cell_types} = {n_batches * n_cell_types}) so that every cell "
            "type appears in every batch"
        )
    if isinstance(dispersion_levels, (str, bytes)) or not isinstance(dispersion_levels, Sequence):
        raise DataError(
            "simulate: dispersion_levels must be a sequence of positive numbers, "
            f"got {dispersion_levels!r}"
        )
    if len(dispersion_levels) == 0:
        raise DataError("simulate: dispersion_levels must not be empty")
    levels = [
        _check_real(f"dispersion_levels[{i}]", v, minimum=0.0, strict=True)
        for i, v in enumerate(dispersion_levels)
    ]
    ambient_fraction = _check_real("ambient_fraction", ambient_fraction, minimum=0.0)
    feature_scaling_concentration = _check_real(
        "feature_scaling_concentration",
        feature_scaling_concentration,
        minimum=0.0,
        strict=True,
        allow_inf=True,
    )
    library_log_mean = _check_real("library_log_mean", library_log_mean)
    library_log_sd = _check_real("library_log_sd", library_log_sd, minimum=0.0)
    batch_library_shift = _check_real("batch_library_shift", batch_library_shift)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"simulate: seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    extreme_log_mean = abs(library_log_mean) + abs(batch_library_shift) * (n_batches - 1) / 2
    if extreme_log_mean + 10.0 * library_log_sd > 30.0:
        raise DataError(
            "simulate: library sizes would exceed exp(30) counts; reduce library_log_mean, "
            "library_log_sd or batch_library_shift"
        )

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))

    # Batches and cell types (types balanced within every batch).
    batch = _balanced_labels(rng, n_cells, n_batches).astype(np.int64)
    cell_type = np.empty(n_cells, dtype=np.int64)
    for b in range(n_batches):
        members = np.flatnonzero(batch == b)
        cell_type[members] = _balanced_labels(rng, members.size, n_cell_types)
    dispersion_group = batch.copy()
    n_groups = n_batches

    # Latent states.
    centres = rng.normal(0.0, _TYPE_CENTRE_SD, size=(n_cell_types, n_latent))
    z = centres[cell_type] + _WITHIN_TYPE_SD * rng.standard_normal((n_cells, n_latent))

    # Random decoder.
    load_prob = min(1.0, _LOADINGS_PER_GENE / n_latent)
    weight = rng.standard_normal((n_latent, n_genes)) * (
        rng.random((n_latent, n_genes)) < load_prob
    )
    baseline = _BASELINE_SCALE * rng.lognormal(np.log(1.0 / n_genes), _BASELINE_LOG_SD, n_genes)
    bias = np.log(baseline)

    # Per-batch and per-group gene parameters, library sizes.
    ambient_noise = rng.normal(0.0, _AMBIENT_BATCH_SD, size=(n_batches, n_genes))
    if math.isinf(feature_scaling_concentration):
        feature_scaling = np.ones((n_batches, n_genes))
    else:
        feature_scaling = rng.gamma(
            feature_scaling_concentration,
            1.0 / feature_scaling_concentration,
            size=(n_batches, n_genes),
        )
    group_level = np.array([levels[d % len(levels)] for d in range(n_groups)])
    dispersion = group_level[:, None] * np.exp(
        rng.normal(0.0, _DISPERSION_GENE_SD, size=(n_groups, n_genes))
    )
    library_mean = library_log_mean + batch_library_shift * (batch - (n_batches - 1) / 2.0)
    log_library = rng.normal(library_mean, library_log_sd)

    chunk_cells = max(1, min(_MAX_CHUNK_CELLS, _TARGET_CHUNK_ELEMENTS // n_genes))
    bounds = [(lo, min(lo + chunk_cells, n_cells)) for lo in range(0, n_cells, chunk_cells)]
    workers = _worker_count(len(bounds))

    def raw_rho(lo: int, hi: int) -> np.ndarray:
        return _softplus(z[lo:hi] @ weight + bias)

    # Pass 1: mean decoder output per gene (for the normalisation and the soup).
    with ThreadPoolExecutor(max_workers=workers) as pool:
        gene_sums = list(pool.map(lambda lh: raw_rho(*lh).sum(axis=0), bounds))
    raw_mean = np.sum(gene_sums, axis=0) / n_cells
    normaliser = raw_mean.sum()
    if not np.isfinite(normaliser) or normaliser <= 0:
        raise DataError("simulate: the decoder output is degenerate; try another seed")
    soup = raw_mean / normaliser
    soup = soup / soup.sum()
    ambient = ambient_fraction * soup[None, :] * np.exp(ambient_noise)

    rho_out = np.empty((n_cells, n_genes), dtype=np.float32) if return_rho else None
    library = np.exp(log_library)

    def sample_chunk(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = bounds[index]
        chunk_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
        rho = (raw_rho(lo, hi) / normaliser).astype(np.float32)
        if rho_out is not None:
            rho_out[lo:hi] = rho
        b = batch[lo:hi]
        mu = library[lo:hi, None] * (rho + ambient[b]) * feature_scaling[b]
        theta = dispersion[dispersion_group[lo:hi]]
        counts = chunk_rng.poisson(chunk_rng.gamma(theta, mu / theta))
        rows, cols = np.nonzero(counts)
        row_nnz = np.bincount(rows, minlength=hi - lo)
        return row_nnz, cols, counts[rows, cols].astype(np.float32)

    # Pass 2: sample the counts chunk by chunk, building the CSR arrays directly.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pieces = list(pool.map(sample_chunk, range(len(bounds))))
    nnz = sum(p[1].size for p in pieces)
    index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_cells + 1, dtype=index_dtype)
    np.cumsum(np.concatenate([p[0] for p in pieces]), out=indptr[1:])
    indices = np.concatenate([p[1] for p in pieces]).astype(index_dtype, copy=False)
    data = np.concatenate([p[2] for p in pieces])
    del pieces
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))

    batch_labels = [f"batch_{b}" for b in range(n_batches)]
    type_labels = [f"type_{k}" for k in range(n_cell_types)]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, categories=batch_labels),
            "cell_type": pd.Categorical.from_codes(cell_type, categories=type_labels),
            "dispersion_group": pd.Categorical.from_codes(
                dispersion_group, categories=batch_labels
            ),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)]))
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    adata.obsm["true_z"] = z
    adata.varm["true_ambient"] = np.ascontiguousarray(ambient.T)
    adata.varm["true_feature_scaling"] = np.ascontiguousarray(feature_scaling.T)
    adata.varm["true_dispersion"] = np.ascontiguousarray(dispersion.T)
    adata.uns["simulation"] = {
        "generator": "regvi.datasets.simulate",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "n_latent": n_latent,
        "n_dispersion_groups": n_groups,
        "dispersion_levels": levels,
        "ambient_fraction": ambient_fraction,
        # JSON has no infinity; "inf" marks the y = 1 case.
        "feature_scaling_concentration": (
            "inf" if math.isinf(feature_scaling_concentration) else feature_scaling_concentration
        ),
        "library_log_mean": library_log_mean,
        "library_log_sd": library_log_sd,
        "batch_library_shift": batch_library_shift,
        "seed": seed,
        "type_centre_sd": _TYPE_CENTRE_SD,
        "within_type_sd": _WITHIN_TYPE_SD,
        "loadings_per_gene": _LOADINGS_PER_GENE,
        "baseline_log_sd": _BASELINE_LOG_SD,
        "baseline_scale": _BASELINE_SCALE,
        "ambient_batch_sd": _AMBIENT_BATCH_SD,
        "dispersion_gene_sd": _DISPERSION_GENE_SD,
    }

    truth = SimulatedTruth(
        cell_type=cell_type,
        batch=batch,
        z=z,
        rho=rho_out,
        ambient=ambient,
        feature_scaling=feature_scaling,
        dispersion=dispersion,
        dispersion_group=dispersion_group,
        log_library=log_library,
    )
    return adata, truth


def default_dataset(seed: int = 0) -> anndata.AnnData:
    """Return the embedded default dataset used by ``regvi train`` when no data is given.

    3000 cells, 1000 genes, 6 well-separated cell types, 3 batches (which are also the
    dispersion groups), simulated by :func:`simulate` with its default parameters.

    Parameters
    ----------
    seed
        Seed of the simulation.

    Returns
    -------
    anndata.AnnData
        The simulated counts with the truth stored in ``obsm``/``varm``/``uns``.
    """
    adata, _ = simulate(n_cells=3000, n_genes=1000, n_cell_types=6, n_batches=3, seed=seed)
    return adata


def simulate_multiome(
    n_cells: int = 600,
    n_genes: int = 80,
    n_peaks: int = 100,
    n_cell_types: int = 4,
    n_batches: int = 1,
    informative: Sequence[str] = ("rna", "atac"),
    n_latent: int = 8,
    rna_library_log_mean: float = 8.0,
    atac_library_log_mean: float = 7.0,
    seed: int = 0,
) -> tuple[anndata.AnnData, anndata.AnnData, dict[str, SimulatedTruth]]:
    """Simulate paired RNA + ATAC counts sharing cells, with :func:`simulate` per modality.

    Each modality is drawn from regvi's generative model by :func:`simulate` with the same
    ``seed``, cell count and batches, so both share the cell order and batch labels. A modality
    listed in ``informative`` shares the cell types (and latent states) of the others; one
    not listed is simulated with a single cell type, so its counts carry no cell-type
    structure (noise around one state). ATAC uses a lower library size and ``peak_<i>`` names.

    Returns
    -------
    rna, atac : anndata.AnnData
        Counts with ``obs`` ``batch`` and ``cell_type`` (the informative types; ``type_0``
        for every cell when neither modality is informative).
    truth : dict
        ``{"rna": SimulatedTruth, "atac": SimulatedTruth}``.
    """
    unknown = set(informative) - {"rna", "atac"}
    if unknown:
        raise DataError(f"simulate_multiome: informative must name rna and/or atac, got {unknown}")
    sizes = {"rna": (n_genes, rna_library_log_mean), "atac": (n_peaks, atac_library_log_mean)}
    out: dict[str, anndata.AnnData] = {}
    truth: dict[str, SimulatedTruth] = {}
    for name, (n_features, log_mean) in sizes.items():
        out[name], truth[name] = simulate(
            n_cells=n_cells,
            n_genes=n_features,
            n_cell_types=n_cell_types if name in informative else 1,
            n_batches=n_batches,
            n_latent=n_latent,
            library_log_mean=log_mean,
            seed=seed,
        )
    out["atac"].var_names = [f"peak_{i}" for i in range(n_peaks)]
    labels = out[informative[0]].obs["cell_type"] if informative else out["rna"].obs["cell_type"]
    for adata in out.values():
        adata.obs["cell_type"] = labels.to_numpy()
        adata.obs["cell_type"] = adata.obs["cell_type"].astype("category")
    return out["rna"], out["atac"], truth


@dataclass
class DETruth:
    """Planted truth of :func:`simulate_de`.

    Attributes
    ----------
    profiles : numpy.ndarray, shape (3, n_genes)
        Expression fractions :math:`p_{k,g}` of ``type_A``, ``type_B``, ``type_C`` (rows sum
        to 1).
    content : numpy.ndarray, shape (3,)
        RNA content :math:`c_k` of each type (:math:`\\rho_{n} = c_{k_n} p_{k_n}`).
    de_genes : numpy.ndarray of bool, shape (n_genes,)
        Genes planted DE between ``type_A`` and ``type_B``.
    ambient_only : numpy.ndarray of bool, shape (n_genes,)
        Genes of the abundant ``type_C`` only: barely expressed by A and B (equally), but
        abundant in the soup.
    log2_fold_change : numpy.ndarray, shape (n_genes,)
        :math:`\\log_2(p_{A,g}/p_{B,g})`.
    ambient : numpy.ndarray, shape (n_batches, n_genes)
        Ambient profiles :math:`s_{b,g}`.
    dispersion : numpy.ndarray, shape (n_genes,)
        Inverse dispersion :math:`\\theta_g`.
    """

    profiles: np.ndarray
    content: np.ndarray
    de_genes: np.ndarray
    ambient_only: np.ndarray
    log2_fold_change: np.ndarray
    ambient: np.ndarray
    dispersion: np.ndarray


def simulate_de(
    n_cells: int = 2000,
    n_genes: int = 200,
    n_de: int = 40,
    n_ambient_genes: int = 20,
    fold_change: float = 4.0,
    abundant_fraction: float = 0.7,
    ambient_fractions: Sequence[float] = (0.15, 0.15),
    rare_batch_bias: float = 0.5,
    rare_content: float = 0.4,
    dispersion: float = 10.0,
    library_log_mean: float = 8.0,
    library_log_sd: float = 0.3,
    seed: int = 0,
) -> tuple[anndata.AnnData, DETruth]:
    r"""Counts of three cell types with genes planted DE between two of them and ambient soup
    dominated by the third, drawn from regvi's generative model (feature scaling 1).

    .. math::
        q_g &\sim \mathrm{LogNormal}(\log(1/G), 1) \\
        p_{k,g} &\propto q_g\,f_{k,g}, \quad
            f_{A,g} = F \text{ for half of the DE genes, } f_{B,g} = F \text{ for the other
            half}, \quad f_{C,g} = 8,\ f_{A,g} = f_{B,g} = 0.01 \text{ on the ambient-only
            genes}, \quad 1 \text{ elsewhere} \\
        \rho_{n,g} &= c_{k_n}\,p_{k_n,g}, \qquad
            s_{b,g} = f_b\,\bar\rho_g\,e^{\eta_{b,g}}\Big/\textstyle\sum_{g'}
            \bar\rho_{g'},\quad \eta_{b,g}\sim\mathcal N(0, 0.2^2) \\
        \ell_n &\sim \mathcal N(\mu_l + 0.3\,(b_n - (B-1)/2), \sigma_l^2), \qquad
        \mu_{n,g} = e^{\ell_n}(\rho_{n,g} + s_{b_n,g}) \\
        x_{n,g} &\sim \mathrm{GammaPoisson}(\theta_g, \theta_g/\mu_{n,g}),\quad
        \theta_g = \theta\,e^{\xi_g},\ \xi_g \sim \mathcal N(0, 0.2^2)

    with types ``type_A`` and ``type_B`` each ``(1 - abundant_fraction) / 2`` of the cells
    and ``type_C`` the rest, :math:`\bar\rho` the mean of ρ over all cells (so the soup is
    mostly ``type_C``'s RNA), one library (batch) per entry of ``ambient_fractions``
    (:math:`f_b`, the soup's size relative to a cell's RNA), :math:`F` = ``fold_change``,
    the RNA content :math:`c_A` = ``rare_content`` and :math:`c_B = c_C = 1`. DE genes are
    drawn among the genes above the median of :math:`q`, ambient-only genes among the
    others. ``type_C`` cells are spread evenly over the libraries; a fraction
    ``rare_batch_bias`` of the ``type_A`` cells is in the first library (the soupiest by
    when it differs) and of the ``type_B`` cells in the second (the rest evenly elsewhere).

    So the ambient-only genes make up a larger share of ``type_A``'s observed counts than of
    ``type_B``'s although neither type expresses them (more of A sits in the soupy library;
    with ``rare_content < 1`` the soup is also a larger share of the small A cells' RNA): a
    method that compares observed, or batch-specific, expression calls them DE; one that
    removes the soup does not.

    Returns the AnnData (``X`` CSR counts; obs ``cell_type``, ``batch``) and the
    :class:`DETruth`.
    """
    n_cells = _check_count("n_cells", n_cells)
    n_genes = _check_count("n_genes", n_genes)
    fractions = np.asarray(ambient_fractions, dtype=float)
    n_batches = fractions.size
    if n_batches < 2 or (fractions < 0).any():
        raise DataError("simulate_de: ambient_fractions needs two or more non-negative values")
    if n_de + n_ambient_genes > n_genes or n_de < 2 or n_ambient_genes < 0:
        raise DataError(
            f"simulate_de: need 2 <= n_de and n_de + n_ambient_genes <= n_genes, got "
            f"{n_de} + {n_ambient_genes} of {n_genes}"
        )
    if not 0.0 < abundant_fraction < 1.0:
        raise DataError(
            f"simulate_de: abundant_fraction must be in (0, 1), got {abundant_fraction}"
        )
    rng = np.random.default_rng(seed)
    q = rng.lognormal(np.log(1.0 / n_genes), 1.0, n_genes)
    high = np.flatnonzero(q > np.median(q))
    low = np.flatnonzero(q <= np.median(q))
    de = rng.choice(high, n_de, replace=False)
    ambient_only = rng.choice(low, n_ambient_genes, replace=False)
    factors = np.ones((3, n_genes))
    factors[0, de[: n_de // 2]] = fold_change
    factors[1, de[n_de // 2 :]] = fold_change
    factors[2, ambient_only] = 8.0
    factors[:2, ambient_only] = 0.01
    profiles = q * factors
    profiles /= profiles.sum(axis=1, keepdims=True)
    content = np.array([rare_content, 1.0, 1.0])

    n_rare = int(round(n_cells * (1.0 - abundant_fraction) / 2.0))
    types = np.repeat([0, 1, 2], [n_rare, n_rare, n_cells - 2 * n_rare])
    types = rng.permutation(types)
    others = (1.0 - rare_batch_bias) / (n_batches - 1)
    weights = np.full((3, n_batches), others)
    weights[0, 0] = weights[1, 1] = rare_batch_bias
    weights[1, 0] = others
    weights[2] = 1.0 / n_batches
    batch = np.array([rng.choice(n_batches, p=weights[k] / weights[k].sum()) for k in types])
    rho = content[types, None] * profiles[types]
    soup = rho.mean(axis=0)
    soup /= soup.sum()
    ambient = fractions[:, None] * soup * np.exp(rng.normal(0.0, 0.2, (n_batches, n_genes)))
    shift = 0.3 * (batch - (n_batches - 1) / 2.0)
    log_library = rng.normal(library_log_mean + shift, library_log_sd)
    mu = np.exp(log_library)[:, None] * (rho + ambient[batch])
    theta = dispersion * np.exp(rng.normal(0.0, 0.2, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)

    names = np.array(["type_A", "type_B", "type_C"])
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(names[types], categories=list(names)),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)]))
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    de_mask = np.zeros(n_genes, dtype=bool)
    de_mask[de] = True
    ambient_mask = np.zeros(n_genes, dtype=bool)
    ambient_mask[ambient_only] = True
    truth = DETruth(
        profiles=profiles,
        content=content,
        de_genes=de_mask,
        ambient_only=ambient_mask,
        log2_fold_change=np.log2(profiles[0] / profiles[1]),
        ambient=ambient,
        dispersion=theta,
    )
    return adata, truth
