"""Structure and scaling of the model's parts."""

import numpy as np
import pytest
import torch
from torch import nn

from regvi.module import FeatureScaling, LibraryPrior, RegularizedVAE
from regvi.module.components import FEATURE_SCALING_DIVISOR, AmbientBackground
from regvi.nn import FCLayers


def make_module(n_genes=30, n_groups=2, **kw):
    prior = LibraryPrior(np.array([7.0, 7.5]), np.array([0.2, 0.3]))
    return RegularizedVAE(
        n_genes,
        prior,
        n_latent=4,
        n_hidden=16,
        n_ambient_categories=n_groups,
        n_feature_scaling_categories=0,
        n_dispersion_groups=n_groups,
        **kw,
    )


def make_batch(n_cells, n_genes=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 2, (n_cells,), generator=g)
    return {
        "x": torch.poisson(torch.full((n_cells, n_genes), 5.0), generator=g),
        "ambient": groups[:, None],
        "feature_scaling": torch.zeros(n_cells, 0, dtype=torch.long),
        "nn_conditioning": torch.zeros(n_cells, 0, dtype=torch.long),
        "encoder": torch.zeros(n_cells, 0, dtype=torch.long),
        "dispersion": groups,
        "library_size": groups,
        "continuous": torch.zeros(n_cells, 0),
    }


def test_global_penalty_scales_as_one_over_n_and_ignores_minibatch_size():
    torch.manual_seed(0)
    module = make_module(regularise_ambient=True)
    module.train()
    n = 10_000
    small = module.loss(make_batch(16), n_obs=n).terms["global_penalty"]
    large = module.loss(make_batch(64, seed=1), n_obs=n).terms["global_penalty"]
    doubled = module.loss(make_batch(16), n_obs=2 * n).terms["global_penalty"]
    assert small.item() != 0
    torch.testing.assert_close(small, large)  # B does not enter the global terms
    torch.testing.assert_close(doubled, small / 2)  # 1/N
    # and the parts add up to the total
    out = module.loss(make_batch(16), n_obs=n)
    parts = sum(v for k, v in out.terms.items() if k.endswith(("_penalty", "_kl", "_l2")))
    torch.testing.assert_close(parts - out.terms["global_penalty"], out.terms["global_penalty"])


def test_loss_is_local_mean_plus_global_over_n():
    torch.manual_seed(0)
    module = make_module()
    module.eval()  # deterministic
    batch = make_batch(32)
    out = module.loss(batch, n_obs=1000, kl_weight=0.25)
    t = out.terms
    expected = t["reconstruction_loss"] + 0.25 * t["kl_z"] + t["kl_library"] + t["global_penalty"]
    torch.testing.assert_close(out.loss, expected)
    elbo = t["reconstruction_loss"] + t["kl_z"] + t["kl_library"] + t["global_penalty"]
    torch.testing.assert_close(out.elbo, elbo)


def test_dropout_is_on_layer_inputs_and_layernorm_is_used():
    layers = FCLayers(n_in=200, n_hidden=50, n_layers=2, dropout_rate=0.5)
    seen = []
    for linear in layers.linears:
        linear.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    layers.train()
    x = torch.rand(64, 200) + 0.1  # strictly positive: any zero comes from dropout
    layers(x)
    assert (seen[0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert len(seen) == 2 and (seen[1] == 0).any()
    norms = [m for m in layers.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 and not any(isinstance(m, nn.BatchNorm1d) for m in layers.modules())
    # block order: dropout -> linear -> layernorm -> activation
    block = [type(m).__name__ for m in (layers.dropouts[0], layers.linears[0], layers.norms[0])]
    assert block == ["Dropout", "InputLinear", "LayerNorm"]
    layers.eval()
    seen.clear()
    layers(x)
    assert not (seen[0] == 0).any()


def test_module_has_no_dead_decoder_heads_and_softplus_output():
    module = make_module()
    names = set(module.state_dict())
    assert not any("px_r_decoder" in n or "dropout_decoder" in n for n in names)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in module.modules())
    rho = module.rna.decoder(torch.randn(8, 4) * 10)
    assert (rho >= 0).all() and not torch.allclose(rho.sum(-1), torch.ones(8))


def test_feature_scaling_is_product_over_keys_and_starts_near_one():
    fs = FeatureScaling(n_categories=5, n_features=3)
    codes = torch.tensor([[0, 3], [1, 4]])
    y = fs.per_cell(codes)
    torch.testing.assert_close(y, torch.full((2, 3), (np.log(2) / 0.7) ** 2))
    assert fs.factors()[0, 0].item() == pytest.approx(0.990, abs=1e-3)
    no_cov = FeatureScaling(0, 3)
    assert no_cov.per_cell(torch.zeros(4, 0, dtype=torch.long)).shape == (1, 3)


def test_ambient_sums_over_keys():
    amb = AmbientBackground(3, 2, init_log_ambient=np.log(np.array([[1.0, 2], [3, 4], [5, 6]])))
    with torch.no_grad():
        amb.log_ambient.copy_(torch.log(torch.tensor([[1.0, 2], [3, 4], [5, 6]])))
    torch.testing.assert_close(amb.per_cell(torch.tensor([[0, 2]])), torch.tensor([[6.0, 8.0]]))


def test_single_category_tables_broadcast_like_a_per_cell_lookup():
    from regvi.module.components import HierarchicalDispersion, per_cell_rows

    table = torch.randn(1, 5)
    codes = torch.zeros(4, 1, dtype=torch.long)
    broadcast = per_cell_rows(table, codes, "sum")
    assert broadcast.shape == (1, 5)
    torch.testing.assert_close(broadcast.expand(4, 5), table[codes[:, 0]])
    dispersion = HierarchicalDispersion(n_groups=1, n_features=5)
    groups = torch.zeros(4, dtype=torch.long)
    dispersion.eval()
    torch.testing.assert_close(
        dispersion.log_theta(groups), dispersion.log_theta_mean.detach().expand(4, 5)
    )
    dispersion.train()
    torch.manual_seed(0)
    drawn = dispersion.log_theta(groups).detach()
    assert drawn.shape == (4, 5)
    noise = (drawn - dispersion.log_theta_mean) / torch.exp(dispersion.log_theta_log_sigma)
    partners = _partners(noise.detach())  # antithetic pairs of cells
    assert all(len(p) == 1 for p in partners)


def _assert_same_value_and_gradients(got, want, inputs):
    """``got`` equals ``want`` (float64) and so do their gradients w.r.t. ``inputs``."""
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(got.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, inputs, upstream)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _partners(noise):
    """For each row, the rows whose noise is its negation (to rounding)."""
    return [
        torch.isclose(noise, -row, rtol=1e-5, atol=1e-6).all(dim=1).nonzero().flatten().tolist()
        for row in noise
    ]


def test_antithetic_noise_pairs_rows_and_is_standard_normal():
    from regvi.module.components import antithetic_normal_rows

    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    torch.manual_seed(0)
    odd = antithetic_normal_rows(zeros, ones, torch.zeros(5, dtype=torch.long))
    partners = _partners(odd)
    assert sorted(len(p) for p in partners) == [0, 1, 1, 1, 1]  # two pairs, one unpaired
    assert all(partners[p[0]] == [i] for i, p in enumerate(partners) if p)
    zeros, ones = torch.zeros(1, 500, dtype=torch.float64), torch.ones(1, 500, dtype=torch.float64)
    noise = antithetic_normal_rows(zeros, ones, torch.zeros(2000, dtype=torch.long))
    assert abs(noise.mean().item()) < 1e-12  # exact: the pairs cancel
    assert abs(noise.var().item() - 1.0) < 0.01


def test_antithetic_partners_are_random_cells_not_row_positions():
    """Minibatch rows come sorted by cell index, so pairing by row position (first half
    against second half) would always pair low-index with high-index cells: the partner
    of a row must vary from draw to draw, and every row must still be N(m, s^2)."""
    from regvi.module.components import antithetic_normal_rows

    zeros, ones = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    codes = torch.zeros(10, dtype=torch.long)
    torch.manual_seed(0)
    seen = {row: set() for row in (0, 4, 9)}
    for _ in range(300):
        partners = _partners(antithetic_normal_rows(zeros, ones, codes))
        assert all(len(p) == 1 for p in partners)  # an even count: every row is paired
        for row in seen:
            seen[row].add(partners[row][0])
    assert all(len(found) == 9 for found in seen.values())  # every other row, at some draw
    # every row (first, middle, last) is N(m, s^2), with two groups of different m and s
    mean = torch.tensor([[1.0], [-2.0]], dtype=torch.float64).expand(2, 20_000)
    scale = torch.tensor([[0.5], [3.0]], dtype=torch.float64).expand(2, 20_000)
    codes = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1])
    drawn = antithetic_normal_rows(mean.contiguous(), scale.contiguous(), codes)
    for row, code in enumerate(codes.tolist()):
        standard = (drawn[row] - mean[code, 0]) / scale[code, 0]
        assert abs(standard.mean().item()) < 0.03, row
        assert abs(standard.std().item() - 1.0) < 0.03, row


@pytest.mark.parametrize("n_codes", [1, 3])
@pytest.mark.parametrize("n_cells", [6, 7])
def test_antithetic_rows_match_lookups_and_their_gradients(n_codes, n_cells):
    """The fused node equals mean[c] + scale[c] * (+-eps) built op by op, in value and in
    gradient (analytic, and finite differences by gradcheck)."""
    from regvi.module.components import antithetic_normal_rows

    torch.manual_seed(1)
    mean = torch.randn(n_codes, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(n_codes, 4, dtype=torch.float64).add_(0.5).requires_grad_()
    codes = torch.randint(0, n_codes, (n_cells,))
    torch.manual_seed(2)
    drawn = antithetic_normal_rows(mean, scale, codes)
    noise = ((drawn - mean[codes]) / scale[codes]).detach()  # the node's draws
    partners = _partners(noise)
    assert sorted(len(p) for p in partners) == [0] * (n_cells % 2) + [1] * (2 * (n_cells // 2))
    expected = mean[codes] + scale[codes] * noise
    _assert_same_value_and_gradients(drawn, expected, (mean, scale))

    def seeded(mean_, scale_):
        torch.manual_seed(2)  # the same noise at every evaluation
        return antithetic_normal_rows(mean_, scale_, codes)

    assert torch.autograd.gradcheck(seeded, (mean, scale))


def test_expected_counts_looks_up_ambient_profiles_by_code():
    """An ambient table with per-cell codes gives what the looked-up rows give: value,
    gradients (the table's gradient sums its cells'), and forward-mode tangents."""
    from regvi.module.components import expected_counts

    torch.manual_seed(0)
    rho = torch.rand(7, 5, dtype=torch.float64, requires_grad=True)
    log_library = torch.randn(7, dtype=torch.float64, requires_grad=True)
    table = torch.rand(3, 5, dtype=torch.float64).add_(0.1).requires_grad_()
    scaling = torch.rand(1, 5, dtype=torch.float64).add_(0.5).requires_grad_()
    codes = torch.tensor([2, 0, 1, 2, 2, 0, 1])
    inputs = (rho, log_library, table, scaling)
    fused = expected_counts(rho, log_library, table, scaling, codes)
    looked_up = expected_counts(rho, log_library, table[codes], scaling)
    _assert_same_value_and_gradients(fused, looked_up, inputs)
    assert torch.autograd.gradcheck(lambda *args: expected_counts(*args, codes), tuple(inputs))
    primals = tuple(t.detach() for t in inputs)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    _, got_tangent = torch.func.jvp(lambda *a: expected_counts(*a, codes), primals, tangents)
    _, want_tangent = torch.func.jvp(
        lambda r, lib, tab, sc: expected_counts(r, lib, tab[codes], sc), primals, tangents
    )
    torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ambient_rows", [None, 1, 6])
@pytest.mark.parametrize("scaling_rows", [None, 1, 6])
def test_expected_counts_node_matches_the_formula_and_its_gradients(ambient_rows, scaling_rows):
    from regvi.module.components import expected_counts

    torch.manual_seed(0)
    rho = torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    log_library = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def rows(n):
        return (
            None if n is None else torch.rand(n, 5, dtype=torch.float64).add_(0.5).requires_grad_()
        )

    ambient, scaling = rows(ambient_rows), rows(scaling_rows)
    inputs = [t for t in (rho, log_library, ambient, scaling) if t is not None]
    expression = rho + (ambient if ambient is not None else 0.0)
    expression = expression * (scaling if scaling is not None else 1.0)
    expected = torch.exp(log_library)[:, None] * expression
    mu = expected_counts(rho, log_library, ambient, scaling)
    _assert_same_value_and_gradients(mu, expected, inputs)

    def from_inputs(*args):
        it = iter(args)
        return expected_counts(
            next(it),
            next(it),
            next(it) if ambient is not None else None,
            next(it) if scaling is not None else None,
        )

    assert torch.autograd.gradcheck(from_inputs, inputs)

    # forward mode too (the modality attribution takes JVPs through it)
    def plain(*args):
        it = iter(args)
        rho_, log_library_ = next(it), next(it)
        expression = rho_ + (next(it) if ambient is not None else 0.0)
        expression = expression * (next(it) if scaling is not None else 1.0)
        return torch.exp(log_library_)[:, None] * expression

    primals = tuple(t.detach() for t in inputs)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    _, got_tangent = torch.func.jvp(from_inputs, primals, tangents)
    _, want_tangent = torch.func.jvp(plain, primals, tangents)
    torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-10, atol=1e-12)


def _reference_penalties(part, jacobian=True):
    """Each global term written with the plain formulas of regvi.distributions, for autograd."""
    from regvi.distributions import (
        gamma_log_prob,
        kl_log_theta_inverse_sqrt_exponential,
        kl_lognormal_exponential,
    )

    d, lib, scaling, ambient = part.dispersion, part.library, part.feature_scaling, part.ambient
    rate = nn.functional.softplus(d.rate_raw)
    contained = (
        (d.centre_mean, d.centre_log_sigma)
        if d.pooled
        else (d.log_theta_mean, d.log_theta_log_sigma)
    )
    kl = kl_log_theta_inverse_sqrt_exponential(*contained, rate[:, None], jacobian=jacobian).sum()
    if d.pooled:  # offsets δ_dg ~ N(0, τ²), written out
        tau_sq = torch.exp(2.0 * d.log_pool_scale)
        var_q = torch.exp(2.0 * d.offset_log_sigma)
        kl = (
            kl
            + (
                0.5 * torch.log(tau_sq / var_q) + (var_q + d.offset_mean**2) / (2.0 * tau_sq) - 0.5
            ).sum()
        )
    factors = nn.functional.softplus(scaling.raw) / FEATURE_SCALING_DIVISOR
    return {
        "dispersion_penalty": kl - gamma_log_prob(rate, d.hyper_alpha, d.hyper_beta).sum(),
        "library_w_kl": kl_lognormal_exponential(lib.w_mu, lib.w_log_sigma, lib.w_prior_rate),
        "decoder_l2": part.decoder_weight_l2
        * sum(
            w.pow(2).sum()
            for w in [
                part.decoder.head.weight,
                *(x.weight for x in part.decoder.layers.linears),
                *(x.weight for x in part.decoder.layers.injections if x.weight is not None),
            ]
        ),
        "ambient_penalty": -gamma_log_prob(
            torch.exp(ambient.log_ambient), ambient.prior_alpha, ambient.prior_beta
        ).sum(),
        "feature_scaling_penalty": -gamma_log_prob(
            factors, scaling.prior_alpha, scaling.prior_beta
        ).sum(),
    }


@pytest.mark.parametrize("pooling", [True, False])
@pytest.mark.parametrize("jacobian", [True, False])
@pytest.mark.parametrize("hyper_alpha", [9.0, 2.5])
def test_closed_form_penalty_gradients_match_autograd_of_the_formulas(
    hyper_alpha, jacobian, pooling
):
    # hand-derived gradients (one autograd node a term) against autograd through the plain
    # formulas, in float64 at random parameter values away from the initialisation
    torch.manual_seed(3)
    module = RegularizedVAE(
        30,
        LibraryPrior(np.array([7.0, 7.5]), np.array([0.2, 0.3])),
        n_latent=4,
        n_hidden=16,
        n_layers=2,
        n_ambient_categories=3,
        regularise_ambient=True,
        ambient_prior_alpha=2.0,
        n_feature_scaling_categories=2,
        n_nn_conditioning_categories=2,
        n_dispersion_groups=3,
        dispersion_hyper_prior_alpha=hyper_alpha,
        dispersion_prior_jacobian=jacobian,
        dispersion_pooling=pooling,
    ).double()
    part = module.rna
    assert part.dispersion.pooled is pooling
    with torch.no_grad():
        for p in part.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = [p for p in part.parameters()]
    ours = part.penalties()
    reference = _reference_penalties(part, jacobian)
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=1e-9)
        got = torch.autograd.grad(ours[name], params, allow_unused=True)
        want = torch.autograd.grad(reference[name], params, allow_unused=True)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None), name
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # scaled like any other loss term (the node multiplies by the incoming gradient)
    total = 3.0 * part.penalties()["dispersion_penalty"]
    g = torch.autograd.grad(total, part.dispersion.rate_raw)[0]
    reference = _reference_penalties(part, jacobian)["dispersion_penalty"]
    want = 3.0 * torch.autograd.grad(reference, part.dispersion.rate_raw)[0]
    torch.testing.assert_close(g, want)


def test_closed_form_penalties_without_autograd_give_the_same_values():
    module = make_module(regularise_ambient=True)
    with torch.no_grad():
        values = module.rna.penalties()
    assert all(not v.requires_grad for v in values.values())
    tracked = module.rna.penalties()
    for name, value in values.items():
        torch.testing.assert_close(value, tracked[name].detach())


def test_decoder_l2_covers_the_nn_conditioning_weights():
    """The decoder's L2 penalises every weight of its layers, the injected covariate columns
    too (the published code concatenates the one-hot to each layer's input, so its L2 covers
    them): changing only those weights changes the penalty by exactly their squared norm."""
    module = make_module(n_nn_conditioning_categories=3)
    part = module.rna
    injections = [inj.weight for inj in part.decoder.layers.injections]
    assert all(w is not None for w in injections)
    before = part.penalties()["decoder_l2"].item()
    with torch.no_grad():
        for w in injections:
            w.add_(1.0)
    after = part.penalties()["decoder_l2"].item()
    assert after != pytest.approx(before)
    with torch.no_grad():
        extra = sum(w.pow(2).sum() - (w - 1.0).pow(2).sum() for w in injections)
    assert after - before == pytest.approx(part.decoder_weight_l2 * extra.item(), rel=1e-5)
    # and its gradient reaches them
    grads = torch.autograd.grad(part.penalties()["decoder_l2"], injections)
    for w, g in zip(injections, grads, strict=True):
        torch.testing.assert_close(g, 2.0 * part.decoder_weight_l2 * w.detach())


@pytest.mark.parametrize("jacobian,expected", [(True, 0.35), (False, -0.15)])
def test_dispersion_prior_direction_at_large_theta(jacobian, expected):
    """d penalty / d log theta at theta = 100 (sigma 0.1, lambda 3): with the log-Jacobian
    (a proper KL, whose prior on log theta peaks at lambda^2 e^{sigma^2/4} ~ 9) the penalty
    pushes a weakly informed gene from theta = 100 down, towards over-dispersion; without it
    (the published objective) up, towards Poisson."""
    from regvi.module.components import HierarchicalDispersion

    d = HierarchicalDispersion(1, 1, jacobian=jacobian).double()
    with torch.no_grad():
        d.log_theta_mean.fill_(np.log(100.0))
        d.log_theta_log_sigma.fill_(np.log(0.1))
    assert d.rate().item() == pytest.approx(3.0)
    grad = torch.autograd.grad(d.penalty(), d.log_theta_mean)[0].item()
    assert grad == pytest.approx(expected, abs=0.01)
    # the sign holds away from the prior mode: with the Jacobian, theta is pulled to ~9
    # from both sides; without it, pushed up everywhere
    for theta in (2.0, 30.0, 1e4):
        with torch.no_grad():
            d.log_theta_mean.fill_(np.log(theta))
        grad = torch.autograd.grad(d.penalty(), d.log_theta_mean)[0].item()
        assert (grad > 0) == (jacobian and theta > 9.0), theta
