"""Tests of the simulator in regvi.datasets: structure, determinism and the count distribution."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from regvi.datasets import SimulatedTruth, default_dataset, simulate
from regvi.errors import DataError

SMALL = {"n_cells": 600, "n_genes": 150, "n_cell_types": 4, "n_batches": 3, "n_latent": 5}


@pytest.fixture(scope="module")
def small():
    return simulate(**SMALL, seed=3)


@pytest.fixture(scope="module")
def moments():
    """Many cells in two dispersion groups with very different dispersion."""
    return simulate(
        n_cells=6000,
        n_genes=200,
        n_cell_types=3,
        n_batches=2,
        dispersion_levels=(2.0, 30.0),
        seed=0,
    )


def test_shapes_dtypes_and_annotations(small):
    adata, truth = small
    n, g, k, b, latent = (SMALL[key] for key in SMALL)
    assert isinstance(truth, SimulatedTruth)
    assert adata.shape == (n, g)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    assert list(adata.obs_names[:2]) == ["cell_0", "cell_1"]
    assert list(adata.var_names[:2]) == ["gene_0", "gene_1"]
    assert adata.obs_names.is_unique and adata.var_names.is_unique

    for key, prefix, n_labels in [("batch", "batch", b), ("cell_type", "type", k)]:
        column = adata.obs[key]
        assert isinstance(column.dtype, pd.CategoricalDtype)
        assert list(column.cat.categories) == [f"{prefix}_{i}" for i in range(n_labels)]
    assert isinstance(adata.obs["dispersion_group"].dtype, pd.CategoricalDtype)
    assert (adata.obs["dispersion_group"].astype(str) == adata.obs["batch"].astype(str)).all()
    np.testing.assert_array_equal(adata.obs["batch"].cat.codes.to_numpy(), truth.batch)
    np.testing.assert_array_equal(adata.obs["cell_type"].cat.codes.to_numpy(), truth.cell_type)

    assert truth.cell_type.shape == truth.batch.shape == truth.dispersion_group.shape == (n,)
    assert np.issubdtype(truth.cell_type.dtype, np.integer)
    assert np.issubdtype(truth.batch.dtype, np.integer)
    np.testing.assert_array_equal(truth.dispersion_group, truth.batch)
    assert truth.z.shape == (n, latent)
    assert truth.rho.shape == (n, g) and truth.rho.dtype == np.float32
    assert truth.ambient.shape == truth.feature_scaling.shape == (b, g)
    assert truth.dispersion.shape == (b, g)
    assert truth.log_library.shape == (n,)

    np.testing.assert_array_equal(adata.obsm["true_z"], truth.z)
    np.testing.assert_array_equal(adata.varm["true_ambient"], truth.ambient.T)
    np.testing.assert_array_equal(adata.varm["true_feature_scaling"], truth.feature_scaling.T)
    np.testing.assert_array_equal(adata.varm["true_dispersion"], truth.dispersion.T)
    params = adata.uns["simulation"]
    assert params["n_cells"] == n and params["seed"] == 3
    assert params["dispersion_levels"] == [2.0, 8.0, 30.0]
    json.dumps(params)  # JSON-friendly


def test_counts_are_whole_nonnegative_finite(small):
    adata, _ = small
    data = adata.X.data
    assert data.size > 0
    assert np.isfinite(data).all()
    assert (data > 0).all()  # explicit zeros are not stored
    np.testing.assert_array_equal(data, np.round(data))
    assert adata.X.sum(axis=1).min() > 0


def test_truth_parameters_are_valid(small):
    _, truth = small
    assert np.isfinite(truth.rho).all() and (truth.rho > 0).all()
    # rho is a fraction of the library: totals average to one over cells
    assert truth.rho.sum(axis=1, dtype=np.float64).mean() == pytest.approx(1.0, rel=1e-5)
    # expression spans several orders of magnitude across genes
    gene_mean = truth.rho.mean(axis=0)
    assert np.log10(gene_mean.max() / gene_mean.min()) > 2.5
    assert (truth.ambient > 0).all() and (truth.feature_scaling > 0).all()
    assert (truth.dispersion > 0).all()
    # ambient per batch sums to about ambient_fraction (0.1 * E[exp(N(0, 0.5^2))])
    assert np.all((truth.ambient.sum(axis=1) > 0.05) & (truth.ambient.sum(axis=1) < 0.2))
    # dispersion groups are clearly ordered like dispersion_levels
    medians = np.median(truth.dispersion, axis=1)
    np.testing.assert_allclose(medians, [2.0, 8.0, 30.0], rtol=0.1)
    # batches shift the library size upwards
    batch_means = [truth.log_library[truth.batch == b].mean() for b in range(3)]
    assert batch_means[0] < batch_means[1] < batch_means[2]


def test_deterministic_for_a_seed():
    a1, t1 = simulate(**SMALL, seed=11)
    a2, t2 = simulate(**SMALL, seed=11)
    a3, t3 = simulate(**SMALL, seed=12)
    assert (a1.X != a2.X).nnz == 0
    for field in ("cell_type", "batch", "z", "rho", "ambient", "dispersion", "log_library"):
        np.testing.assert_array_equal(getattr(t1, field), getattr(t2, field))
    assert (a1.X != a3.X).nnz > 0
    assert not np.allclose(t1.z, t3.z)


def test_return_rho_false_gives_same_counts():
    a1, t1 = simulate(**SMALL, seed=5)
    a2, t2 = simulate(**SMALL, seed=5, return_rho=False)
    assert t2.rho is None
    assert (a1.X != a2.X).nnz == 0
    np.testing.assert_array_equal(t1.ambient, t2.ambient)
    with pytest.raises(DataError, match="return_rho"):
        t2.expected_counts()


def test_every_type_in_every_batch(small):
    _, truth = small
    table = pd.crosstab(truth.cell_type, truth.batch)
    assert table.shape == (SMALL["n_cell_types"], SMALL["n_batches"])
    assert (table.to_numpy() > 0).all()
    # near-equal proportions: within a batch type counts differ by at most one
    assert (table.max(axis=0) - table.min(axis=0)).max() <= 1
    # also at the smallest allowed size
    _, tight = simulate(n_cells=12, n_genes=10, n_cell_types=4, n_batches=3, seed=1)
    assert (pd.crosstab(tight.cell_type, tight.batch).to_numpy() == 1).all()


def test_cell_types_differ_clearly(small):
    _, truth = small
    log_means = np.log2(np.stack([truth.rho[truth.cell_type == k].mean(axis=0) for k in range(4)]))
    for i in range(4):
        for j in range(i + 1, 4):
            changed = np.abs(log_means[i] - log_means[j]) > 1.0
            assert changed.mean() > 0.2, (i, j)


def test_batches_have_different_ambient_profiles(small):
    _, truth = small
    log_ambient = np.log(truth.ambient)
    # ambient spans orders of magnitude across genes
    assert (log_ambient.max(axis=1) - log_ambient.min(axis=1) > np.log(100)).all()
    for i in range(3):
        for j in range(i + 1, 3):
            corr = np.corrcoef(log_ambient[i], log_ambient[j])[0, 1]
            assert 0.5 < corr < 0.99  # same soup, batch-specific noise
            assert np.abs(log_ambient[i] - log_ambient[j]).mean() > 0.2


def test_empirical_mean_matches_mu(moments):
    adata, truth = moments
    counts = adata.X.toarray().astype(np.float64)
    mu = truth.expected_counts()
    for b in range(2):
        cells = truth.batch == b
        empirical = counts[cells].mean(axis=0)
        expected = mu[cells].mean(axis=0)
        theta = truth.dispersion[b]
        standard_error = np.sqrt((mu[cells] + mu[cells] ** 2 / theta).sum(axis=0)) / cells.sum()
        assert np.abs((empirical - expected) / standard_error).max() < 4.5
        well_expressed = expected > 2.0
        assert well_expressed.sum() > 50
        relative_error = np.abs(empirical / expected - 1.0)[well_expressed]
        assert relative_error.max() < 0.15
        assert np.median(relative_error) < 0.03


def test_empirical_variance_matches_negative_binomial(moments):
    adata, truth = moments
    counts = adata.X.toarray().astype(np.float64)
    mu = truth.expected_counts()
    estimates = []
    for b, level in enumerate((2.0, 30.0)):
        cells = truth.batch == b
        genes = (mu[cells].mean(axis=0) > 0.5) & (mu[cells].mean(axis=0) < 100)
        x, m = counts[cells][:, genes], mu[cells][:, genes]
        theta = truth.dispersion[b, genes]
        squared_residual = ((x - m) ** 2).sum()
        # aggregated second moment agrees with the NB variance mu + mu^2 / theta ...
        assert squared_residual / (m + m**2 / theta).sum() == pytest.approx(1.0, abs=0.06)
        # ... and not with a Poisson one, nor with the other group's dispersion
        assert squared_residual / m.sum() > 2.0
        wrong_theta = 30.0 if level == 2.0 else 2.0
        assert abs(squared_residual / (m + m**2 / wrong_theta).sum() - 1.0) > 0.3
        # moment estimate of theta on aggregated genes recovers the group's level
        estimate = (m**2).sum() / (((x - m) ** 2 - x).sum())
        assert estimate == pytest.approx(level, rel=0.2)
        estimates.append(estimate)
    assert estimates[0] < estimates[1]


def test_default_dataset():
    adata = default_dataset()
    assert adata.shape == (3000, 1000)
    assert adata.obs["cell_type"].nunique() == 6
    assert adata.obs["batch"].nunique() == 3
    assert adata.uns["simulation"]["seed"] == 0
    reference, _ = simulate(n_cells=3000, n_genes=1000, n_cell_types=6, n_batches=3, seed=0)
    assert (adata.X != reference.X).nnz == 0
    assert (default_dataset(seed=1).X != adata.X).nnz > 0


def test_h5ad_round_trip(tmp_path, small):
    import anndata

    adata, _ = small
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    assert (back.X != adata.X).nnz == 0
    assert back.uns["simulation"]["n_genes"] == SMALL["n_genes"]
    np.testing.assert_array_equal(back.varm["true_ambient"], adata.varm["true_ambient"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_cells": 0},
        {"n_cells": -5},
        {"n_cells": 2.5},
        {"n_cells": True},
        {"n_genes": 0},
        {"n_cell_types": 0},
        {"n_batches": 0},
        {"n_latent": 0},
        {"n_cells": 5, "n_cell_types": 2, "n_batches": 3},
        {"dispersion_levels": ()},
        {"dispersion_levels": (2.0, -1.0)},
        {"dispersion_levels": (float("nan"),)},
        {"dispersion_levels": "2"},
        {"ambient_fraction": -0.1},
        {"ambient_fraction": float("inf")},
        {"feature_scaling_concentration": 0.0},
        {"library_log_sd": -1.0},
        {"library_log_mean": float("nan")},
        {"library_log_mean": 50.0},
        {"batch_library_shift": "big"},
        {"seed": -1},
        {"seed": 1.5},
    ],
)
def test_bad_arguments_raise_data_error(kwargs):
    args = {"n_cells": 30, "n_genes": 10, "n_cell_types": 2, "n_batches": 2, **kwargs}
    with pytest.raises(DataError, match="simulate"):
        simulate(**args)


def test_edge_parameters_are_accepted():
    adata, truth = simulate(
        n_cells=20,
        n_genes=5,
        n_cell_types=1,
        n_batches=1,
        n_latent=1,
        ambient_fraction=0.0,
        feature_scaling_concentration=float("inf"),
        library_log_sd=0.0,
        seed=2,
    )
    assert adata.shape == (20, 5)
    assert (truth.ambient == 0).all() and (truth.feature_scaling == 1).all()
    assert np.allclose(truth.log_library, 8.0)
    json.dumps(adata.uns["simulation"])
