"""Log densities and divergences used by the models — each formula written once, here.

All functions are elementwise over broadcastable tensors and differentiable. They are plain
torch (no ``torch.distributions`` objects on the hot path) so one fused expression is
evaluated per term.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from regvi import fastpath
from regvi.data.counts import SparseCounts

_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)
_LOG2_E = 1.0 / math.log(2.0)


def exp(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    r""":math:`e^{s x}` for the large elementwise exponentials of a training step.

    On the CPU it is computed as :math:`2^{x\,s\log_2 e}`, a multiply and ``torch.exp2``:
    the two passes together take less time than ``torch.exp``, whose CPU kernel is much
    slower than ``exp2``'s on the CPUs measured (see ``docs/performance.md``). Rounding
    :math:`x\log_2 e` costs accuracy in proportion to :math:`|x|`: relative error below
    :math:`10^{-6}` for :math:`|x| < 10`, :math:`4\cdot10^{-6}` over the whole float32 range
    (``torch.exp``: :math:`10^{-7}`). Elsewhere it is ``torch.exp``.
    """
    if x.device.type == "cpu":
        return torch.mul(x, scale * _LOG2_E).exp2_()
    return torch.exp(x if scale == 1.0 else x * scale)


def gamma_poisson_log_prob(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    r"""Log-probability of counts under GammaPoisson(concentration=theta, rate=theta/mu).

    This is the negative binomial with mean :math:`\mu` and inverse dispersion :math:`\theta`:

    .. math::
        \log p(x) = \log\Gamma(x+\theta) - \log\Gamma(\theta) - \log\Gamma(x+1)
                    + \theta\log\frac{\theta}{\theta+\mu} + x\log\frac{\mu}{\theta+\mu}

    Variance is :math:`\mu + \mu^2/\theta`.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


def gamma_poisson_log_prob_sparse(
    counts: SparseCounts, mu: torch.Tensor, log_theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    r"""Per-cell sum over features of :func:`gamma_poisson_log_prob`, touching the counts
    only where they are non-zero; ``(cells,)``.

    For :math:`x=0` the log-probability is :math:`\theta\log\frac{\theta}{\theta+\mu}`
    (the Gamma-function terms cancel), so the sum splits into a dense part over every
    (cell, feature) and a part over the stored entries :math:`x>0`:

    .. math::
        \sum_g \log p(x_g) = \sum_g \theta_g D_g
            + \sum_{g: x_g>0}\Big[x_g(\log\mu_g - L_g)
            + \log\Gamma(x_g+\theta_g) - \log\Gamma(\theta_g) - \log\Gamma(x_g+1)\Big],
        \quad L = \log(\theta+\mu),\ D = \log\theta - L.

    The log-Gamma terms (and the digammas of their gradients), the costliest part of the
    likelihood, are evaluated on the non-zero entries only. ``mu`` and ``log_theta`` are
    dense ``(cells, features)``; θ comes on the log scale (as it is sampled), saving a log.
    The data constant :math:`\sum_g \log\Gamma(x_g+1)` is taken from
    ``counts.row_log_factorials`` when the data set supplies it. See
    :class:`_SparseGammaPoisson` for the gradients.
    """
    log_theta = log_theta.expand_as(mu)
    return _SparseGammaPoisson.apply(
        mu,
        log_theta,
        counts.values,
        counts.flat_index,
        counts.offsets,
        eps,
        counts.row_log_factorials,
    )


def gamma_poisson_log_prob_per_feature(
    counts: SparseCounts,
    mu: torch.Tensor,
    log_theta: torch.Tensor,
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Per-feature sum over cells of :func:`gamma_poisson_log_prob`, ``(features,)`` in
    float64 (no gradient): the decomposition of :func:`gamma_poisson_log_prob_sparse` by
    feature instead of by cell, with the same split into a dense part over every
    (cell, feature) and a part over the stored entries:

    .. math::
        \sum_n w_n \log p(x_{ng}) = \sum_n w_n \theta_{ng} D_{ng}
            + \sum_{n: x_{ng}>0} w_n\Big[x_{ng}(\log\mu_{ng} - L_{ng})
            + \log\Gamma(x_{ng}+\theta_{ng}) - \log\Gamma(\theta_{ng})
            - \log\Gamma(x_{ng}+1)\Big]

    (the stored terms by :func:`stored_gamma_poisson_terms`, accurate at any θ), with cell
    weights :math:`w_n` (default 1; e.g. 0 for a cell not measured in the modality).
    """
    with torch.no_grad():
        dtype = torch.promote_types(mu.dtype, torch.float32)
        mu, log_theta = mu.to(dtype), log_theta.to(dtype).expand_as(mu)
        theta = torch.exp(log_theta)
        dense = torch.add(mu, eps).div_(theta).log1p_().mul_(theta).neg_()  # θ D
        x = counts.values.to(dtype)
        mu_x = counts.gather(mu)
        theta_x = counts.gather(theta)
        stored = stored_gamma_poisson_terms(x, mu_x, theta_x, eps) - torch.lgamma(x + 1.0)
        if weights is None:
            per_feature = dense.double().sum(dim=0)
        else:
            w = weights.to(torch.float64)
            per_feature = (dense.double() * w[:, None]).sum(dim=0)
            stored = stored.double() * w[counts.rows]
        return per_feature.index_add_(0, counts.columns.long(), stored.double())


class _SparseGammaPoisson(torch.autograd.Function):
    r"""The likelihood of :func:`gamma_poisson_log_prob_sparse` as one autograd node.

    With :math:`r = \theta/(\theta+\mu) = e^{D}` (ε dropped here) the gradients are

    .. math::
        \frac{\partial\log p}{\partial\mu} = -r + [x>0]\,x\Big(\frac1\mu
            - \frac1{\theta+\mu}\Big),\qquad
        \frac{\partial\log p}{\partial\log\theta} = \theta(D + 1 - r)
            + [x>0]\,\theta\Big(\psi(x+\theta) - \psi(\theta) - \frac{x}{\theta+\mu}\Big),

    the digamma difference by :func:`digamma_increment`. The dense part of the second is
    computed as :math:`\theta(D + 1 - r) = -(\theta E - (\mu+\epsilon)r)`: written
    :math:`\theta(E + r - 1)`, it multiplies a difference of numbers near 1 (:math:`r` and
    1, when :math:`\mu \ll \theta`) by θ, and the float32 rounding of :math:`r`,
    :math:`\approx 6\cdot10^{-8}`, became an error of :math:`6\cdot10^{-8}\theta` per
    entry, larger than the gradient itself from θ ≈ 10^4 on (the gradient of a
    near-Poisson entry is :math:`O(\mu^2/\theta)`); the two products are each
    :math:`\approx\mu`, so the error is now :math:`\approx 10^{-7}\mu` whatever θ (the
    stored entries' part has :math:`\approx 3\cdot10^{-7}x`, from
    :func:`digamma_increment`'s relative accuracy). μ is kept for it; in float32 it is the
    tensor the node that made it (:func:`~regvi.module.components.expected_counts`) keeps
    anyway. The value's log-Gamma difference is :func:`stored_gamma_poisson_terms`, accurate
    in float32 at any θ, and the per-cell totals are summed in float64.

    The forward pass keeps two cells x features buffers of its own (θ and :math:`E = -D =
    \log(1 + \mu/\theta)`; μ is its input's) and the backward writes the
    dense gradients in place and adds the stored entries' terms into them with one scatter,
    where composing the elementwise ops autograd-style makes about twenty such buffers.
    Computed in float32 at least (under autocast too); gradients come back in the inputs'
    dtypes.
    """

    @staticmethod
    def forward(
        ctx,
        mu: torch.Tensor,
        log_theta: torch.Tensor,
        x: torch.Tensor,
        flat_index: torch.Tensor,
        offsets: torch.Tensor,
        eps: float,
        row_log_factorials: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx.input_dtypes = (mu.dtype, log_theta.dtype)
        dtype = torch.promote_types(mu.dtype, torch.float32)
        mu, log_theta, x = mu.to(dtype), log_theta.to(dtype), x.to(dtype)
        theta = exp(log_theta)
        # E = log((θ + μ + ε) / θ) = -D: one log1p of a ratio, cheaper than log(θ + μ + ε)
        # and free of cancellation in log θ - L when μ << θ
        log_ratio = torch.add(mu, eps).div_(theta).log1p_()
        # a product and a row sum: einsum lowers this to a batched matmul of 1 x G by G x 1
        # blocks, much slower on CPU (docs/performance.md)
        dense = torch.linalg.vecdot(theta, log_ratio).neg_()
        # stored entries
        mu_x = mu.reshape(-1).index_select(0, flat_index)
        theta_x = exp(log_theta.reshape(-1).index_select(0, flat_index))
        stored = stored_gamma_poisson_terms(x, mu_x, theta_x, eps)
        if row_log_factorials is None:
            stored -= torch.lgamma(x + 1.0)
        ctx.save_for_backward(theta, log_ratio, mu, x, mu_x, theta_x, flat_index, offsets)
        ctx.eps = eps
        # per-cell totals in float64: with the data constant apart, the stored entries' sum
        # is of the size of the constant (thousands of nats) and they cancel
        out = torch.segment_reduce(stored.double(), "sum", offsets=offsets).add_(dense)
        if row_log_factorials is not None:
            out.sub_(row_log_factorials.double())
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        theta, log_ratio, mu, x, mu_x, theta_x, flat_index, offsets = ctx.saved_tensors
        eps = ctx.eps
        grad = grad.to(theta.dtype)
        minus_g = grad.neg()[:, None]
        r = exp(log_ratio, -1.0)  # θ / (θ + μ + ε) = e^D
        # θ (D + 1 - r) g = (θ E - (μ + ε) r) (-g)
        grad_log_theta = torch.mul(theta, log_ratio).addcmul_(mu, r, value=-1.0)
        if eps:
            grad_log_theta.sub_(r, alpha=eps)
        grad_log_theta.mul_(minus_g)
        grad_mu = r.mul_(minus_g)
        # stored entries, each cell's gradient repeated over its entries
        g_x = torch.repeat_interleave(grad, torch.diff(offsets), output_size=x.shape[0])
        x_over_sum = x / (theta_x + mu_x + eps)
        grad_mu_x = (x / (mu_x + eps) - x_over_sum).mul_(g_x)
        grad_log_theta_x = digamma_increment(x, theta_x).sub_(x_over_sum).mul_(theta_x).mul_(g_x)
        grad_mu.view(-1).scatter_add_(0, flat_index, grad_mu_x)
        grad_log_theta.view(-1).scatter_add_(0, flat_index, grad_log_theta_x)
        mu_dtype, log_theta_dtype = ctx.input_dtypes
        return (
            grad_mu.to(mu_dtype),
            grad_log_theta.to(log_theta_dtype),
            None,
            None,
            None,
            None,
            None,
        )


#: :func:`stored_gamma_poisson_terms` shifts θ up by this much before Stirling's series
_LGAMMA_SHIFT = 4.0


def stored_gamma_poisson_terms(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    r"""The terms of a stored (non-zero) count in :func:`gamma_poisson_log_prob_sparse`,
    :math:`x(\log(\mu+\epsilon) - \log(\theta+\mu+\epsilon)) + \log\Gamma(x+\theta)
    - \log\Gamma(\theta)`, accurate in float32 for every :math:`\theta > 0`.

    Two float32 ``lgamma`` calls cancel catastrophically at large θ: both are
    :math:`\approx\theta\log\theta` (:math:`1.4\cdot10^7` at :math:`\theta = 10^6`, one
    ulp 1), so the per-cell likelihood of near-Poisson genes was off by 1-90 nats at
    :math:`\theta = 10^4`-:math:`10^6` (300 genes). Written as differences instead, with
    :math:`a = \theta + 4`, :math:`b = a + x`, the recurrence
    :math:`\log\Gamma(y) = \log\Gamma(y+4) - \sum_{i<4}\log(y+i)` and Stirling's series
    from :math:`a, b \ge 4`:

    .. math::
        \log\Gamma(\theta+x) - \log\Gamma(\theta) = (a - \tfrac12)\log\Big(1 + \frac xa\Big)
            + x(\log b - 1) + S(b) - S(a)
            - \log\prod_{i=0}^{3}\Big(1 + \frac{x}{\theta+i}\Big),\qquad
        S(y) = \frac1{12y} - \frac1{360y^3} + \frac1{1260y^5} - \frac1{1680y^7}

    (truncation error below :math:`10^{-8}`); the :math:`x\log b` term is merged with the
    likelihood's :math:`-x\log(\theta+\mu+\epsilon)` into the log of a ratio, so no term
    is of the size :math:`x\log\theta`. The product, :math:`\prod(1+q_i) - 1` built up
    from :math:`q_i = x/(\theta+i)` without ever adding a small number to 1, goes to one
    ``log1p``. About as fast as the two ``lgamma`` calls it replaces on CPU.
    """
    a = theta + _LGAMMA_SHIFT
    inv_a = a.reciprocal()
    b = a + x
    inv_b = b.reciprocal()
    # x (log(μ+ε) - 1 + log(b / (θ+μ+ε))): the ratio keeps its relative precision
    out = torch.add(theta, mu).add_(eps)
    out = torch.div(b, out).log_().add_(torch.add(mu, eps).log_()).sub_(1.0).mul_(x)
    out.addcmul_(a.sub_(0.5), torch.mul(x, inv_a).log1p_())
    out.add_(_stirling_tail(inv_b)).sub_(_stirling_tail(inv_a))
    # prod_i (1 + q_i) - 1, in pairs: (1 + p)(1 + q) - 1 = p + q + pq
    q0, q1 = x / theta, x / (theta + 1.0)
    first = torch.addcmul(q0 + q1, q0, q1)
    q2, q3 = x / (theta + 2.0), x / (theta + 3.0)
    second = torch.addcmul(q2 + q3, q2, q3)
    product = torch.addcmul(first.add(second), first, second)
    return out.sub_(product.log1p_())


def _stirling_tail(inv: torch.Tensor) -> torch.Tensor:
    """:math:`S(y)` of :func:`stored_gamma_poisson_terms` from :math:`1/y` (Horner)."""
    inv_sq = inv * inv
    poly = torch.mul(inv_sq, -1.0 / 1680.0).add_(1.0 / 1260.0).mul_(inv_sq)
    return poly.sub_(1.0 / 360.0).mul_(inv_sq).add_(1.0 / 12.0).mul_(inv)


def digamma_increment(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    r""":math:`\psi(\theta + x) - \psi(\theta)` for :math:`\theta > 0,\ x \ge 0`, accurate in
    float32 for every :math:`\theta` and faster than two ``torch.digamma`` calls on CPU,
    where digamma is not vectorised (see ``docs/performance.md``).

    Written as a difference throughout, so nothing cancels when :math:`\theta \gg x` (the
    difference of two digammas loses every digit there in float32: relative error 0.8 at
    :math:`\theta = 10^6`, against :math:`3\cdot10^{-7}` here). With the recurrence
    :math:`\psi(y) = \psi(y + 6) - \sum_{i<6} 1/(y+i)`, :math:`a = \theta + 6`,
    :math:`b = a + x` and the asymptotic series of :math:`\psi` from :math:`a, b \ge 6`:

    .. math::
        \psi(\theta+x) - \psi(\theta) = \sum_{i=0}^{5}\frac{x}{(\theta+i)(\theta+x+i)}
            + \log\Big(1 + \frac{x}{a}\Big) + \frac{x}{2ab} + P(1/a) - P(1/b),
        \qquad P(w) = \frac{w^2}{12} - \frac{w^4}{120} + \frac{w^6}{252} - \frac{w^8}{240}

    (truncation error below :math:`10^{-9}`). The products in the sum are updated in place:
    :math:`(\theta+i)(\theta+x+i) = \theta(\theta+x) + i(2\theta+x) + i^2`.
    """
    step = 2.0 * theta + x
    product = (theta + x).mul_(theta)
    total = x / product
    for i in range(1, 6):
        total.addcdiv_(x, product.add_(step).add_(2 * i - 1))
    inv_a = (theta + 6.0).reciprocal_()
    inv_b = (theta + 6.0).add_(x).reciprocal_()
    total.add_(torch.mul(x, inv_a).log1p_()).addcmul_(inv_a, inv_b * x, value=0.5)
    inv_a.square_()
    inv_b.square_()
    return total.add_(_asymptotic_digamma_tail(inv_a)).sub_(_asymptotic_digamma_tail(inv_b))


def _asymptotic_digamma_tail(inv_sq: torch.Tensor) -> torch.Tensor:
    """:math:`P(w)` of :func:`digamma_increment` from :math:`w^2` (Horner, in place on a copy)."""
    poly = torch.mul(inv_sq, -1.0 / 240.0).add_(1.0 / 252.0).mul_(inv_sq)
    return poly.sub_(1.0 / 120.0).mul_(inv_sq).add_(1.0 / 12.0).mul_(inv_sq)


def gamma_log_prob(
    value: torch.Tensor, concentration: float | torch.Tensor, rate: float | torch.Tensor
) -> torch.Tensor:
    r""":math:`\log \mathrm{Gamma}(v;\alpha,\beta) = \alpha\log\beta + (\alpha-1)\log v - \beta v
    - \log\Gamma(\alpha)` (shape/rate form)."""
    if isinstance(concentration, float | int) and isinstance(rate, float | int):
        # fixed hyperparameters: the normaliser is a Python constant (fewer ops a step)
        const = concentration * math.log(rate) - math.lgamma(concentration)
        return (concentration - 1.0) * torch.log(value) - rate * value + const
    concentration = torch.as_tensor(concentration, dtype=value.dtype, device=value.device)
    rate = torch.as_tensor(rate, dtype=value.dtype, device=value.device)
    return (
        concentration * torch.log(rate)
        + (concentration - 1.0) * torch.log(value)
        - rate * value
        - torch.lgamma(concentration)
    )


def exponential_log_prob(value: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathrm{Exp}(v;\lambda) = \log\lambda - \lambda v`."""
    return torch.log(rate) - rate * value


def normal_log_prob(value: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathcal N(v;m,\sigma^2) = -\tfrac12\log(2\pi\sigma^2) - (v-m)^2/(2\sigma^2)`."""
    return -0.5 * (torch.log(2.0 * math.pi * var) + (value - mean) ** 2 / var)


def normal_entropy(log_sigma: torch.Tensor) -> torch.Tensor:
    r"""Entropy of :math:`\mathcal N(m,\sigma^2)`: :math:`\log\sigma + \tfrac12\log(2\pi e)`."""
    return log_sigma + _HALF_LOG_2PI_E


def kl_normal_normal(
    mean_q: torch.Tensor, var_q: torch.Tensor, mean_p: torch.Tensor, var_p: torch.Tensor
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(m_q,v_q)\,\|\,\mathcal N(m_p,v_p)) =
    \tfrac12[\log(v_p/v_q) + (v_q + (m_q-m_p)^2)/v_p - 1]`."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1.0)


def kl_normal_standard(mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(m,v)\,\|\,\mathcal N(0,1)) = \tfrac12(v + m^2 - 1 - \log v)`."""
    return 0.5 * (var_q + mean_q**2 - 1.0 - torch.log(var_q))


def kl_lognormal_exponential(
    mu: torch.Tensor, log_sigma: torch.Tensor, rate: float | torch.Tensor
) -> torch.Tensor:
    r"""KL(LogNormal(mu, sigma) || Exponential(rate)), in closed form.

    .. math::
        \mathrm{KL} = -H[q] - E_q[\log p] = -(\mu + \log\sigma + \tfrac12\log(2\pi e))
                      - \log r + r\,e^{\mu+\sigma^2/2}

    (:math:`H` is the LogNormal entropy, :math:`E_q[w] = e^{\mu+\sigma^2/2}`).
    """
    log_rate = math.log(rate) if isinstance(rate, float | int) else torch.log(torch.as_tensor(rate))
    entropy = mu + normal_entropy(log_sigma)
    return -entropy - log_rate + rate * torch.exp(mu + 0.5 * torch.exp(2.0 * log_sigma))


def kl_log_theta_inverse_sqrt_exponential(
    log_theta_mean: torch.Tensor,
    log_theta_log_sigma: torch.Tensor,
    rate: torch.Tensor,
    jacobian: bool = True,
) -> torch.Tensor:
    r"""The dispersion posterior's penalty against the containment prior, per (group, feature).

    Variational posterior :math:`q(\log\theta) = \mathcal N(\mu, \sigma^2)`; prior on
    :math:`u = \theta^{-1/2}`: :math:`u \sim \mathrm{Exp}(\lambda)`. In closed form, since
    :math:`E_q[\log u] = -\mu/2` and :math:`E_q[u] = E = \exp(-\mu/2 + \sigma^2/8)`:

    .. math::
        P = -H[\mathcal N(\mu,\sigma^2)] - \log\lambda + \lambda E
            \;\big[+ \log 2 + \mu/2\big]_{\text{jacobian}}

    * ``jacobian=True``: the proper KL between the two distributions of :math:`u` (the change
      of variables :math:`\log\theta = -2\log u` contributes
      :math:`\log|d\log\theta/du| = \log 2 - \log u`), so the ELBO stays a bound. The
      implied prior density of :math:`\log\theta`, :math:`\lambda u e^{-\lambda u}/2`,
      peaks at :math:`\theta = \lambda^2`; with :math:`\partial P/\partial\mu =
      \tfrac12(1 - \lambda E)` the penalty pulls :math:`\theta` to
      :math:`\lambda^2 e^{\sigma^2/4}` (≈ 9 at the default λ = 3) **from both sides**: a
      weakly informed gene above it is pushed down, towards stronger over-dispersion.
    * ``jacobian=False``: the published objective (REFERENCE 2.6), minus the entropy of the
      Normal on :math:`\log\theta` minus :math:`E_q\log\mathrm{Exp}(\theta^{-1/2};\lambda)`
      with no log-Jacobian (there a Monte-Carlo estimate, here exact). Its
      :math:`\partial P/\partial\mu = -\tfrac12\lambda E < 0` **always pushes θ up,
      towards Poisson**, ever more weakly as θ grows. The "prior" it implies on
      :math:`\log\theta`, :math:`\lambda e^{-\lambda u}`, does not normalise (it tends to
      λ as θ → ∞), so this is not a KL and the ELBO is not a bound.

    Being closed form, either adds no Monte-Carlo noise to the gradient. ``rate`` broadcasts
    against the (group, feature) tensors (shape ``(n_groups, 1)``).
    """
    sigma_sq = torch.exp(2.0 * log_theta_log_sigma)
    expected_u = torch.exp(-0.5 * log_theta_mean + sigma_sq / 8.0)
    value = -normal_entropy(log_theta_log_sigma) - torch.log(rate) + rate * expected_u
    if jacobian:
        value = value + math.log(2.0) + 0.5 * log_theta_mean
    return value


class _ClosedFormScalar(torch.autograd.Function):
    """A scalar whose gradients come with its value (see :func:`closed_form_scalar`)."""

    @staticmethod
    def forward(ctx, value_and_grads, *inputs):
        value, grads = value_and_grads(*inputs, with_grads=True)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        return None, *(grad * grad_output for grad in ctx.saved_tensors)


def closed_form_scalar(
    value_and_grads: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]],
    *inputs: torch.Tensor,
) -> torch.Tensor:
    r"""A scalar term of the loss with hand-derived gradients, as one autograd node.

    ``value_and_grads(*inputs, with_grads)`` returns the value and (when ``with_grads``) the
    gradient of the value with respect to each input. The global prior terms of a model
    (dispersion KL and hyperprior, feature-scaling and ambient priors, the library weight's
    KL) are small functions of the parameters alone, evaluated every step. Through autograd
    each is a graph of a dozen or more nodes over small tensors, forward and backward, whose
    fixed costs add up to a noticeable share of a small-batch step (measured in
    ``docs/performance.md``). In closed form the value and the gradients
    take a few elementwise passes and one node. Outside autograd (evaluation,
    ``torch.no_grad``) only the value is computed, and on the reference path
    (``REGVI_REFERENCE=1``, see :mod:`regvi.fastpath`) the value is differentiated by
    autograd, the hand-derived gradients unused.
    """
    if (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in inputs)
        and not fastpath.reference()
    ):
        return _ClosedFormScalar.apply(value_and_grads, *inputs)
    return value_and_grads(*inputs, with_grads=False)[0]


def sample_gamma_poisson(mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    r"""Counts drawn from :math:`\mathrm{GammaPoisson}(\theta, \theta/\mu)`, the negative
    binomial with mean :math:`\mu` and inverse dispersion :math:`\theta`:
    :math:`\lambda \sim \mathrm{Gamma}(\text{shape}=\theta, \text{rate}=\theta/\mu)`,
    :math:`x \sim \mathrm{Poisson}(\lambda)` (float tensor of whole numbers, μ's shape)."""
    with torch.no_grad():
        mu = torch.clamp(mu.float(), min=1e-12)
        theta = torch.exp(log_theta.float()).expand_as(mu)
        rate = torch.distributions.Gamma(theta, theta / mu).sample()
        return torch.poisson(rate)


def softplus_inverse(y: torch.Tensor, threshold: float = 20.0) -> torch.Tensor:
    r"""Inverse of softplus, :math:`x = y + \log(-\mathrm{expm1}(-y))`, identity above ``threshold``."""
    y = torch.as_tensor(y)
    safe = torch.clamp(y, max=threshold)
    return torch.where(y > threshold, y, safe + torch.log(-torch.expm1(-safe)))


__all__ = [
    "gamma_poisson_log_prob",
    "gamma_poisson_log_prob_sparse",
    "gamma_poisson_log_prob_per_feature",
    "sample_gamma_poisson",
    "stored_gamma_poisson_terms",
    "digamma_increment",
    "gamma_log_prob",
    "exponential_log_prob",
    "normal_log_prob",
    "normal_entropy",
    "kl_normal_normal",
    "kl_normal_standard",
    "kl_lognormal_exponential",
    "kl_log_theta_inverse_sqrt_exponential",
    "softplus_inverse",
    "closed_form_scalar",
]
