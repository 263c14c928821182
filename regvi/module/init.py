"""Data-dependent initialisation and library-prior statistics, computed on CSR without densifying.

Notation: :math:`L_n = \\sum_g x_{ng}` (cell totals), :math:`\\bar m` the centring constant of
the library prior (unweighted mean over groups of the mean log library), and the normalised
expression :math:`x^{norm}_{ng} = x_{ng}\\, e^{\\bar m} / \\max(L_n, 1)` — counts rescaled to
the reference library :math:`e^{\\bar m}` that :math:`\\rho` is expressed in.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from regvi.module.components import LibraryPrior


def cell_totals(X: sp.csr_matrix) -> np.ndarray:
    """Total counts per cell, float64."""
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def library_prior_stats(totals: np.ndarray, group_codes: np.ndarray, n_groups: int) -> LibraryPrior:
    """Mean and population variance of :math:`\\log L_n` per library-size group.

    Cells with zero counts are excluded (their log library is undefined; the published code
    counted them as log 1 = 0, biasing the prior mean down). A group with no cell that has
    counts falls back to the statistics of all cells.
    """
    positive = totals > 0
    if not positive.all():
        warnings.warn(
            f"{int((~positive).sum())} cell(s) have zero total counts; they are excluded from "
            "the library-size prior. Consider filtering them out.",
            stacklevel=2,
        )
    logs = np.log(np.where(positive, totals, 1.0))
    overall_mean = logs[positive].mean() if positive.any() else 0.0
    overall_var = logs[positive].var() if positive.any() else 1.0
    means = np.full(n_groups, overall_mean)
    variances = np.full(n_groups, overall_var)
    for g in range(n_groups):
        members = positive & (group_codes == g)
        if members.any():
            means[g] = logs[members].mean()
            variances[g] = logs[members].var()
    return LibraryPrior(log_means=means, log_vars=variances)


def normalised_matrix(X: sp.csr_matrix, totals: np.ndarray, reference_log_library: float):
    """:math:`x^{norm}` as CSR (row scaling only: same sparsity as ``X``)."""
    scale = np.exp(reference_log_library) / np.maximum(totals, 1.0)
    return sp.diags(scale.astype(np.float64)) @ X


def decoder_bias_init(X_norm: sp.csr_matrix, floor: float = 0.01) -> np.ndarray:
    """Head bias :math:`\\mathrm{softplus}^{-1}(\\max(\\overline{x^{norm}}_g, 0.01))`, so the
    decoder starts at each gene's mean normalised expression (identity above 20)."""
    mean = np.asarray(X_norm.mean(axis=0)).ravel()
    target = np.maximum(mean, floor)
    with np.errstate(over="ignore"):
        inv = np.where(target > 20, target, target + np.log(-np.expm1(-np.minimum(target, 20))))
    return inv.astype(np.float32)


def ambient_init(
    X_norm: sp.csr_matrix,
    ambient_codes: np.ndarray,
    n_categories: int,
    gene_fraction: float = 0.2,
    floor: float = 1e-8,
) -> np.ndarray:
    """:math:`\\beta_{c,g} = \\log\\max(0.2\\cdot\\overline{x^{norm}}_{g,c}, 10^{-8})` for every
    ambient category ``c`` (the mean over the cells of that category; empty categories get
    :math:`\\log 10^{-8}`). ``ambient_codes`` are absolute codes, shape ``(n_cells, n_keys)``.
    Shape of the result: ``(n_categories, n_genes)``."""
    out = np.full((n_categories, X_norm.shape[1]), np.log(floor), dtype=np.float64)
    for k in range(ambient_codes.shape[1]):
        codes = ambient_codes[:, k]
        indicator = sp.csr_matrix(
            (np.ones(codes.size), (codes, np.arange(codes.size))),
            shape=(n_categories, codes.size),
        )
        sums = np.asarray((indicator @ X_norm).todense())
        counts = np.bincount(codes, minlength=n_categories).astype(np.float64)
        has = counts > 0
        means = sums[has] / counts[has, None]
        out[has] = np.log(np.maximum(gene_fraction * means, floor))
    return out.astype(np.float32)
