"""Data-dependent initialisation: where the model starts, for both models."""

from __future__ import annotations

import warnings

import mudata
import numpy as np
import pandas as pd
import pytest
import torch

from regvi import AmbientRegularizedSCVI, RegularizedMultimodalVI
from regvi.datasets import simulate, simulate_multiome
from regvi.module.init import cell_totals


def _two_ambient_keys(n_cells=400, seed=0):
    adata, _ = simulate(n_cells=n_cells, n_genes=80, n_cell_types=3, n_batches=2, seed=seed)
    rng = np.random.default_rng(seed)
    adata.obs["lane"] = pd.Categorical(rng.choice(["a", "b", "c"], size=n_cells))
    return adata


def _normalised_gene_means(X, reference_log_library):
    totals = cell_totals(X)
    scale = np.exp(reference_log_library) / np.maximum(totals, 1.0)
    return np.asarray(X.multiply(scale[:, None]).mean(axis=0)).ravel()


def _mean_per_cell_ambient(part, codes):
    with torch.no_grad():
        return part.ambient.per_cell(torch.as_tensor(codes)).mean(dim=0).numpy()


def test_initial_ambient_with_two_keys_sums_to_the_gene_fraction():
    """A cell's background is the sum over its ambient keys' profiles: with k keys each
    profile starts at fraction/k of its category's mean, so the per-cell sum is 0.2 x mean
    (it was k x 0.2 x mean)."""
    adata = _two_ambient_keys()
    AmbientRegularizedSCVI.setup_anndata(
        adata, ambient_covariate_keys=["batch", "lane"], library_size_key="batch"
    )
    model = AmbientRegularizedSCVI(adata, n_latent=4, n_hidden=16)
    X, codes = model._data_cache
    assert codes["ambient"].shape[1] == 2
    part = model.module.rna
    gene_means = _normalised_gene_means(X, float(part.library.global_log_mean))
    ratio = _mean_per_cell_ambient(part, codes["ambient"]) / gene_means
    assert np.median(ratio) == pytest.approx(0.2, rel=0.05)

    # the multimodal model shares the initialisation
    rna, atac, _ = simulate_multiome(n_cells=300, n_genes=60, n_peaks=80, n_batches=2, seed=0)
    rna.obs["lane"] = pd.Categorical(np.random.default_rng(0).choice(["a", "b"], size=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"rna": rna, "atac": atac})
    mdata.obs = rna.obs.copy()
    RegularizedMultimodalVI.setup_mudata(
        mdata, ambient_covariate_keys=["batch", "lane"], library_size_key="batch"
    )
    mm = RegularizedMultimodalVI(mdata, n_latent=3, n_hidden=16)
    matrices, mm_codes, _ = mm._data_cache
    part = mm.module.modalities["rna"]
    gene_means = _normalised_gene_means(matrices["rna"], float(part.library.global_log_mean))
    ratio = _mean_per_cell_ambient(part, mm_codes["rna/ambient"]) / gene_means
    assert np.median(ratio) == pytest.approx(0.2, rel=0.05)
