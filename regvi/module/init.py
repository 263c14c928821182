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

from regvi.data.io import row_chunks
from regvi.module.components import LibraryPrior


def cell_totals(X) -> np.ndarray:
    """Total counts per cell, float64 (one chunked pass for an on-disk matrix)."""
    if sp.issparse(X):
        return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    return np.concatenate(
        [np.asarray(c.sum(axis=1), dtype=np.float64).ravel() for _, _, c in row_chunks(X)]
    )


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


def normalised_sums(
    X,
    totals: np.ndarray,
    reference_log_library: float,
    category_codes: np.ndarray | None = None,
    n_categories: int = 0,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One chunked pass: per-gene sums of :math:`x^{norm}` over all cells and, given absolute
    ``category_codes`` (n_cells, n_keys), per (category, gene). Returns
    ``(gene_sums, category_sums, category_counts)``."""
    gene_sums = np.zeros(X.shape[1])
    cat_sums = np.zeros((n_categories, X.shape[1])) if category_codes is not None else None
    for start, stop, chunk in row_chunks(X):
        normed = normalised_matrix(chunk, totals[start:stop], reference_log_library)
        gene_sums += np.asarray(normed.sum(axis=0)).ravel()
        if cat_sums is not None:
            for k in range(category_codes.shape[1]):
                codes = category_codes[start:stop, k]
                indicator = sp.csr_matrix(
                    (np.ones(codes.size), (codes, np.arange(codes.size))),
                    shape=(n_categories, codes.size),
                )
                cat_sums += np.asarray((indicator @ normed).todense())
    counts = None
    if category_codes is not None:
        counts = np.zeros(n_categories)
        for k in range(category_codes.shape[1]):
            counts += np.bincount(category_codes[:, k], minlength=n_categories)
    return gene_sums, cat_sums, counts


def decoder_bias_init(gene_means: np.ndarray, floor: float = 0.01) -> np.ndarray:
    r"""Head bias :math:`\mathrm{softplus}^{-1}(\max(\overline{x^{norm}}_g, 0.01))`, so the
    decoder starts at each gene's mean normalised expression (identity above 20)."""
    target = np.maximum(gene_means, floor)
    with np.errstate(over="ignore"):
        inv = np.where(target > 20, target, target + np.log(-np.expm1(-np.minimum(target, 20))))
    return inv.astype(np.float32)


def ambient_init(
    category_sums: np.ndarray,
    category_counts: np.ndarray,
    gene_fraction: float = 0.2,
    floor: float = 1e-8,
) -> np.ndarray:
    r""":math:`\beta_{c,g} = \log\max(0.2\cdot\overline{x^{norm}}_{g,c}, 10^{-8})` for every
    ambient category ``c`` (the mean over the cells of that category; empty categories get
    :math:`\log 10^{-8}`). Inputs from :func:`normalised_sums`; result
    ``(n_categories, n_genes)``."""
    out = np.full(category_sums.shape, np.log(floor), dtype=np.float64)
    has = category_counts > 0
    means = category_sums[has] / category_counts[has, None]
    out[has] = np.log(np.maximum(gene_fraction * means, floor))
    return out.astype(np.float32)


def data_dependent_init(
    X,
    totals: np.ndarray,
    reference_log_library: float,
    ambient_codes: np.ndarray | None = None,
    n_ambient_categories: int = 0,
    ambient_gene_fraction: float = 0.2,
    log_sensitivity: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Decoder head bias and (if ``ambient_codes`` is given) log ambient, from one pass,
    such that a cell's initial expected total :math:`\sum_g\mu_{ng}` is its observed
    total :math:`L_n`.

    * Sensitivity :math:`s`: the library prior and encoder are centred at
      :math:`\log s`, so :math:`e^{\ell_n}` starts at :math:`s L_n e^{-\bar m}`; ρ and the
      ambient are therefore set in units of :math:`e^{\bar m}/s` (the published
      :math:`x^{norm} = x\,(\bar L/s)/L`), not :math:`e^{\bar m}`, which made the initial
      expected totals :math:`s` times the observed ones (0.2x for ATAC at s = 0.2).
    * Ambient keys: a cell's background is the sum of its keys' profiles (see
      :class:`~regvi.module.components.AmbientBackground`), so with ``k`` keys each profile
      starts at ``ambient_gene_fraction / k`` of its category's mean, and the per-cell sum
      at ``ambient_gene_fraction`` of the mean whatever ``k``.
    * The decoder then starts at the rest, ``1 - ambient_gene_fraction`` of each gene's mean
      (floored, see :func:`decoder_bias_init`): ρ and the ambient share the mean instead of
      both counting it (1.2x the observed totals).
    """
    use_ambient = ambient_codes is not None and n_ambient_categories > 0
    n_keys = ambient_codes.shape[1] if use_ambient and ambient_codes.ndim == 2 else 1
    gene_sums, cat_sums, counts = normalised_sums(
        X,
        totals,
        reference_log_library - log_sensitivity,
        ambient_codes if use_ambient else None,
        n_ambient_categories,
    )
    decoder_share = 1.0 - ambient_gene_fraction if use_ambient else 1.0
    bias = decoder_bias_init(decoder_share * gene_sums / max(X.shape[0], 1))
    ambient = (
        ambient_init(cat_sums, counts, ambient_gene_fraction / max(n_keys, 1))
        if use_ambient
        else None
    )
    return bias, ambient
