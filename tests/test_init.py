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


def _initial_total_ratio(model, modality=None):
    """Mean over (measured) cells of sum_g mu_ng / L_n at the posterior means, at init."""
    ratios = []
    with torch.no_grad():
        for batch in model._iterate(None, None, 256):
            inf = model.module.inference(batch)
            if modality is None:
                mu = model.module.generative(inf["z"], inf["library"]["library"], batch)["mu"]
                totals = batch["x"].row_sums()
            else:
                lib = inf["per_modality"][modality]["library"]["library"]
                mu = model.module.decode(modality, inf["z"], lib, batch)
                totals = batch[f"x_{modality}"].row_sums()
            measured = totals > 0
            ratios.append((mu.sum(dim=1) / totals)[measured])
    return torch.cat(ratios).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_expected_totals_match_the_observed_totals_rna(seed):
    """At initialisation a cell's expected total count matches its observed total: the
    decoder bias and the ambient share the mean (no 1.2x double count), and the library
    encoder's mean head starts at its bias (no random offset e^a of the whole scale)."""
    torch.manual_seed(seed)
    adata, _ = simulate(n_cells=300, n_genes=80, n_cell_types=3, n_batches=2, seed=seed)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata, n_latent=4, n_hidden=32)
    assert 0.8 < _initial_total_ratio(model) < 1.25


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sensitivity", [1.0, 0.2])
def test_initial_expected_totals_match_the_observed_totals_at_any_sensitivity(sensitivity, seed):
    """The library prior is centred at log s (s the sensitivity), so e^l starts at
    s L / e^m: the decoder and ambient initialisation are in units of e^m / s, and the
    initial expected total is the observed one whatever s (it was s times it)."""
    torch.manual_seed(seed)
    rna, atac, _ = simulate_multiome(n_cells=300, n_genes=60, n_peaks=80, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"rna": rna, "atac": atac})
    mdata.obs = rna.obs.copy()
    RegularizedMultimodalVI.setup_mudata(mdata, batch_key="batch")
    model = RegularizedMultimodalVI(
        mdata, n_latent=3, n_hidden=32, library_sensitivity={"atac": sensitivity, "rna": 1.0}
    )
    for modality in ("atac", "rna"):
        assert 0.8 < _initial_total_ratio(model, modality) < 1.25, modality
