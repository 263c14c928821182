"""Each formula against an independent reference (scipy / torch.distributions / Monte Carlo)."""

import numpy as np
import pytest
import scipy.stats as st
import torch
from scipy import special

from regvi import distributions as D


def test_gamma_poisson_matches_scipy_negative_binomial():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=500).astype(np.float64)
    mu = rng.lognormal(1.0, 1.5, size=500)
    theta = rng.lognormal(0.0, 1.5, size=500)
    ours = D.gamma_poisson_log_prob(
        torch.tensor(x), torch.tensor(mu), torch.tensor(theta), eps=0.0
    ).numpy()
    # scipy: nbinom(n, p) counts failures before n successes; mean n(1-p)/p = mu.
    reference = st.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(ours, reference, rtol=1e-8, atol=1e-8)


def test_gamma_log_prob_matches_scipy():
    v = np.linspace(0.05, 5, 50)
    ours = D.gamma_log_prob(torch.tensor(v), 200.0, 200.0).numpy()
    np.testing.assert_allclose(ours, st.gamma(a=200.0, scale=1 / 200.0).logpdf(v), rtol=1e-9)
    ours = D.gamma_log_prob(torch.tensor(v), 1.0, 100.0).numpy()
    np.testing.assert_allclose(ours, st.gamma(a=1.0, scale=1 / 100.0).logpdf(v), rtol=1e-9)


def test_exponential_and_normal_match_scipy():
    v = torch.linspace(0.01, 4, 30, dtype=torch.float64)
    rate = torch.tensor(3.0, dtype=torch.float64)
    np.testing.assert_allclose(
        D.exponential_log_prob(v, rate).numpy(), st.expon(scale=1 / 3.0).logpdf(v.numpy())
    )
    mean, var = torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    np.testing.assert_allclose(
        D.normal_log_prob(v, mean, var).numpy(),
        st.norm(0.3, np.sqrt(2.0)).logpdf(v.numpy()),
    )


def test_normal_kls_match_torch_distributions():
    mq, vq = torch.tensor([0.1, -2.0]), torch.tensor([0.5, 3.0])
    mp, vp = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.2])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, vq.sqrt()), torch.distributions.Normal(mp, vp.sqrt())
    )
    torch.testing.assert_close(D.kl_normal_normal(mq, vq, mp, vp), ref)
    ref0 = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, vq.sqrt()), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(D.kl_normal_standard(mq, vq), ref0)


def test_lognormal_exponential_kl_matches_monte_carlo():
    mu, log_sigma, rate = 0.2, np.log(0.3), 1.5
    w = st.lognorm(s=np.exp(log_sigma), scale=np.exp(mu)).rvs(400_000, random_state=1)
    mc = np.mean(
        st.lognorm(s=np.exp(log_sigma), scale=np.exp(mu)).logpdf(w)
        - st.expon(scale=1 / rate).logpdf(w)
    )
    ours = D.kl_lognormal_exponential(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(log_sigma, dtype=torch.float64), rate
    ).item()
    assert ours == pytest.approx(mc, abs=5e-3)


@pytest.mark.parametrize("mu,sigma,rate", [(np.log(9.0), 0.1, 3.0), (0.5, 0.6, 1.2)])
def test_dispersion_kl_matches_monte_carlo_in_u_space(mu, sigma, rate):
    # u = theta^-1/2 with log theta ~ N(mu, sigma^2)  =>  u ~ LogNormal(-mu/2, sigma/2).
    q_u = st.lognorm(s=sigma / 2, scale=np.exp(-mu / 2))
    u = q_u.rvs(400_000, random_state=2)
    mc = np.mean(q_u.logpdf(u) - st.expon(scale=1 / rate).logpdf(u))
    ours = D.kl_log_theta_inverse_sqrt_exponential(
        torch.tensor(mu, dtype=torch.float64),
        torch.tensor(np.log(sigma), dtype=torch.float64),
        torch.tensor(rate, dtype=torch.float64),
    ).item()
    assert ours == pytest.approx(mc, abs=5e-3)


@pytest.mark.parametrize("mu,sigma,rate", [(np.log(9.0), 0.1, 3.0), (0.5, 0.6, 1.2)])
def test_dispersion_penalty_without_jacobian_is_the_published_objective(mu, sigma, rate):
    # minus the entropy of N(mu, sigma^2) on log theta, minus E_q log Exp(theta^-1/2; rate),
    # by Monte Carlo on log theta (REFERENCE 2.6: no log-Jacobian term)
    log_theta = st.norm(mu, sigma).rvs(400_000, random_state=3)
    mc = -st.norm(mu, sigma).entropy() - np.mean(
        st.expon(scale=1 / rate).logpdf(np.exp(-0.5 * log_theta))
    )
    ours = D.kl_log_theta_inverse_sqrt_exponential(
        torch.tensor(mu, dtype=torch.float64),
        torch.tensor(np.log(sigma), dtype=torch.float64),
        torch.tensor(rate, dtype=torch.float64),
        jacobian=False,
    ).item()
    assert ours == pytest.approx(mc, abs=5e-3)


def test_softplus_inverse_roundtrip():
    y = torch.tensor([1e-4, 0.01, 1.0, 5.0, 19.9, 25.0, 1e3], dtype=torch.float64)
    torch.testing.assert_close(torch.nn.functional.softplus(D.softplus_inverse(y)), y)


def test_digamma_increment_matches_scipy_and_stays_accurate_in_float32():
    theta = np.tile(np.logspace(-3, 6, 400), 4)
    x = np.repeat([1.0, 2.0, 37.0, 5000.0], 400)
    expected = special.digamma(theta + x) - special.digamma(theta)
    got64 = D.digamma_increment(torch.tensor(x), torch.tensor(theta)).numpy()
    np.testing.assert_allclose(got64, expected, rtol=1e-8)
    # float32: no cancellation at theta >> x, where two digamma calls lose every digit
    got32 = D.digamma_increment(
        torch.tensor(x, dtype=torch.float32), torch.tensor(theta, dtype=torch.float32)
    )
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=2e-6)
    # x = 1 is exactly 1/theta
    np.testing.assert_allclose(got64[:400], 1.0 / theta[:400], rtol=1e-9)


def test_stored_gamma_poisson_terms_are_accurate_in_float32_for_every_theta():
    """x(log μ - log(θ+μ)) + lgamma(x+θ) - lgamma(θ) against float64 scipy over θ from 1e-3
    to 1e7, counts 1 to 1e5 and means 1e-3 to 1e5, to float32 rounding of the numbers
    involved (two float32 lgammas are off by up to 0.1 of them, e.g. 12.5 nats for one
    entry at θ = 1e7, x = 30)."""
    from scipy.special import gammaln

    theta, x, mu = (
        a.ravel()
        for a in np.meshgrid(
            [1e-3, 0.1, 1.0, 5.0, 100.0, 1e4, 1e7],
            [1.0, 2.0, 5.0, 30.0, 1e3, 1e5],
            [1e-3, 1.0, 100.0, 1e5],
            indexing="ij",
        )
    )
    exact = x * (np.log(mu + 1e-8) - np.log(theta + mu + 1e-8)) + gammaln(x + theta)
    exact -= gammaln(theta)
    scale = x * np.abs(np.log(mu + 1e-8)).clip(1.0) + gammaln(x + 1.0) + 1.0
    args = (torch.tensor(x), torch.tensor(mu), torch.tensor(theta))
    got = D.stored_gamma_poisson_terms(*(a.float() for a in args)).double().numpy()
    assert (np.abs(got - exact) / scale).max() < 1e-6
    got64 = D.stored_gamma_poisson_terms(*args).numpy()
    assert (np.abs(got64 - exact) / scale).max() < 1e-7
