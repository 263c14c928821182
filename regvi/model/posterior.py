"""Posterior quantities both models offer, written once over the per-modality parts of a
module (:class:`~regvi.module.components.CountModality`): posterior predictive samples and
checks, the inferred library size, per-feature reconstruction error, per-dimension KL of the
latent and the posterior samples of expression fractions that differential expression uses.

A model class provides three hooks (see :class:`PosteriorMixin`): the names of its count
modalities, the decoding of one modality from a minibatch and its inference, and the cells'
obs. The RNA model has one modality, named ``"rna"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from regvi.data.counts import SparseCounts, as_sparse_counts
from regvi.distributions import (
    gamma_poisson_log_prob_per_feature,
    kl_normal_standard,
    sample_gamma_poisson,
)
from regvi.errors import DataError
from regvi.module.base import monte_carlo
from regvi.module.components import CountModality

#: Cells used for the posterior predictive check figure of a run (a random subset above it).
PPC_MAX_CELLS = 20_000
#: The statistics of the posterior predictive check, per (library, feature).
PPC_STATISTICS = ("mean", "variance", "zero_fraction")


@dataclass
class ModalityDecode:
    """One modality of one minibatch, decoded from a posterior draw (or mean) of z.

    ``part``: the modality's :class:`CountModality`; ``x``: its counts; ``covariates``: its
    covariate codes under the role names ``CountModality`` reads; ``rho``: the decoder output
    ρ; ``library``: the posterior of ℓ (``mean``, ``var``, the draw ``library``);
    ``measured``: cells measured in the modality ``(B,)``.
    """

    part: CountModality
    x: SparseCounts
    covariates: dict[str, torch.Tensor]
    rho: torch.Tensor
    library: dict[str, torch.Tensor]
    measured: torch.Tensor

    def rate(self) -> torch.Tensor:
        r""":math:`\mu = e^{\ell}(\rho + s)\,y`, at the library draw (or mean)."""
        return self.part.rate(self.rho, self.library["library"], self.covariates)

    def log_theta(self) -> torch.Tensor:
        """log θ per (cell, feature): a posterior draw when sampling, else the median."""
        return self.part.dispersion.log_theta(self.covariates["dispersion"])


class PosteriorMixin:
    """Shared implementations behind the models' posterior methods (each model wraps them
    with its own argument names: ``adata`` / ``mdata``, ``modality``)."""

    module: torch.nn.Module

    # ---------------------------------------------------------------- hooks
    def _count_modalities(self) -> list[str]:  # pragma: no cover
        """Names of the count modalities (``["rna"]`` for the RNA model)."""
        raise NotImplementedError

    def _features(self, modality: str) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def _decode(
        self, batch: dict[str, Any], inf: dict[str, Any], modality: str
    ) -> ModalityDecode:  # pragma: no cover
        """Modality ``modality`` of ``batch`` decoded from ``inf["z"]``."""
        raise NotImplementedError

    def _obs(self, data: Any = None) -> pd.DataFrame:  # pragma: no cover
        """obs of the cells of ``data`` (default: the model's), in the model's cell order."""
        raise NotImplementedError

    def _library_key(self) -> str | None:  # pragma: no cover
        """The obs column of the libraries (batches), or None."""
        raise NotImplementedError

    def _latent_measured(self, inf: dict[str, Any]) -> torch.Tensor | None:
        """Which latent columns of each cell are inferred from data ``(B, n_latent)``; None
        when all are (the RNA model)."""
        return None

    # ---------------------------------------------------------------- helpers
    def _modalities(self, modality: str | None) -> list[str]:
        names = self._count_modalities()
        if modality is None:
            return names
        if modality not in names:
            raise DataError(f"unknown modality {modality!r} (the model has {', '.join(names)})")
        return [modality]

    def _cell_indices(self, data: Any, indices: np.ndarray | None) -> np.ndarray:
        n = len(self._dataset(data))
        if indices is None:
            return np.arange(n)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.size != n:
                raise DataError(f"a boolean indices mask needs {n} entries, got {idx.size}")
            return np.flatnonzero(idx)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise DataError(f"indices out of range for {n} cells")
        return idx.astype(np.int64) % max(n, 1)

    # ---------------------------------------------------------------- predictive samples
    @torch.no_grad()
    def _predictive_draws(
        self,
        data: Any,
        indices: np.ndarray,
        n_samples: int,
        batch_size: int | None,
        modalities: list[str],
    ) -> Iterator[tuple[dict[str, Any], dict[str, list[ModalityDecode]], dict[str, list]]]:
        """Per minibatch: the batch, the decoded modalities of each of ``n_samples``
        posterior draws, and the counts drawn from each."""
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
            raise DataError(f"n_samples must be a positive integer, got {n_samples!r}")
        widest = max(len(self._features(m)) for m in modalities)
        with monte_carlo(self.module):
            for batch in self._iterate(data, indices, batch_size, None, widest * int(n_samples)):
                decoded: dict[str, list[ModalityDecode]] = {m: [] for m in modalities}
                draws: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
                for _ in range(int(n_samples)):
                    inf = self.module.inference(batch)
                    for m in modalities:
                        d = self._decode(batch, inf, m)
                        decoded[m].append(d)
                        draws[m].append(sample_gamma_poisson(d.rate(), d.log_theta()))
                yield batch, decoded, draws

    def _posterior_predictive_sample(
        self,
        data: Any,
        n_samples: int,
        indices: np.ndarray | None,
        batch_size: int | None,
        modality: str,
    ) -> np.ndarray:
        r"""Counts drawn from the posterior predictive distribution, cell by cell:

        .. math::
            z, \ell, w, \theta \sim q(\cdot\mid x),\qquad
            x^{rep}_{ng} \sim \mathrm{GammaPoisson}\big(\theta_{d_n g},
                \theta_{d_n g}/\mu_{ng}\big),\quad
            \mu_{ng} = e^{\ell_n}(\rho_{ng}(z_n) + s_{b_n g})\,y_{t_n g}

        one posterior draw per sample (θ drawn per (cell, feature), as in training).
        Returns float32 ``(cells, features)`` for ``n_samples=1``, else
        ``(cells, features, n_samples)`` (scvi-tools' axes; scvi-tools returns a sparse
        GCXS array, this is dense: pass ``indices`` to bound its size)."""
        idx = self._cell_indices(data, indices)
        width = len(self._features(modality))
        out = np.empty((idx.size, width, int(n_samples)), dtype=np.float32)
        row = 0
        for _, _, draws in self._predictive_draws(data, idx, n_samples, batch_size, [modality]):
            block = torch.stack(draws[modality], dim=-1).cpu().numpy()
            out[row : row + block.shape[0]] = block
            row += block.shape[0]
        return out[:, :, 0] if n_samples == 1 else out

    def posterior_predictive_check(
        self,
        data: Any = None,
        n_samples: int = 1,
        max_cells: int | None = PPC_MAX_CELLS,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> pd.DataFrame:
        r"""Observed against posterior-predictive per-feature statistics, per library.

        For each modality, library (the categories of the library key; ``"all"`` without
        one) and feature: the mean, variance and zero fraction of the observed counts over
        the library's cells, and the same statistics of counts drawn from the posterior
        predictive distribution (:meth:`posterior_predictive_sample`: z, ℓ, w and θ drawn
        from their posteriors) for the same cells, pooled over ``n_samples`` draws. Cells
        not measured in a modality are left out of its statistics. At most ``max_cells``
        cells (a random subset, ``seed``; None: all) are used.

        Returns a long table: ``modality, library, feature, statistic`` (``mean``,
        ``variance``, ``zero_fraction``), ``observed``, ``predicted``, ``n_cells``.
        """
        n = len(self._dataset(data))
        idx = np.arange(n)
        if max_cells is not None and n > max_cells:
            idx = np.sort(np.random.default_rng(seed).choice(n, int(max_cells), replace=False))
        key = self._library_key()
        if key is not None:
            labels = self._obs(data)[key].astype(str).to_numpy()
        else:
            labels = np.full(n, "all", dtype=object)
        libraries, codes = np.unique(labels[idx], return_inverse=True)
        n_lib = len(libraries)
        modalities = self._count_modalities()
        # per modality: [observed, predicted] x (n, sum x, sum x^2, zeros), float64
        acc = {
            m: np.zeros((2, 4, n_lib, len(self._features(m))), dtype=np.float64) for m in modalities
        }
        row = 0
        draws_of = self._predictive_draws(data, idx, n_samples, batch_size, modalities)
        for _, decoded, draws in draws_of:
            size = next(iter(decoded.values()))[0].rho.shape[0]
            group = torch.as_tensor(codes[row : row + size])
            row += size
            for m in modalities:
                keep = decoded[m][0].measured.cpu()
                lib = group[keep]
                observed = decoded[m][0].x.to_dense().float().cpu()[keep]
                _accumulate(acc[m][0], observed, lib, n_lib)
                for sample in draws[m]:
                    _accumulate(acc[m][1], sample.cpu()[keep], lib, n_lib)
        tables = []
        for m in modalities:
            features = np.asarray(self._features(m), dtype=object)
            stats = [_moments(acc[m][side]) for side in (0, 1)]
            cells = acc[m][0][0]  # observed cells per (library, feature)
            for s, name in enumerate(PPC_STATISTICS):
                tables.append(
                    pd.DataFrame(
                        {
                            "modality": m,
                            "library": np.repeat(libraries, len(features)),
                            "feature": np.tile(features, n_lib),
                            "statistic": name,
                            "observed": stats[0][s].ravel(),
                            "predicted": stats[1][s].ravel(),
                            "n_cells": cells.ravel().astype(np.int64),
                        }
                    )
                )
        table = pd.concat(tables, ignore_index=True)
        return table[table["n_cells"] > 0].reset_index(drop=True)

    # ---------------------------------------------------------------- library, KL, NLL
    @torch.no_grad()
    def _latent_library_size(
        self,
        data: Any,
        indices: np.ndarray | None,
        batch_size: int | None,
        modalities: list[str],
    ) -> dict[str, np.ndarray]:
        r"""Per modality, the posterior mean of the cell's library in count units:

        .. math::
            E_q\big[e^{\ell_n}\big]\,e^{\bar m}/s
                = \exp\big(m_n + \tfrac12 v_n + \bar m - \log s\big),

        with :math:`q(\ell_n) = \mathcal N(m_n, v_n)` (at the posterior-median residual
        weight w), :math:`\bar m` the centring constant of the library prior (ρ is expressed
        in units of the reference library :math:`e^{\bar m}/s`) and :math:`s` the
        modality's library sensitivity. It is comparable to the cell's observed total counts
        (which it tracks; the expected total :math:`\sum_g\mu_{ng}` also carries the
        decoder's, the ambient's and the scaling's totals)."""
        idx = self._cell_indices(data, indices)
        out: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
        for batch in self._iterate(data, idx, batch_size):
            inf = self.module.inference(batch)
            for m in modalities:
                d = self._decode(batch, inf, m)
                lib = d.part.library
                offset = lib.global_log_mean - lib.log_sensitivity
                values = torch.exp(d.library["mean"] + 0.5 * d.library["var"] + offset)
                out[m].append(values.cpu().numpy().astype(np.float64))
        return {m: np.concatenate(v) if v else np.zeros(0) for m, v in out.items()}

    @torch.no_grad()
    def _latent_kl(
        self,
        data: Any,
        indices: np.ndarray | None,
        batch_size: int | None,
        per_dimension: bool,
    ) -> np.ndarray:
        r""":math:`\mathrm{KL}(q(z_{nj}\mid x_n)\,\|\,\mathcal N(0,1)) =
        \tfrac12(v_{nj} + m_{nj}^2 - 1 - \log v_{nj})` for each cell n and latent dimension
        j. ``per_dimension=True``: its mean over cells per dimension, ``(n_latent,)`` (a
        dimension near 0 is unused: its posterior is the prior); a multimodal block is
        averaged over the cells measured in its modality. False: the per-cell total,
        ``(cells,)`` (the ``kl_z`` term of the objective)."""
        idx = self._cell_indices(data, indices)
        totals, counts, per_cell = None, None, []
        for batch in self._iterate(data, idx, batch_size):
            inf = self.module.inference(batch)
            kl = kl_normal_standard(inf["qz_mean"], inf["qz_var"]).double()
            if not per_dimension:
                per_cell.append(kl.sum(dim=-1).cpu().numpy())
                continue
            mask = self._latent_measured(inf)
            weight = torch.ones_like(kl) if mask is None else mask.double()
            s, c = (kl * weight).sum(dim=0), weight.sum(dim=0)
            totals = s if totals is None else totals + s
            counts = c if counts is None else counts + c
        if not per_dimension:
            return np.concatenate(per_cell) if per_cell else np.zeros(0)
        if totals is None:
            raise DataError("no cells to compute the latent KL on")
        return (totals / torch.clamp(counts, min=1.0)).cpu().numpy()

    @torch.no_grad()
    def _reconstruction_error(
        self,
        data: Any,
        indices: np.ndarray | None,
        batch_size: int | None,
        modalities: list[str],
        sample: bool,
        per_feature: bool,
    ) -> float | dict[str, pd.Series]:
        r"""Mean over cells of the negative log-likelihood :math:`-\log p(x_n\mid z_n,
        \ell_n, \theta)`: summed over the features of ``modalities`` (a float), or per
        feature (``per_feature=True``: per modality a Series over its features,
        :math:`\frac1N\sum_n -\log p(x_{ng}\mid\cdot)`, whose sum over features and
        modalities is the scalar). A cell not measured in a modality counts 0 there, as in
        the objective. ``sample=True``: one Monte-Carlo draw of z, ℓ, w and θ from their
        posteriors (no dropout); False: at the posterior means and the median θ."""
        widest = max(len(self._features(m)) for m in modalities)
        total, n = 0.0, 0
        sums = {m: torch.zeros(len(self._features(m)), dtype=torch.float64) for m in modalities}
        with monte_carlo(self.module, sample):
            for batch in self._iterate(data, indices, batch_size, None, widest):
                inf = self.module.inference(batch)
                size = 0
                for m in modalities:
                    d = self._decode(batch, inf, m)
                    size = d.rho.shape[0]
                    mu = d.rate()
                    if per_feature:
                        log_p = gamma_poisson_log_prob_per_feature(
                            as_sparse_counts(d.x), mu, d.log_theta(), d.measured.float()
                        )
                        sums[m] -= log_p.cpu()
                    else:
                        nll = d.part.reconstruction_loss(d.x, mu, d.covariates)
                        total += float(torch.where(d.measured, nll, 0.0).sum())
                n += size
        if not per_feature:
            return total / max(n, 1)
        return {
            m: pd.Series((s / max(n, 1)).numpy(), index=self._features(m), name="nll")
            for m, s in sums.items()
        }

    # ---------------------------------------------------------------- expression samples
    @torch.no_grad()
    def _expression_fraction_samples(
        self, data: Any, cells: np.ndarray, modalities: list[str], batch_size: int | None
    ) -> dict[str, np.ndarray]:
        r"""One posterior draw of the batch-free expression fractions per entry of ``cells``
        (cells may repeat): :math:`z \sim q(z\mid x_n)`,
        :math:`\hat\rho_{ng} = \rho_{ng}(z)/\sum_{g'}\rho_{ng'}` — the decoder output, with
        neither the ambient RNA :math:`s` nor the feature scaling :math:`y`; float32
        ``(len(cells), features)`` per modality, in the order of ``cells``."""
        order = np.argsort(cells, kind="stable")
        widest = max(len(self._features(m)) for m in modalities)
        parts: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
        with monte_carlo(self.module):
            for batch in self._iterate(data, cells[order], batch_size, None, widest):
                inf = self.module.inference(batch)
                for m in modalities:
                    rho = self._decode(batch, inf, m).rho.float()
                    fractions = rho / torch.clamp(rho.sum(dim=-1, keepdim=True), min=1e-30)
                    parts[m].append(fractions.cpu().numpy())
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        return {m: np.concatenate(v)[back] for m, v in parts.items()}

    def _count_statistics(
        self, data: Any, codes: np.ndarray, n_groups: int, modalities: list[str]
    ) -> dict[str, np.ndarray]:
        """Per modality, per group code (cells with code < 0 are skipped) and feature:
        ``(4, n_groups, features)`` sums of counts, of non-zero indicators, of counts per
        10k (``x / L * 1e4``), and the number of cells (in row 3, broadcast over features)."""
        dataset = self._dataset(data)
        out = {
            m: np.zeros((4, n_groups, len(self._features(m))), dtype=np.float64) for m in modalities
        }
        step = 4096
        cells = np.flatnonzero(codes >= 0)
        for start in range(0, cells.size, step):
            idx = cells[start : start + step]
            batch = dataset.in_order(idx)
            group = codes[idx]
            for m in modalities:
                counts = as_sparse_counts(batch.get(f"x_{m}", batch["x"]))
                rows = counts.rows.numpy()
                cols = counts.columns.numpy().astype(np.int64)
                values = counts.values.numpy().astype(np.float64)
                totals = np.bincount(rows, weights=values, minlength=idx.size)
                g = group[rows]
                target = out[m]
                np.add.at(target[0], (g, cols), values)
                np.add.at(target[1], (g, cols), (values > 0).astype(np.float64))
                scale = 1e4 / np.maximum(totals, 1.0)
                np.add.at(target[2], (g, cols), values * scale[rows])
                target[3] += np.bincount(group, minlength=n_groups)[:, None]
        return out


def _accumulate(acc: np.ndarray, values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> None:
    """Add a block's per-group count, sum, sum of squares and zero count per feature."""
    values = values.double()
    onehot = torch.zeros(values.shape[0], n_groups, dtype=torch.float64)
    onehot[torch.arange(values.shape[0]), groups.long()] = 1.0
    acc[0] += onehot.sum(dim=0).numpy()[:, None]
    acc[1] += (onehot.T @ values).numpy()
    acc[2] += (onehot.T @ values.square()).numpy()
    acc[3] += (onehot.T @ (values == 0).double()).numpy()


def _moments(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, (population) variance and zero fraction from :func:`_accumulate`'s sums."""
    n = np.maximum(acc[0], 1.0)
    mean = acc[1] / n
    variance = np.maximum(acc[2] / n - mean**2, 0.0)
    return mean, variance, acc[3] / n


class DifferentialExpressionMixin:
    """``differential_expression`` for both models, written once on the hooks of
    :class:`PosteriorMixin`."""

    def _differential_expression(
        self,
        data: Any,
        groupby: str,
        group1: str | list[str] | None,
        group2: str | None,
        modalities: list[str],
        mode: str,
        delta: float,
        fdr_target: float,
        n_samples: int,
        batch_size: int | None,
        pseudocounts: float | None,
        seed: int,
    ) -> pd.DataFrame:
        r"""Bayesian differential expression between groups of cells (scvi-tools' ``"change"``
        mode) on the model's batch-free expression.

        For a comparison of group A (``group1``) with group B (``group2``, or every other
        cell when None: one-vs-rest), ``n_samples`` cells are drawn at random (with
        replacement) from each group, and for each one z from its posterior
        :math:`q(z\mid x_n)`. The expression compared is the decoder output normalised to
        fractions, :math:`\hat\rho_{ng} = \rho_{ng}(z)/\sum_{g'}\rho_{ng'}`: the cell's
        biological expression with the ambient RNA :math:`s` and the feature scaling
        :math:`y` of :math:`\mu = e^\ell(\rho + s)y` removed, so counts that the model
        attributes to the soup of abundant cell types do not show up as expression of a
        rare one. The decoder is batch-free by default (with ``nn_conditioning``
        covariates it is read at each sampled cell's own values), so drawing cells at random
        averages over the group's libraries in proportion to their cells. The i-th samples
        of the two groups are paired, and the log fold changes, ``proba_de``, Bayes factors
        and FDR calls are those of :mod:`regvi.model.de` (pseudocounts estimated as
        scvi-tools does when None; ``delta`` the LFC threshold; ``fdr_target`` the
        posterior expected FDR).

        Also: ``raw_mean1/2`` (mean counts), ``non_zeros_proportion1/2`` (fraction of cells
        with a non-zero count), ``raw_normalized_mean1/2`` (mean counts per 10k) of each
        group, and ``comparison`` (``"A vs B"``), ``group1``, ``group2``, ``group`` (= A),
        ``modality`` (several modalities only). Rows are sorted by decreasing ``proba_de``
        within each comparison; the index holds the feature names.
        """
        from regvi.model.de import change_statistics, estimate_pseudocounts, fdr_calls

        if mode != "change":
            raise DataError(f"mode={mode!r} is not implemented; use mode='change'")
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 2:
            raise DataError(f"n_samples must be an integer of at least 2, got {n_samples!r}")
        if not 0.0 <= float(fdr_target) <= 1.0:
            raise DataError(f"fdr_target must be in [0, 1], got {fdr_target!r}")
        if float(delta) < 0:
            raise DataError(f"delta must be non-negative, got {delta!r}")
        obs = self._obs(data)
        if groupby not in obs.columns:
            shown = ", ".join(map(str, list(obs.columns)[:20]))
            raise DataError(f"groupby column {groupby!r} is not in obs (columns: {shown})")
        column = obs[groupby]
        labels = column.astype(str).to_numpy(dtype=object)
        labelled = column.notna().to_numpy()
        if isinstance(column.dtype, pd.CategoricalDtype):
            present = set(labels[labelled])
            groups = [str(c) for c in column.cat.categories if str(c) in present]
        else:
            groups = sorted(set(labels[labelled]))
        first = groups if group1 is None else ([group1] if isinstance(group1, str) else group1)
        first = [str(g) for g in first]
        for g in [*first, *([] if group2 is None else [str(group2)])]:
            if g not in groups:
                shown = ", ".join(groups[:20])
                raise DataError(f"group {g!r} is not a value of obs[{groupby!r}] ({shown})")
        if group2 is None and len(groups) < 2:
            raise DataError(f"obs[{groupby!r}] has a single group: nothing to compare it with")
        codes = np.full(labels.size, len(groups), dtype=np.int64)  # unlabelled: last code
        lookup = {g: i for i, g in enumerate(groups)}
        codes[labelled] = [lookup[v] for v in labels[labelled]]
        stats = self._count_statistics(data, codes, len(groups) + 1, modalities)
        rng = np.random.default_rng(seed)
        tables = []
        device = self.device
        fork = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            for g1 in first:
                in1 = codes == lookup[g1]
                in2 = codes == lookup[str(group2)] if group2 is not None else ~in1
                if not in2.any():
                    raise DataError(f"no cell to compare group {g1!r} with")
                cells1 = rng.choice(np.flatnonzero(in1), int(n_samples))
                cells2 = rng.choice(np.flatnonzero(in2), int(n_samples))
                draws1 = self._expression_fraction_samples(data, cells1, modalities, batch_size)
                draws2 = self._expression_fraction_samples(data, cells2, modalities, batch_size)
                name2 = "Rest" if group2 is None else str(group2)
                for m in modalities:
                    sums = stats[m]
                    raw1 = _group_means(sums, in1, codes)
                    raw2 = _group_means(sums, in2, codes)
                    offset = pseudocounts
                    if offset is None:
                        offset = estimate_pseudocounts(
                            draws1[m], draws2[m], raw1["raw_mean"] < 0.01, raw2["raw_mean"] < 0.01
                        )
                    result = change_statistics(draws1[m], draws2[m], float(delta), offset)
                    first_keys = ("proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2")
                    columns: dict[str, Any] = {k: result[k] for k in first_keys}
                    columns.update(pseudocounts=offset, delta=float(delta))
                    columns.update({k: v for k, v in result.items() if k.startswith("lfc_")})
                    for stat in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
                        columns[f"{stat}1"], columns[f"{stat}2"] = raw1[stat], raw2[stat]
                    index = pd.Index(self._features(m), name="feature")
                    table = pd.DataFrame(columns, index=index)
                    table = table.sort_values("proba_de", ascending=False, kind="stable")
                    table[f"is_de_fdr_{fdr_target}"] = fdr_calls(
                        table["proba_de"].to_numpy(), float(fdr_target)
                    )
                    table["comparison"] = f"{g1} vs {name2}"
                    table["group1"], table["group2"], table["group"] = g1, name2, g1
                    if len(self._count_modalities()) > 1:
                        table["modality"] = m
                    tables.append(table)
        return pd.concat(tables)


def _group_means(sums: np.ndarray, cells: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature raw statistics of the cells in mask ``cells`` from the per-code sums of
    :meth:`PosteriorMixin._count_statistics` (every cell of a code is in or out)."""
    members = np.unique(codes[cells])
    total = sums[:, members].sum(axis=1)
    n = max(float(total[3, 0]), 1.0)
    return {
        "raw_mean": total[0] / n,
        "non_zeros_proportion": total[1] / n,
        "raw_normalized_mean": total[2] / n,
    }
