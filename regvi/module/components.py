"""Generative components shared by every count modality (RNA genes, ATAC peaks).

Each prior's math lives in exactly one class here; the RNA and multimodal modules compose
:class:`CountModality` objects and never re-implement a prior. All "global" penalties are
returned *un-normalised*; the caller divides their sum by the training-set size N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from regvi import autograd
from regvi.data.counts import SparseCounts, as_sparse_counts
from regvi.distributions import (
    closed_form_scalar,
    gamma_log_prob,
    gamma_poisson_log_prob_sparse,
    kl_log_theta_inverse_sqrt_exponential,
    kl_lognormal_exponential,
    kl_normal_normal,
)
from regvi.module.base import Stochastic
from regvi.nn import Decoder, Encoder
from regvi.nn.layers import insert_rows

#: softplus(0) / 0.7 is 0.990: feature scaling starts at (almost exactly) one.
FEATURE_SCALING_DIVISOR = 0.7


def per_cell_rows(table: torch.Tensor, codes: torch.Tensor, combine: str) -> torch.Tensor:
    """Each cell's row of ``table`` for its category codes ``(B, n_keys)``, combined over
    keys by ``"sum"`` or ``"prod"``; ``(B, n_features)``. With one key (the usual case) the
    lookup is the result, with no extra pass over cells x features; a one-row table (a
    single category) comes back as ``(1, n_features)``, broadcasting over the cells."""
    if table.shape[0] == 1:
        return table
    if codes.shape[1] == 1:
        return F.embedding(codes[:, 0], table)
    rows = F.embedding(codes, table)
    return rows.sum(dim=1) if combine == "sum" else rows.prod(dim=1)


def rows_by_code(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Row ``codes[n]`` of ``table`` for every cell, ``(B, n_features)``: a fresh buffer
    (callers update it in place); a one-row table is expanded (a view)."""
    if table.shape[0] == 1:
        return table.expand(codes.shape[0], -1)
    return torch.index_select(table, 0, codes)


def sum_rows_by_code(values: torch.Tensor, codes: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The adjoint of :func:`rows_by_code`: the sum of the cells' rows of ``values`` per
    code, ``(n_rows, n_features)``."""
    if n_rows == 1:
        return values.sum(dim=0, keepdim=True)
    return values.new_zeros(n_rows, values.shape[1]).index_add_(0, codes, values)


def antithetic_normal_rows(
    mean: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    r"""Per-cell normal draws :math:`m_{c_n} + s_{c_n}\epsilon_n` for tables ``mean`` and
    ``scale`` ``(K, G)`` and codes ``(B,)``, with antithetic noise: the rows are paired at
    random (a fresh permutation :math:`\pi` of the rows at every call) and
    :math:`\epsilon_{\pi(h+i)} = -\epsilon_{\pi(i)}` for standard normal
    :math:`\epsilon_{\pi(i)}`, :math:`i < h = \lceil B/2\rceil` (with odd B one row is
    unpaired).

    Every entry is still :math:`\mathcal N(m, s^2)`, so a Monte-Carlo estimate using it stays
    unbiased; the pairs are antithetic variates, which lower its variance when the integrand
    is monotone in :math:`\epsilon` (the likelihood is, in :math:`\log\theta`), and only
    half the numbers are drawn (the per-(cell, feature) normal draws were the single largest
    elementwise cost of a CPU training step). The pairing is random whatever the row order:
    minibatch rows come sorted by cell index (and validation minibatches are not shuffled at
    all), so pairing by row position would always pair low-index with high-index cells.

    One autograd node (:class:`_AntitheticNormalRows`): it keeps only the drawn half of the
    noise and the permutation for the backward pass, where the op-by-op graph (two lookups,
    a negated copy of the noise, an ``addcmul``) keeps two full cells x features buffers.
    """
    return _AntitheticNormalRows.apply(mean, scale, codes)


class _AntitheticNormalRows(torch.autograd.Function):
    r"""Gradients of :func:`antithetic_normal_rows`: :math:`\partial/\partial m_k` is the sum
    of the upstream rows of the cells with code :math:`k`, :math:`\partial/\partial s_k` the
    sum of those rows times :math:`\epsilon_n`.

    The draws are made in the permuted row order, where the pairs are the first and second
    halves (contiguous slices, as cheap as pairing by position), and put back in row order
    with one gather; the backward gathers the upstream rows into the permuted order likewise.
    Gathers, not scatters: ``index_copy_`` of half the rows took longer than
    ``index_select`` of all of them on the CPU (see ``docs/performance.md``)."""

    @staticmethod
    def forward(ctx, mean, scale, codes):
        n_cells, n_features = codes.shape[0], mean.shape[1]
        half = (n_cells + 1) // 2
        order = torch.randperm(n_cells, device=codes.device)
        permuted_codes = codes[order]
        noise = torch.empty(half, n_features, dtype=scale.dtype, device=scale.device).normal_()
        scales = rows_by_code(scale, permuted_codes)
        out = rows_by_code(mean, permuted_codes)
        out = out.clone() if mean.shape[0] == 1 else out  # a fresh buffer to write into
        out[:half].addcmul_(scales[:half], noise)
        out[half:].addcmul_(scales[half:], noise[: n_cells - half], value=-1.0)
        position = torch.empty_like(order)
        position[order] = torch.arange(n_cells, device=order.device)
        ctx.save_for_backward(noise, codes, order)
        ctx.n_rows = mean.shape[0]
        return out.index_select(0, position)  # row order[i] is permuted row i

    @staticmethod
    def backward(ctx, grad):
        noise, codes, order = ctx.saved_tensors
        n_cells, half, n_rows = grad.shape[0], noise.shape[0], ctx.n_rows
        need_mean, need_scale, _ = ctx.needs_input_grad
        grad_mean = sum_rows_by_code(grad, codes, n_rows) if need_mean else None
        grad_scale = None
        if need_scale:
            paired = n_cells - half
            permuted_codes = codes[order]
            grad = grad.index_select(0, order)
            grad_scale = sum_rows_by_code(grad[:half] * noise, permuted_codes[:half], n_rows)
            grad_scale -= sum_rows_by_code(
                grad[half:] * noise[:paired], permuted_codes[half:], n_rows
            )
        return grad_mean, grad_scale, None


class AmbientBackground(nn.Module):
    r"""Additive ambient RNA :math:`s_{b,g} = \exp(\beta_{b,g})` per ambient category.

    With several ambient keys a cell's background is the sum of its categories' profiles
    (each key is a separate source of soup). Optional prior
    :math:`s_{b,g} \sim \mathrm{Gamma}(\alpha=1, \beta=100)` (off by default, as in the
    published defaults), applied as a penalty on :math:`s`.
    """

    def __init__(
        self,
        n_categories: int,
        n_features: int,
        regularise: bool = False,
        prior_alpha: float = 1.0,
        prior_beta: float = 100.0,
        init_log_ambient: np.ndarray | None = None,
    ):
        super().__init__()
        self.regularise = regularise
        self.prior_alpha, self.prior_beta = prior_alpha, prior_beta
        self.log_ambient = nn.Parameter(
            self.initial_rows(n_categories, n_features, init_log_ambient)
        )

    def initial_rows(
        self, n_categories: int, n_features: int, init_log_ambient: np.ndarray | None = None
    ) -> torch.Tensor:
        r"""Starting :math:`\beta` of ``n_categories`` categories: the data-dependent
        ``init_log_ambient`` (see :func:`regvi.module.init.ambient_init`), else the prior
        mean :math:`\log(\alpha/\beta)`, plus :math:`\mathcal N(0, 0.01^2)` noise."""
        init = (
            torch.as_tensor(init_log_ambient, dtype=torch.float32)
            if init_log_ambient is not None
            else torch.full(
                (n_categories, n_features), float(np.log(self.prior_alpha / self.prior_beta))
            )
        )
        return init + 0.01 * torch.randn(n_categories, n_features)

    def add_categories(self, position: int, init_log_ambient: np.ndarray) -> None:
        """Insert rows for new categories before row ``position``, started as at
        construction from ``init_log_ambient`` ``(n_new, G)`` (query mapping)."""
        rows = self.initial_rows(
            init_log_ambient.shape[0], self.log_ambient.shape[1], init_log_ambient
        )
        insert_rows(self, "log_ambient", position, rows)

    def profiles(self) -> torch.Tensor:
        """:math:`s = e^\beta`, one row per ambient category, ``(n_categories, G)``."""
        return torch.exp(self.log_ambient)

    def per_cell(self, codes: torch.Tensor) -> torch.Tensor:
        """Background of each cell, ``(B, G)``; ``codes`` are absolute, shape ``(B, n_keys)``."""
        return per_cell_rows(self.profiles(), codes, "sum")

    def penalty(self) -> torch.Tensor:
        r""":math:`P = -\sum_{b,g}\log\mathrm{Gamma}(s_{b,g};\alpha,\beta)` (0 when not
        regularised), with the gradient in closed form (see
        :func:`~regvi.distributions.closed_form_scalar`):
        :math:`\partial P/\partial\log s_{b,g} = \beta s_{b,g} - (\alpha - 1)`."""
        if not self.regularise:
            return self.log_ambient.new_zeros(())
        return closed_form_scalar(self._penalty_and_grads, self.log_ambient)

    def _penalty_and_grads(
        self, log_ambient: torch.Tensor, with_grads: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        profiles = torch.exp(log_ambient)
        value = -gamma_log_prob(profiles, self.prior_alpha, self.prior_beta).sum()
        if not with_grads:
            return value, ()
        return value, (profiles.mul(self.prior_beta).sub_(self.prior_alpha - 1.0),)


class FeatureScaling(nn.Module):
    r"""Multiplicative per-feature scaling :math:`y_{t,g} = \mathrm{softplus}(\gamma_{t,g})/0.7`.

    Prior :math:`y_{t,g}\sim\mathrm{Gamma}(200, 200)` (mean 1, sd 0.07), always applied.
    Without scaling covariates a single row applies to every cell. With several keys the
    cell's factor is the **product** of its categories' factors: each key is a separate
    multiplicative effect, so two keys at their prior mean still give a factor of one (the
    published code sums them, which doubles the mean; we treat that as unintended).
    """

    def __init__(
        self,
        n_categories: int,
        n_features: int,
        prior_alpha: float = 200.0,
        prior_beta: float = 200.0,
    ):
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(max(n_categories, 1), n_features))
        self.prior_alpha, self.prior_beta = prior_alpha, prior_beta

    def add_categories(self, position: int, n: int) -> None:
        r"""Insert ``n`` rows before row ``position``, started as at construction at
        :math:`\gamma = 0` (:math:`y = 0.99`, the prior mean) (query mapping)."""
        insert_rows(self, "raw", position, self.raw.new_zeros(n, self.raw.shape[1]))

    def factors(self) -> torch.Tensor:
        return F.softplus(self.raw) / FEATURE_SCALING_DIVISOR

    def per_cell(self, codes: torch.Tensor) -> torch.Tensor:
        """Scaling of each cell, ``(B, G)`` (or ``(1, G)`` without covariates)."""
        return per_cell_rows(self.factors(), codes, "prod")

    def penalty(self) -> torch.Tensor:
        r""":math:`P = -\sum_{t,g}\log\mathrm{Gamma}(y_{t,g}; \alpha, \beta)`, with the
        gradient in closed form (see :func:`~regvi.distributions.closed_form_scalar`): with
        :math:`y = \mathrm{softplus}(\gamma)/c`,
        :math:`\partial P/\partial\gamma = (\beta - (\alpha-1)/y)\,\sigma(\gamma)/c`
        (:math:`\sigma` the logistic function, the derivative of softplus)."""
        return closed_form_scalar(self._penalty_and_grads, self.raw)

    def _penalty_and_grads(
        self, raw: torch.Tensor, with_grads: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        factors = F.softplus(raw) / FEATURE_SCALING_DIVISOR
        value = -gamma_log_prob(factors, self.prior_alpha, self.prior_beta).sum()
        if not with_grads:
            return value, ()
        grad = factors.reciprocal_().mul_(1.0 - self.prior_alpha).add_(self.prior_beta)
        return value, (grad.mul_(torch.sigmoid(raw)).div_(FEATURE_SCALING_DIVISOR),)


#: Initial between-group spread τ of log θ when dispersion groups are pooled.
POOL_SCALE_INIT = 0.3


class HierarchicalDispersion(Stochastic):
    r"""Per-(group, feature) inverse dispersion :math:`\theta` with a hierarchical prior.

    Variational posterior :math:`q(\log\theta_{d,g}) = \mathcal N(\mu_{d,g}, \sigma_{d,g}^2)`.
    Prior :math:`\theta_{d,g}^{-1/2} \sim \mathrm{Exp}(\lambda_d)`, hyperprior
    :math:`\lambda_d \sim \mathrm{Gamma}(\alpha, \beta)` with
    :math:`\lambda_d = \mathrm{softplus}(r_d)` a point estimate.

    Which way the prior pushes depends on ``jacobian`` (see
    :func:`regvi.distributions.kl_log_theta_inverse_sqrt_exponential`):

    * ``True`` (default): the proper KL, with the change-of-variables term. Its implied prior
      on :math:`\log\theta` peaks at :math:`\theta = \lambda^2`, and it pulls a weakly
      informed :math:`\theta` to :math:`\lambda^2 e^{\sigma^2/4}` (≈ 9) from both sides:
      genes above it (near-Poisson ones) are pushed towards stronger over-dispersion
      (:math:`\partial P/\partial\log\theta = +0.35` at θ = 100, σ = 0.1, λ = 3).
    * ``False``: the published objective, without the log-Jacobian. It pushes θ up,
      towards Poisson, everywhere (:math:`-0.15` at θ = 100), but is not a KL: the ELBO is
      then not a bound.

    **Pooling across groups** (``pool_groups=True``, the default, with more than one group
    and the prior on): the groups share a per-feature centre, so a group with few cells
    borrows strength from the others instead of from a prior that knows nothing of the
    feature. Non-centred:

    .. math::
        \log\theta_{d,g} = c_g + \delta_{d,g},\qquad
        e^{-c_g/2} \sim \mathrm{Exp}(\lambda),\qquad
        \delta_{d,g} \sim \mathcal N(0, \tau^2),

    with :math:`q(c_g) = \mathcal N(m_g, s_g^2)`, :math:`q(\delta_{d,g}) = \mathcal N(a_{d,g},
    b_{d,g}^2)`, so :math:`q(\log\theta_{d,g}) = \mathcal N(m_g + a_{d,g}, s_g^2 +
    b_{d,g}^2)`, and one spread :math:`\tau` per modality (empirical Bayes: a point
    estimate, well determined by the :math:`D\times G` offsets; initialised at
    :data:`POOL_SCALE_INIT`). The containment prior and one rate :math:`\lambda` apply to
    the centre. Why: a default ``batch_key`` fans out to one dispersion group per library,
    often a few hundred cells each; with an independent prior per group a weakly informed
    gene's θ in every library is pulled to ≈ 9 whatever the gene, which cost held-out
    likelihood on a 24-library atlas (docs/integration.md). :math:`\tau \to \infty` gives
    independent groups, :math:`\tau \to 0` one dispersion vector; the data choose between.
    The non-centred form lets the centre learn from every group's cells at once (with
    Adam, each parameter moves at about the learning rate per step, so a centred
    :math:`\mu_{d,g}` coupled only through the prior would move each group separately).

    The hyperprior is set by its prior mean ``m`` of :math:`\theta^{-1/2}` and shape ``alpha``:
    :math:`\lambda_{init} = 1/m`, :math:`\beta = \alpha m` (defaults m=1/3, alpha=9:
    Gamma(9, 3)). Initialisation :math:`\mu = -\log m^2 + 0.1\epsilon` (θ ≈ 9),
    :math:`\log\sigma = \log 0.1` (pooled: :math:`m_g = -\log m^2`, :math:`a = 0`,
    :math:`s = b = 0.1/\sqrt2`, the same :math:`\sigma = 0.1`).

    Training draws :math:`\theta = \exp(\mu + \sigma\epsilon)` for every (cell, feature)
    (lower-variance, unbiased estimate of the expected log-likelihood), with antithetic
    pairs of randomly paired cells (see :func:`antithetic_normal_rows`); eval mode uses the
    median :math:`\exp(\mu)`, unless sampling under :func:`~regvi.module.base.monte_carlo`.
    """

    def __init__(
        self,
        n_groups: int,
        n_features: int,
        hyper_prior_mean: float = 1.0 / 3.0,
        hyper_prior_alpha: float = 9.0,
        regularise: bool = True,
        jacobian: bool = True,
        pool_groups: bool = True,
    ):
        super().__init__()
        self.hyper_prior_mean = float(hyper_prior_mean)
        # without the prior there is nothing to pool through
        self.pooled = bool(pool_groups) and regularise and n_groups > 1
        if self.pooled:
            init_mean = float(-np.log(hyper_prior_mean**2))
            half_log_sigma = float(np.log(0.1 / np.sqrt(2.0)))
            self.centre_mean = nn.Parameter(torch.full((1, n_features), init_mean))
            self.centre_log_sigma = nn.Parameter(torch.full((1, n_features), half_log_sigma))
        for name, value in self.initial_rows(n_groups, n_features).items():
            setattr(self, name, nn.Parameter(value))
        if self.pooled:
            self.log_pool_scale = nn.Parameter(torch.tensor(float(np.log(POOL_SCALE_INIT))))
        # pooled: one rate, for the centre; independent: one per group
        self.rate_raw = nn.Parameter(self.initial_rates(1 if self.pooled else n_groups))
        self.hyper_alpha = float(hyper_prior_alpha)
        self.hyper_beta = float(hyper_prior_alpha * hyper_prior_mean)
        self.regularise = regularise
        self.jacobian = bool(jacobian)

    def initial_rows(self, n_groups: int, n_features: int) -> dict[str, torch.Tensor]:
        r"""The per-group tables of ``n_groups`` groups as constructed. Pooled: offsets
        :math:`a = 0` (each group starts at the per-feature centre), :math:`b = 0.1/\sqrt2`.
        Independent: :math:`\mu = -\log m^2 + 0.1\epsilon`, :math:`\sigma = 0.1`."""
        if self.pooled:
            half_log_sigma = float(np.log(0.1 / np.sqrt(2.0)))
            return {
                "offset_mean": torch.zeros(n_groups, n_features),
                "offset_log_sigma": torch.full((n_groups, n_features), half_log_sigma),
            }
        init_mean = float(-np.log(self.hyper_prior_mean**2))
        return {
            "log_theta_mean": torch.full((n_groups, n_features), init_mean)
            + 0.1 * torch.randn(n_groups, n_features),
            "log_theta_log_sigma": torch.full((n_groups, n_features), float(np.log(0.1))),
        }

    def initial_rates(self, n: int) -> torch.Tensor:
        r"""``n`` raw rates at :math:`\lambda = \mathrm{softplus}(r) = 1/m`."""
        rate_init = 1.0 / self.hyper_prior_mean
        return torch.full((n,), float(rate_init + np.log(-np.expm1(-rate_init))))

    def add_groups(self, n: int) -> None:
        """Append ``n`` groups, started as at construction (query mapping): pooled, at the
        learned per-feature centre (offset 0) under the learned spread τ, sharing the
        centre's rate; independent, at the prior's θ ≈ 9, each with its own rate. The
        existing groups, the centre, τ and the existing rates are unchanged."""
        rows = self.initial_rows(n, self.median_log_theta().shape[1])
        if not self.pooled:
            rows["rate_raw"] = self.initial_rates(n)
        for name, value in rows.items():
            insert_rows(self, name, getattr(self, name).shape[0], value)

    def rate(self) -> torch.Tensor:
        return F.softplus(self.rate_raw)

    def median_log_theta(self) -> torch.Tensor:
        r"""The posterior mean (= median) of :math:`\log\theta`, ``(n_groups, G)``."""
        if self.pooled:
            return self.centre_mean + self.offset_mean
        return self.log_theta_mean

    def _posterior_sigma(self) -> torch.Tensor:
        if self.pooled:
            return torch.sqrt(
                torch.exp(2.0 * self.centre_log_sigma) + torch.exp(2.0 * self.offset_log_sigma)
            )
        return torch.exp(self.log_theta_log_sigma)

    def log_theta(self, group_codes: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\theta` for each cell's group, ``(B, G)``: a draw
        :math:`\mu + \sigma\epsilon` per (cell, feature) when sampling (training, or
        :func:`~regvi.module.base.monte_carlo`), the median :math:`\mu` otherwise."""
        if not self.sampling:
            # a single group is broadcast (a view), not copied per cell
            return rows_by_code(self.median_log_theta(), group_codes)
        return antithetic_normal_rows(self.median_log_theta(), self._posterior_sigma(), group_codes)

    def pool_scale(self) -> float | None:
        """The learned between-group spread τ of log θ (None without pooling)."""
        return float(self.log_pool_scale.detach().exp()) if self.pooled else None

    def penalty(self) -> torch.Tensor:
        r"""The θ posterior's penalty against the containment prior, plus
        :math:`-\log p(\lambda)`:

        .. math::
            P = \sum_{d,g}\mathrm{KL}_{d,g}
                - \sum_d\log\mathrm{Gamma}(\lambda_d;\alpha,\beta),\qquad
            \mathrm{KL}_{d,g} = -\log\sigma_{d,g} - \tfrac12\log(2\pi e)
                - \log\lambda_d + \lambda_d E_{d,g}
                + J\big[\log 2 + \tfrac12\mu_{d,g}\big]

        with :math:`E = e^{-\mu/2 + \sigma^2/8}` and :math:`J = 1` with the log-Jacobian
        (``jacobian=True``), 0 without (the published objective; see
        :func:`regvi.distributions.kl_log_theta_inverse_sqrt_exponential`). Its gradients, in
        closed form (see :func:`~regvi.distributions.closed_form_scalar`), for G features:

        .. math::
            \frac{\partial P}{\partial\mu} = \tfrac12(J - \lambda E),\qquad
            \frac{\partial P}{\partial\log\sigma} = \tfrac14\lambda E\sigma^2 - 1,\qquad
            \frac{\partial P}{\partial r_d} = \sigma(r_d)\Big[\sum_g E_{d,g}
                - \frac{G + \alpha - 1}{\lambda_d} + \beta\Big]

        (:math:`\lambda = \mathrm{softplus}(r)`, whose derivative is the logistic
        :math:`\sigma(r)`): with :math:`J = 1` the μ-gradient changes sign at
        :math:`\lambda E = 1` (θ ≈ λ²), with :math:`J = 0` it is negative everywhere.

        Pooled, this is the centre's term (:math:`\mu, \sigma \to m_g, s_g`, one rate) plus
        :math:`\sum_{d,g}\mathrm{KL}(\mathcal N(a_{d,g}, b_{d,g}^2)\,\|\,\mathcal N(0,
        \tau^2))` (autograd: a few elementwise passes over the groups).
        """
        if not self.regularise:
            return self.rate_raw.new_zeros(())
        if not self.pooled:
            return closed_form_scalar(
                self._penalty_and_grads,
                self.log_theta_mean,
                self.log_theta_log_sigma,
                self.rate_raw,
            )
        centre = closed_form_scalar(
            self._penalty_and_grads, self.centre_mean, self.centre_log_sigma, self.rate_raw
        )
        offsets = kl_normal_normal(
            self.offset_mean,
            torch.exp(2.0 * self.offset_log_sigma),
            self.offset_mean.new_zeros(()),
            torch.exp(2.0 * self.log_pool_scale),
        )
        return centre + offsets.sum()

    def _penalty_and_grads(
        self,
        mean: torch.Tensor,
        log_sigma: torch.Tensor,
        rate_raw: torch.Tensor,
        with_grads: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        rate = F.softplus(rate_raw)
        kl = kl_log_theta_inverse_sqrt_exponential(
            mean, log_sigma, rate[:, None], jacobian=self.jacobian
        ).sum()
        value = kl - gamma_log_prob(rate, self.hyper_alpha, self.hyper_beta).sum()
        if not with_grads:
            return value, ()
        # the value came from the plain formula (written once, in regvi.distributions);
        # E is recomputed here for the gradients: a few passes over G x groups numbers
        sigma_sq = torch.exp(2.0 * log_sigma)
        rate_e = torch.add(sigma_sq, mean, alpha=-4.0).mul_(0.125).exp_().mul_(rate[:, None])
        grad_mean = rate_e.mul(-0.5).add_(0.5) if self.jacobian else rate_e.mul(-0.5)
        grad_log_sigma = sigma_sq.mul_(rate_e).mul_(0.25).sub_(1.0)
        sum_e = rate_e.sum(dim=1).div_(rate)
        grad_rate = sum_e.sub_((mean.shape[1] + self.hyper_alpha - 1.0) / rate).add_(
            self.hyper_beta
        )
        return value, (grad_mean, grad_log_sigma, grad_rate.mul_(torch.sigmoid(rate_raw)))


@dataclass
class LibraryPrior:
    """Per-group statistics of the observed log library size (from the data, at setup)."""

    log_means: np.ndarray  # (n_groups,)
    log_vars: np.ndarray  # (n_groups,)


class LearnedLibrarySize(Stochastic):
    r"""Learned log library size :math:`\ell_n` with a residual encoder and per-group prior.

    Prior: :math:`p(\ell_n) = \mathcal N(m_p - \bar m + \log s,\; w_v\,v_p)` for the cell's
    library-size group :math:`p`, where :math:`m_p, v_p` are the mean and variance of the
    observed log library sizes of the group, :math:`\bar m` the unweighted mean of the
    :math:`m_p` (centring), :math:`s` the sensitivity (1 by default) and :math:`w_v = 0.5`
    the variance scaling.

    Residual encoder: with :math:`o_n = \log\max(L_n, 1) - \bar m + \log s` and a global
    weight :math:`w \sim q(w) = \mathrm{LogNormal}(\mu_w, \sigma_w)` (init 0 and
    :math:`e^{-2}`, prior :math:`\mathrm{Exp}(1)`, sampled once per minibatch),
    :math:`q(\ell_n) = \mathcal N(\log s + w(o_n - \log s) + a_n, b_n)` where
    :math:`(a_n, b_n)` come from a small encoder (16 hidden units), whose mean head starts
    at zero weights (so :math:`a_n` starts at its bias, 0, or :math:`\log s` without the
    residual). Outside training :math:`w` and :math:`\ell` are their posterior means, unless
    sampled under :func:`~regvi.module.base.monte_carlo`.

    Without the residual (``residual=False``) the encoder gives :math:`\ell_n` alone, and
    sees depth through a linear term: :math:`q(\ell_n) = \mathcal N(a_n + c\,(\log\max(L_n,
    1) - \bar m), b_n)` with a learned coefficient :math:`c` (a point estimate, no prior,
    initialised at 1). The encoder's input is depth-normalised, so without that term
    :math:`q(\ell)` could not see depth at all (the same for :math:`x` and :math:`4x`; the
    published encoders read raw ``log1p`` counts, where depth shows). A depth column in the
    encoder's first layer instead learned a slope of 0.03 in 30 epochs (its scale is
    normalised away by the LayerNorm); raw ``log1p`` input, 0.25.
    """

    def __init__(
        self,
        n_in: int,
        prior: LibraryPrior,
        n_hidden: int = 16,
        dropout_rate: float = 0.1,
        n_categories: int = 0,
        activation: str = "relu",
        log_vars_weight: float = 0.5,
        residual: bool = True,
        w_prior_rate: float = 1.0,
        log_sensitivity: float = 0.0,
        observed: bool = False,
        **layer_options,
    ):
        super().__init__()
        self.observed = observed
        self.log_vars_weight = float(log_vars_weight)
        log_means = torch.as_tensor(prior.log_means, dtype=torch.float32)
        self.register_buffer("global_log_mean", log_means.mean())
        self.register_buffer("log_sensitivity", torch.tensor(float(log_sensitivity)))
        means, variances = self.prior_rows(prior)
        self.register_buffer("prior_means", means)
        self.register_buffer("prior_vars", variances)
        self.encoder = Encoder(
            n_in, 1, n_hidden, 1, dropout_rate, n_categories, activation=activation, **layer_options
        )
        with torch.no_grad():
            # the mean head starts at its bias: a random initial weight gave every cell the
            # same random offset a of log library (e^a from 0.64 to 2.3 across seeds), so the
            # initial expected totals missed the observed ones by that factor
            self.encoder.mean_head.weight.zero_()
            self.encoder.mean_head.bias.fill_(0.0 if residual else float(log_sensitivity))
        self.residual = residual
        self.w_prior_rate = w_prior_rate
        if residual:
            self.w_mu = nn.Parameter(torch.zeros(()))
            self.w_log_sigma = nn.Parameter(torch.full((), -2.0))
        else:
            self.depth_weight = nn.Parameter(torch.ones(()))

    def prior_rows(self, prior: LibraryPrior) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The prior's mean :math:`m_p - \bar m + \log s` and variance
        :math:`\max(w_v v_p, 10^{-3})` of each group of ``prior``, centred on this module's
        :math:`\bar m` (a group with one cell, or identical libraries, has zero variance:
        floored)."""
        log_means = torch.as_tensor(prior.log_means, dtype=torch.float32)
        log_vars = torch.as_tensor(prior.log_vars, dtype=torch.float32)
        means = log_means - self.global_log_mean.cpu() + self.log_sensitivity.cpu()
        variances = torch.clamp(log_vars * self.log_vars_weight, min=1e-3)
        return means, variances

    def add_groups(self, prior: LibraryPrior) -> None:
        r"""Append the groups of ``prior`` (statistics of new data, from
        :func:`regvi.module.init.library_prior_stats`), centred like the existing ones on the
        training data's :math:`\bar m` (query mapping); nothing else changes."""
        means, variances = self.prior_rows(prior)
        insert_rows(self, "prior_means", self.prior_means.shape[0], means)
        insert_rows(self, "prior_vars", self.prior_vars.shape[0], variances)

    def forward(
        self,
        encoder_input: torch.Tensor | SparseCounts,
        observed_library: torch.Tensor,
        group_codes: torch.Tensor,
        cat_codes: torch.Tensor | None = None,
        continuous: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns ``mean``, ``var`` of q(ℓ), the sample ``library`` and per-cell ``kl``."""
        if self.observed:
            # ablation only (scVI's default): ℓ is the centred observed log library, no KL
            mean = torch.log(torch.clamp(observed_library, min=1.0)) - self.global_log_mean
            mean = mean + self.log_sensitivity
            zeros = torch.zeros_like(mean)
            return {"mean": mean, "var": zeros, "library": mean, "kl": zeros}
        a, b = self.encoder(encoder_input, cat_codes, continuous)
        a, b = a.squeeze(-1), b.squeeze(-1)
        centred = torch.log(torch.clamp(observed_library, min=1.0)) - self.global_log_mean
        if self.residual:
            w = torch.exp(self.w_mu)
            if self.sampling:
                w = torch.exp(self.w_mu + torch.exp(self.w_log_sigma) * torch.randn_like(self.w_mu))
            mean = self.log_sensitivity + w * centred + a
        else:
            mean = a + self.depth_weight * centred
        library = mean + torch.sqrt(b) * torch.randn_like(mean) if self.sampling else mean
        kl = kl_normal_normal(mean, b, self.prior_means[group_codes], self.prior_vars[group_codes])
        return {"mean": mean, "var": b, "library": library, "kl": kl}

    def penalty(self) -> torch.Tensor:
        r""":math:`P = \mathrm{KL}(q(w)\,\|\,\mathrm{Exp}(r))` for the residual weight (0
        without the residual; see :func:`regvi.distributions.kl_lognormal_exponential`), with
        its gradients in closed form (see :func:`~regvi.distributions.closed_form_scalar`):
        with :math:`M = e^{\mu_w + \sigma_w^2/2}`,
        :math:`\partial P/\partial\mu_w = rM - 1` and
        :math:`\partial P/\partial\log\sigma_w = rM\sigma_w^2 - 1`."""
        if not self.residual:
            return self.global_log_mean.new_zeros(())
        return closed_form_scalar(self._penalty_and_grads, self.w_mu, self.w_log_sigma)

    def _penalty_and_grads(
        self, mu: torch.Tensor, log_sigma: torch.Tensor, with_grads: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        value = kl_lognormal_exponential(mu, log_sigma, self.w_prior_rate)
        if not with_grads:
            return value, ()
        sigma_sq = torch.exp(2.0 * log_sigma)
        rate_mean = torch.exp(mu + 0.5 * sigma_sq) * self.w_prior_rate
        return value, (rate_mean - 1.0, rate_mean * sigma_sq - 1.0)


def expected_counts(
    rho: torch.Tensor,
    log_library: torch.Tensor,
    ambient: torch.Tensor | None = None,
    scaling: torch.Tensor | None = None,
    ambient_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The negative-binomial mean :math:`\mu_{ng} = e^{\ell_n}(\rho_{ng} + s_{ng})\,y_{ng}`.

    ``rho`` is ``(B, G)``, ``log_library`` ``(B,)``; the ambient ``s`` and scaling ``y`` rows
    are ``(B, G)`` or ``(1, G)`` (one category, broadcast over the cells), or ``None``. With
    ``ambient_codes`` ``(B,)``, ``ambient`` is instead the table of ambient profiles
    ``(K, G)`` and each cell's row is looked up inside the node (no separate cells x features
    buffer of looked-up rows). One autograd node (:class:`_ExpectedCounts`) that keeps only μ
    for the backward pass, where the op-by-op graph keeps :math:`\rho+s` and
    :math:`(\rho+s)y` too: two cells x features buffers fewer at the memory peak of a step.
    """
    if ambient is not None and ambient.shape[0] == 1:
        ambient_codes = None  # one profile: broadcast, nothing to look up
    return autograd.apply(_ExpectedCounts, rho, log_library, ambient, scaling, ambient_codes)


class _ExpectedCounts(torch.autograd.Function):
    r"""Gradients of :math:`\mu = e^{\ell}(\rho+s)y` from μ itself:

    .. math::
        \frac{\partial\mu}{\partial\ell} = \mu,\qquad
        \frac{\partial\mu}{\partial y} = \frac{\mu}{y},\qquad
        \frac{\partial\mu}{\partial\rho} = \frac{\partial\mu}{\partial s} = e^{\ell}y

    (:math:`y > 0`: a softplus). Broadcast rows get their gradients summed over the cells, a
    looked-up table per code. Computed in float32 at least (under autocast too).
    """

    @staticmethod
    def forward(rho, log_library, ambient, scaling, ambient_codes):
        dtype = torch.promote_types(rho.dtype, torch.float32)
        if ambient_codes is not None:
            mu = rows_by_code(ambient.to(dtype), ambient_codes).add_(rho.to(dtype))
        elif ambient is not None:
            mu = torch.add(rho.to(dtype), ambient.to(dtype))
        else:
            mu = rho.to(dtype, copy=True)
        if scaling is not None:
            mu.mul_(scaling.to(dtype))
        return mu.mul_(torch.exp(log_library.to(dtype))[:, None])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, log_library, ambient, scaling, ambient_codes = inputs
        saved = (
            output,
            torch.exp(log_library.to(output.dtype))[:, None],
            None if scaling is None else scaling.to(output.dtype),
        )
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)  # forward mode (torch.func.jvp, used for attribution)
        ctx.ambient_shape = None if ambient is None else ambient.shape
        ctx.ambient_codes = ambient_codes

    @staticmethod
    def jvp(ctx, tangent_rho, tangent_library, tangent_ambient, tangent_scaling, _):
        mu, library_scale, scaling = ctx.saved_tensors
        tangent = torch.zeros_like(mu)
        if tangent_rho is not None:
            tangent = tangent + tangent_rho
        if tangent_ambient is not None:
            if ctx.ambient_codes is not None:
                tangent_ambient = rows_by_code(tangent_ambient, ctx.ambient_codes)
            tangent = tangent + tangent_ambient
        tangent = tangent * library_scale
        if scaling is not None:
            tangent = tangent * scaling
        if tangent_library is not None:
            tangent = tangent + mu * tangent_library[:, None]
        if tangent_scaling is not None:
            tangent = tangent + mu / scaling * tangent_scaling
        return tangent

    @staticmethod
    def backward(ctx, grad):
        mu, library_scale, scaling = ctx.saved_tensors
        grad = grad.to(mu.dtype)
        need_rho, need_library, need_ambient, need_scaling, _ = ctx.needs_input_grad
        grad_library = grad_scaling = grad_rho = grad_ambient = None
        if need_library or need_scaling:
            grad_times_mu = grad * mu
            if need_library:
                grad_library = grad_times_mu.sum(dim=1)
            if need_scaling:
                grad_scaling = grad_times_mu.sum_to_size(scaling.shape) / scaling
        if need_rho or need_ambient:
            grad_expression = grad * library_scale
            if scaling is not None:
                grad_expression.mul_(scaling)
            grad_rho = grad_expression if need_rho else None
            if need_ambient and ctx.ambient_codes is not None:
                grad_ambient = sum_rows_by_code(
                    grad_expression, ctx.ambient_codes, ctx.ambient_shape[0]
                )
            elif need_ambient:
                grad_ambient = grad_expression.sum_to_size(ctx.ambient_shape)
        return grad_rho, grad_library, grad_ambient, grad_scaling, None


class CountModality(nn.Module):
    r"""Everything that turns a latent z into a count likelihood for one modality.

    .. math::
        \rho = \mathrm{softplus}(\mathrm{decoder}(z)),\quad
        \mu_{ng} = e^{\ell_n}\,(\rho_{ng} + s_{b_n g})\,y_{t_n g},\quad
        x_{ng} \sim \mathrm{GammaPoisson}(\theta_{d_n g}, \theta_{d_n g}/\mu_{ng})

    with the learned library :math:`\ell`, ambient :math:`s`, feature scaling :math:`y` and
    hierarchical dispersion :math:`\theta` (each switchable), plus an L2 penalty on the
    decoder weights. ``penalties()`` gives each global term, un-normalised.
    """

    def __init__(
        self,
        n_features: int,
        n_latent: int,
        library_prior: LibraryPrior,
        encoder_input_dim: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        activation: str = "relu",
        dropout_rate: float = 0.1,
        n_nn_conditioning_categories: int = 0,
        n_encoder_categories: int = 0,
        use_ambient: bool = True,
        n_ambient_categories: int = 0,
        regularise_ambient: bool = False,
        ambient_prior_alpha: float = 1.0,
        ambient_prior_beta: float = 100.0,
        use_feature_scaling: bool = True,
        n_feature_scaling_categories: int = 0,
        feature_scaling_prior_alpha: float = 200.0,
        feature_scaling_prior_beta: float = 200.0,
        n_dispersion_groups: int = 1,
        regularise_dispersion: bool = True,
        dispersion_hyper_prior_mean: float = 1.0 / 3.0,
        dispersion_hyper_prior_alpha: float = 9.0,
        dispersion_prior_jacobian: bool = True,
        dispersion_pooling: bool = True,
        library_n_hidden: int = 16,
        library_log_vars_weight: float = 0.5,
        residual_library_encoder: bool = True,
        library_w_prior_rate: float = 1.0,
        library_log_sensitivity: float = 0.0,
        decoder_weight_l2: float = 0.1,
        init_decoder_bias: np.ndarray | None = None,
        init_log_ambient: np.ndarray | None = None,
        scale_activation: str = "softplus",
        use_observed_library: bool = False,
        encoder_input: str = "normalized",
        dropout_after_activation: bool = False,
        norm: str = "layer",
        decoder_norm: str | None = None,
    ):
        super().__init__()
        if encoder_input not in ("normalized", "log1p"):
            raise ValueError(
                f"unknown encoder_input {encoder_input!r}; choose 'normalized' or 'log1p'"
            )
        self.encoder_input_transform = encoder_input
        layer_options = {"dropout_after_activation": dropout_after_activation, "norm": norm}
        self.decoder = Decoder(
            n_latent,
            n_features,
            n_hidden,
            n_layers,
            0.0,
            n_nn_conditioning_categories,
            activation,
            scale_activation=scale_activation,
            **{**layer_options, "norm": norm if decoder_norm is None else decoder_norm},
        )
        if init_decoder_bias is not None:
            with torch.no_grad():
                bias = torch.as_tensor(init_decoder_bias)
                if scale_activation == "softmax":  # the same start: logits log(mean)
                    bias = torch.log(F.softplus(bias))
                self.decoder.head.bias.copy_(bias)
        self.ambient = (
            AmbientBackground(
                n_ambient_categories,
                n_features,
                regularise_ambient,
                ambient_prior_alpha,
                ambient_prior_beta,
                init_log_ambient,
            )
            if use_ambient and n_ambient_categories > 0
            else None
        )
        self.feature_scaling = (
            FeatureScaling(
                n_feature_scaling_categories,
                n_features,
                feature_scaling_prior_alpha,
                feature_scaling_prior_beta,
            )
            if use_feature_scaling
            else None
        )
        self.dispersion = HierarchicalDispersion(
            n_dispersion_groups,
            n_features,
            dispersion_hyper_prior_mean,
            dispersion_hyper_prior_alpha,
            regularise_dispersion,
            dispersion_prior_jacobian,
            dispersion_pooling,
        )
        self.library = LearnedLibrarySize(
            encoder_input_dim,
            library_prior,
            library_n_hidden,
            dropout_rate,
            n_encoder_categories,
            activation,
            library_log_vars_weight,
            residual_library_encoder,
            library_w_prior_rate,
            library_log_sensitivity,
            observed=use_observed_library,
            **layer_options,
        )
        if scale_activation == "softmax":
            self.decoder.reference_library.copy_(torch.exp(self.library.global_log_mean))
        self.decoder_weight_l2 = decoder_weight_l2

    def encoder_input(
        self, counts: SparseCounts | torch.Tensor
    ) -> tuple[SparseCounts, torch.Tensor]:
        r"""The encoders' input :math:`\log(1 + x_{ng}\,e^{\bar m}/L_n)` and the observed
        library sizes :math:`L_n`.

        log1p of library-normalised counts, scaled to the data's typical (geometric-mean)
        library so values keep count-like magnitudes. It maps zero to zero, so it is computed
        on the stored (non-zero) entries only and stays sparse.
        """
        counts = as_sparse_counts(counts)
        observed_library = counts.row_sums()
        if self.encoder_input_transform == "log1p":  # ablation only: scVI's raw log1p
            return counts.with_values(torch.log1p(counts.values)), observed_library
        scale = torch.exp(self.library.global_log_mean) / torch.clamp(observed_library, min=1.0)
        features = counts.with_values(torch.log1p(counts.values * scale[counts.rows]))
        return features, observed_library

    def rate(
        self,
        rho: torch.Tensor,
        library: torch.Tensor,
        batch: dict[str, torch.Tensor],
        include_ambient: bool = True,
        include_scaling: bool = True,
    ) -> torch.Tensor:
        r""":math:`\mu = e^{\ell}(\rho + s)\,y` (ambient and scaling optional), see
        :func:`expected_counts`."""
        ambient = ambient_codes = None
        if include_ambient and self.ambient is not None:
            codes = batch["ambient"]
            if codes.shape[1] == 1:  # one key: the lookup happens inside the node
                ambient, ambient_codes = self.ambient.profiles(), codes[:, 0]
            else:
                ambient = self.ambient.per_cell(codes)
        scaling = (
            self.feature_scaling.per_cell(batch["feature_scaling"])
            if include_scaling and self.feature_scaling is not None
            else None
        )
        return expected_counts(rho, library, ambient, scaling, ambient_codes)

    def reconstruction_loss(
        self, x: SparseCounts | torch.Tensor, mu: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Negative log-likelihood per cell, summed over features (θ drawn per (cell, feature)
        in training, see :class:`HierarchicalDispersion`)."""
        log_theta = self.dispersion.log_theta(batch["dispersion"])
        return -gamma_poisson_log_prob_sparse(as_sparse_counts(x), mu, log_theta)

    def penalties(self) -> dict[str, torch.Tensor]:
        """Global (non-local) terms, un-normalised: each enters the loss divided by N."""
        terms = {
            "dispersion_penalty": self.dispersion.penalty(),
            "library_w_kl": self.library.penalty(),
            "decoder_l2": self.decoder_weight_l2 * self.decoder.weight_l2(),
        }
        if self.ambient is not None:
            terms["ambient_penalty"] = self.ambient.penalty()
        if self.feature_scaling is not None:
            terms["feature_scaling_penalty"] = self.feature_scaling.penalty()
        return terms
