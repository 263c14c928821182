r"""The arithmetic of differential expression in scvi-tools' ``"change"`` mode, on posterior
samples of expression fractions (NumPy only; the sampling is
``DifferentialExpressionMixin._differential_expression`` in
:mod:`regvi.model.posterior`).

Given :math:`S` paired samples :math:`\hat\rho^{(1)}_{sg}, \hat\rho^{(2)}_{sg}` of the
expression fractions of two groups of cells (a random cell of each group, z drawn from its
posterior), the log fold change samples are

.. math::
    r_{sg} = \log_2(\hat\rho^{(1)}_{sg} + \epsilon) - \log_2(\hat\rho^{(2)}_{sg} + \epsilon)

with the pseudocount :math:`\epsilon` (:func:`estimate_pseudocounts`), and for a threshold
:math:`\delta`

.. math::
    P(\mathrm{DE}_g) = \max\Big(\tfrac1S\sum_s [r_{sg} \ge \delta],\;
        \tfrac1S\sum_s [r_{sg} < -\delta]\Big),\qquad
    \mathrm{BF}_g = \log\frac{P(\mathrm{DE}_g) + 10^{-8}}{1 - P(\mathrm{DE}_g) + 10^{-8}}

(scvi-tools' ``test_mode="three"``). The LFC summaries (mean, median, std, min, max) use the
pseudocount :math:`10^{-3}\epsilon`, as scvi-tools does. Features are called DE at a target
FDR :math:`\alpha` by the posterior expected FDR (:func:`fdr_calls`).
"""

from __future__ import annotations

import numpy as np

#: Added to probabilities in the log Bayes factor (scvi-tools' value).
BAYES_FACTOR_EPS = 1e-8


def estimate_pseudocounts(
    scales1: np.ndarray,
    scales2: np.ndarray,
    unexpressed1: np.ndarray,
    unexpressed2: np.ndarray,
    quantile: float = 0.9,
) -> float:
    r"""scvi-tools' pseudocount offset, which shrinks the LFCs of features a group does not
    express towards 0: for each group, the ``quantile`` of :math:`\max_s \hat\rho_{sg}` over
    the features the group does not express (mean raw count below 0.01; :math:`10^{-10}`
    when there is none), the larger of the two, divided by the number of features and
    floored at :math:`10^{-10}`."""

    def offset(scales: np.ndarray, unexpressed: np.ndarray) -> float:
        if not unexpressed.any():
            return 1e-10
        return float(np.quantile(scales.max(axis=0)[unexpressed], quantile))

    value = max(offset(scales1, unexpressed1), offset(scales2, unexpressed2))
    return float(max(1e-10, value / scales1.shape[1]))


def change_statistics(
    scales1: np.ndarray, scales2: np.ndarray, delta: float, pseudocounts: float
) -> dict[str, np.ndarray]:
    """``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``, ``scale2`` (mean
    fractions) and ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max`` from
    paired samples ``(S, features)`` of the two groups (module docstring)."""
    change = np.log2(scales1 + pseudocounts) - np.log2(scales2 + pseudocounts)
    up = (change >= delta).mean(axis=0)
    down = (change < -delta).mean(axis=0)
    proba = np.maximum(up, down)
    summary = np.log2(scales1 + 1e-3 * pseudocounts) - np.log2(scales2 + 1e-3 * pseudocounts)
    return {
        "proba_de": proba,
        "proba_not_de": 1.0 - proba,
        "bayes_factor": np.log(proba + BAYES_FACTOR_EPS) - np.log(1.0 - proba + BAYES_FACTOR_EPS),
        "scale1": scales1.mean(axis=0),
        "scale2": scales2.mean(axis=0),
        "lfc_mean": summary.mean(axis=0),
        "lfc_median": np.median(summary, axis=0),
        "lfc_std": summary.std(axis=0),
        "lfc_min": summary.min(axis=0),
        "lfc_max": summary.max(axis=0),
    }


def fdr_calls(proba_de: np.ndarray, fdr: float) -> np.ndarray:
    r"""Features called DE at posterior expected FDR ``fdr``: sorted by decreasing
    :math:`p_g = P(\mathrm{DE}_g)`, the largest :math:`k` with
    :math:`\frac1k\sum_{i\le k}(1 - p_{(i)}) \le` ``fdr`` are called (scvi-tools'
    ``_fdr_de_prediction``). Returns a boolean mask in the input order."""
    proba = np.asarray(proba_de, dtype=float)
    order = np.argsort(-proba, kind="stable")
    expected_fdr = np.cumsum(1.0 - proba[order]) / np.arange(1, proba.size + 1)
    called = np.zeros(proba.size, dtype=bool)
    called[order[: int((expected_fdr <= fdr).sum())]] = True
    return called
