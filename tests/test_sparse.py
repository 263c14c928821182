"""The sparse minibatch path equals the dense computation it replaces."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from regvi import distributions as D
from regvi.data.counts import (
    SparseCounts,
    _transpose_by_sort,
    _transpose_scipy,
    as_sparse_counts,
)
from regvi.nn import Encoder, FCLayers, InputLinear, sparse_input_linear
from regvi.nn.layers import SPARSE_INPUT_MIN_ELEMENTS


def _counts(n_cells=9, n_features=13, density=0.4, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, (n_cells, n_features)) * (rng.random((n_cells, n_features)) < density)
    dense[2] = 0  # a cell with no counts at all
    return dense.astype(np.float32)


def test_sparse_counts_round_trip_sums_and_gather():
    dense = _counts()
    counts = SparseCounts.from_scipy(sp.csr_matrix(dense))
    assert counts.shape == dense.shape
    # scipy's int32 indices are kept (no copy a minibatch); moving makes them int64 off the CPU
    assert counts.columns.dtype == counts.offsets.dtype == torch.int32
    assert counts.to("cpu").columns.dtype == torch.int32
    assert counts.to("meta").columns.dtype == counts.to("meta").offsets.dtype == torch.int64
    np.testing.assert_array_equal(counts.to_dense().numpy(), dense)
    np.testing.assert_allclose(counts.row_sums().numpy(), dense.sum(1))
    table = torch.arange(dense.size, dtype=torch.float32).reshape(dense.shape)
    rows, cols = np.nonzero(dense)
    np.testing.assert_array_equal(counts.gather(table).numpy(), table.numpy()[rows, cols])
    again = as_sparse_counts(torch.from_numpy(dense))
    np.testing.assert_array_equal(again.to_dense().numpy(), dense)
    assert as_sparse_counts(counts) is counts


def test_duplicate_entries_are_summed_not_split():
    # COO with a repeated (row, col): canonical CSR holds one entry with the total count
    coo = sp.coo_matrix(([1.0, 2.0, 5.0], ([0, 0, 1], [1, 1, 0])), shape=(2, 3))
    counts = SparseCounts.from_scipy(coo.tocsr(copy=False))
    assert counts.values.numel() == 2
    np.testing.assert_array_equal(counts.to_dense().numpy(), [[0, 3, 0], [5, 0, 0]])


def test_minibatches_of_a_non_canonical_matrix_sum_duplicates_too():
    """The dataset skips the per-minibatch canonical check only for a canonical matrix."""
    from regvi.data.loader import CsrMinibatchDataset

    data, columns, offsets = [1.0, 2.0, 5.0, 4.0], [1, 1, 0, 2], [0, 2, 3, 4]
    duplicated = sp.csr_matrix((data, columns, offsets), shape=(3, 3))
    assert not duplicated.has_canonical_format
    covariates = {"dispersion": np.zeros(3, dtype=np.int64)}
    canonical = duplicated.copy()
    canonical.sum_duplicates()
    for X in (duplicated, canonical):
        batch = CsrMinibatchDataset(X, covariates)[np.array([2, 0])]
        np.testing.assert_array_equal(batch["x"].to_dense().numpy(), [[0, 3, 0], [0, 0, 4]])
        assert batch["x"].values.numel() == 2


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_sparse_likelihood_and_gradients_equal_the_dense_formula(eps):
    dense = torch.from_numpy(_counts()).double()
    counts = SparseCounts.from_dense(dense)
    counts.values = counts.values.double()
    gen = torch.Generator().manual_seed(1)
    mu = (torch.rand(dense.shape, generator=gen, dtype=torch.float64) * 6 + 0.05).requires_grad_()
    log_theta = torch.randn(dense.shape, generator=gen, dtype=torch.float64).requires_grad_()
    reference = D.gamma_poisson_log_prob(dense, mu, torch.exp(log_theta), eps=eps).sum(-1)
    sparse = D.gamma_poisson_log_prob_sparse(counts, mu, log_theta, eps=eps)
    torch.testing.assert_close(sparse, reference, rtol=1e-9, atol=1e-6)
    weights = torch.rand(dense.shape[0], generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad((reference * weights).sum(), (mu, log_theta))
    g_sparse = torch.autograd.grad((sparse * weights).sum(), (mu, log_theta))
    for a, b in zip(g_sparse, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda m, t: D.gamma_poisson_log_prob_sparse(counts, m, t, eps=eps), (mu, log_theta)
    )


def test_encoder_reads_sparse_input_like_dense_input():
    torch.manual_seed(0)
    dense = torch.log1p(torch.from_numpy(_counts()))
    continuous = torch.randn(dense.shape[0], 2)
    encoder = Encoder(dense.shape[1] + 2, 4, n_hidden=8, dropout_rate=0.3).eval()
    mean_d, var_d = encoder(torch.cat([dense, continuous], dim=-1))
    mean_s, var_s = encoder(SparseCounts.from_dense(dense), continuous=continuous)
    torch.testing.assert_close(mean_s, mean_d)
    torch.testing.assert_close(var_s, var_d)


def test_transpose_is_the_csc_of_the_minibatch_on_either_path():
    dense = _counts(n_cells=11, n_features=7, density=0.5, seed=3)
    dense[:, 4] = 0  # a feature with no entries
    counts = SparseCounts.from_scipy(sp.csr_matrix(dense))
    csc = sp.csc_matrix(dense)
    for transpose in (_transpose_scipy(counts), _transpose_by_sort(counts)):
        feature_offsets, rows, values = transpose
        np.testing.assert_array_equal(feature_offsets.numpy(), csc.indptr)
        np.testing.assert_array_equal(rows.numpy(), csc.indices)
        np.testing.assert_array_equal(values.numpy(), csc.data)
        assert feature_offsets.dtype == rows.dtype  # as embedding_bag needs
    assert counts.transpose() is counts.transpose()  # computed once per minibatch


@pytest.mark.parametrize("trailing", [0, 3])
def test_sparse_first_layer_equals_the_dense_affine_map_with_gradients(trailing):
    torch.manual_seed(0)
    dense = torch.from_numpy(_counts(n_cells=10, n_features=12, density=0.35)).double()
    counts = SparseCounts.from_dense(dense)  # row 2 holds no entries: an empty bag
    counts.values = counts.values.double().requires_grad_()
    layer = InputLinear(12 + trailing, 5).double()
    extra = torch.randn(10, trailing, dtype=torch.float64) if trailing else None
    out = layer(counts, extra)
    x = counts.to_dense(counts.values)
    reference = (torch.cat([x, extra], dim=-1) if trailing else x) @ layer.weight + layer.bias
    torch.testing.assert_close(out, reference)
    upstream = torch.randn_like(out)
    params = (counts.values, layer.weight, layer.bias)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    expected = torch.autograd.grad((reference * upstream).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda v, w, b: sparse_input_linear(counts.with_values(v), w, b),
        (
            counts.values.detach().requires_grad_(),
            layer.weight[:12].detach().requires_grad_(),
            layer.bias.detach().requires_grad_(),
        ),
    )


@pytest.mark.parametrize("n_features", [300, 40])
def test_fc_layers_read_sparse_input_without_densifying_unless_tiny(n_features):
    dense = torch.log1p(torch.from_numpy(_counts(n_cells=64, n_features=n_features)))
    counts = SparseCounts.from_dense(dense)
    layers = FCLayers(n_features, 16, n_layers=1, dropout_rate=0.2).train()
    out = layers(counts)
    dropped = counts.dropout(0.2, training=True)  # the mask the forward drew (cached)
    tiny = 64 * n_features < SPARSE_INPUT_MIN_ELEMENTS
    assert (dropped._dense is not None) == tiny  # no cells x features buffer unless tiny
    linear = layers.linears[0]
    reference = dropped.to_dense() @ linear.weight + linear.bias
    torch.testing.assert_close(out, layers.activations[0](layers.norms[0](reference)))


def test_dropout_on_stored_entries_keeps_zeros_rescales_and_is_shared_per_batch():
    torch.manual_seed(0)
    n = 200_000
    # 100 cells with every one of 2000 features stored
    counts = SparseCounts(
        torch.ones(n), torch.arange(n) % 2000, torch.arange(0, n + 1, 2000), n_features=2000
    )
    dropped = counts.dropout(0.25, training=True)
    assert dropped.shape == (100, 2000) and dropped.columns is counts.columns
    values = dropped.values
    kept = values != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(values[kept], torch.full_like(values[kept], 1 / 0.75))
    # every encoder of the minibatch sees the same mask (and one densification of it)
    assert counts.dropout(0.25, training=True) is dropped
    assert dropped.to_dense() is dropped.to_dense()
    torch.testing.assert_close(counts.gather(dropped.to_dense()), values)
    # eval mode sees the counts
    assert counts.dropout(0.25, training=False) is counts


def test_cell_log_factorials_are_the_per_cell_data_constant():
    """Remembered per cell as minibatches are drawn, they equal the sum of lgamma(x + 1) over
    the cell's counts (empty cells too), and the likelihood with them equals the likelihood
    summing them over the entries."""
    from regvi.data.loader import CsrMinibatchDataset

    dense = _counts()
    dense[3] = 0  # an empty row
    X = sp.csr_matrix(dense.astype(np.float32))
    expected = torch.lgamma(torch.from_numpy(dense).double() + 1.0).sum(dim=1).numpy()
    dataset = CsrMinibatchDataset(X, {"dispersion": np.zeros(X.shape[0], dtype=np.int64)})
    first = dataset[np.array([5, 3, 0])]["x"]
    np.testing.assert_allclose(first.row_log_factorials.numpy(), expected[[0, 3, 5]], rtol=1e-6)
    assert dataset._log_factorials.known.sum() == 3
    counts = dataset[np.array([0, 1, 5])]["x"]  # two remembered cells, one new
    np.testing.assert_allclose(counts.row_log_factorials.numpy(), expected[[0, 1, 5]], rtol=1e-6)
    gen = torch.Generator().manual_seed(3)
    mu = (torch.rand(counts.shape, generator=gen) * 6 + 0.05).requires_grad_()
    log_theta = torch.randn(counts.shape, generator=gen).requires_grad_()
    with_constant = D.gamma_poisson_log_prob_sparse(counts, mu, log_theta)
    grads = torch.autograd.grad(with_constant.sum(), (mu, log_theta))
    counts.row_log_factorials = None
    summed = D.gamma_poisson_log_prob_sparse(counts, mu, log_theta)
    torch.testing.assert_close(with_constant, summed, rtol=1e-5, atol=1e-3)
    for got, want in zip(grads, torch.autograd.grad(summed.sum(), (mu, log_theta)), strict=True):
        torch.testing.assert_close(got, want)


def test_a_fetch_of_minibatches_equals_the_minibatches_gathered_one_by_one():
    """In memory a fetch is cut from one gather of its rows; every minibatch of it (counts,
    per-cell log-factorials, covariates) equals the one gathered alone, and a multimodal
    minibatch's ``x`` stays the first modality's object."""
    from regvi.data.loader import CsrMinibatchDataset
    from regvi.data.mudata_io import MultiModalDataset

    rna = sp.csr_matrix(_counts(n_cells=40, n_features=13, seed=1).astype(np.float32))
    atac = sp.csr_matrix(_counts(n_cells=40, n_features=21, density=0.2, seed=2))
    atac = atac.astype(np.float32)
    covariates = {"dispersion": np.arange(40) % 3, "continuous": np.linspace(0, 1, 40)}
    arrays = [np.array([7, 2, 30, 11]), np.array([39, 0, 5]), np.array([12])]
    for make in (
        lambda: CsrMinibatchDataset(rna, covariates),
        lambda: MultiModalDataset({"rna": rna, "atac": atac}, covariates),
    ):
        fetched = make()[arrays]
        alone = make()
        assert len(fetched) == len(arrays)
        for minibatch, idx in zip(fetched, arrays, strict=True):
            expected = alone[idx]
            assert minibatch.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, SparseCounts):
                    got = minibatch[key]
                    for part in ("values", "columns", "offsets", "row_log_factorials"):
                        torch.testing.assert_close(getattr(got, part), getattr(value, part))
                    assert got.shape == value.shape
                    np.testing.assert_array_equal(got.to_dense().numpy(), value.to_dense().numpy())
                else:
                    torch.testing.assert_close(minibatch[key], value)
            if "x_rna" in minibatch:
                assert minibatch["x"] is minibatch["x_rna"]


def test_default_fetch_is_bounded_by_cells_and_by_stored_entries():
    from regvi.data.loader import (
        CELLS_PER_FETCH,
        ENTRIES_PER_FETCH,
        CsrMinibatchDataset,
        default_minibatches_per_fetch,
    )

    narrow = CsrMinibatchDataset(sp.random(500, 200, density=0.1, format="csr", random_state=0), {})
    assert narrow.entries_per_cell() == pytest.approx(20.0)
    assert default_minibatches_per_fetch(128, narrow.entries_per_cell()) == CELLS_PER_FETCH // 128
    assert default_minibatches_per_fetch(4096, 20.0) == 1
    # 20k genes at 23% non-zero: one minibatch of 128 cells is already ~600k entries
    wide = default_minibatches_per_fetch(128, 4600.0)
    assert wide == 1 and 128 * 4600 * wide <= ENTRIES_PER_FETCH


def _near_poisson_cells(theta, n_cells=40, n_genes=300, seed=0):
    """Counts and float64 means of near-Poisson genes (all at one large θ)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.05, 30.0, (n_cells, n_genes))
    x = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float64)
    return x, mu


@pytest.mark.parametrize("theta", [1e4, 1e5, 1e6])
def test_likelihood_at_large_theta_matches_float64_in_float32(theta):
    """The float32 likelihood of near-Poisson genes: lgamma(x + θ) - lgamma(θ) cancels
    catastrophically at large θ (-3 nats/cell off at θ = 1e4, +203 at 1e6 with two float32
    lgammas); within 0.01 nats/cell of float64 here, with and without the data constant."""
    from scipy.stats import nbinom

    x, mu = _near_poisson_cells(theta)
    want = nbinom.logpmf(x, theta, theta / (theta + mu)).sum(axis=1)
    counts = SparseCounts.from_dense(torch.from_numpy(x).float())
    log_theta = torch.full(x.shape, float(np.log(theta)))
    for constant in (True, False):
        counts.row_log_factorials = (
            counts.row_sums(torch.lgamma(counts.values + 1.0)) if constant else None
        )
        got = D.gamma_poisson_log_prob_sparse(counts, torch.from_numpy(mu).float(), log_theta)
        assert np.abs(got.numpy() - want).max() < 0.01, constant


@pytest.mark.parametrize("theta", [3.0, 1e4, 1e6])
def test_likelihood_gradients_at_large_theta_match_float64_autograd_in_float32(theta):
    """In float32, dlogp/dμ and dlogp/dlog θ against float64 autograd of the dense formula,
    to a few float32 roundings of the O(x + μ) numbers they are made of. The dlog θ of a
    near-Poisson entry is O(μ²/θ): computed as θ(E + r - 1) its error was 6e-8 θ, larger
    than the gradient itself at θ = 1e4."""
    x, mu = _near_poisson_cells(theta, n_cells=20, n_genes=100)
    x64 = torch.from_numpy(x)
    mu64 = torch.from_numpy(mu).requires_grad_()
    log_theta64 = torch.full(x.shape, float(np.log(theta)), dtype=torch.float64)
    log_theta64.requires_grad_()
    reference = D.gamma_poisson_log_prob(x64, mu64, torch.exp(log_theta64), eps=0.0).sum()
    want = torch.autograd.grad(reference, (mu64, log_theta64))
    counts = SparseCounts.from_dense(x64.float())
    mu32 = mu64.detach().float().requires_grad_()
    log_theta32 = log_theta64.detach().float().requires_grad_()
    got = torch.autograd.grad(
        D.gamma_poisson_log_prob_sparse(counts, mu32, log_theta32, eps=0.0).sum(),
        (mu32, log_theta32),
    )
    scale = torch.from_numpy(x + mu)
    for g, w in zip(got, want, strict=True):
        assert ((g.double() - w).abs() <= 1e-6 * scale + 1e-7).all()
