"""Model checks of both models (issue 20, item 3): posterior predictive samples and check,
inferred library size, per-feature reconstruction error, per-dimension KL of the latent, and
the posterior predictive check figure of a `regvi train` run. Trained on data simulated from
the model's own generative process."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from regvi.datasets import simulate, simulate_multiome
from regvi.errors import DataError
from regvi.model import AmbientRegularizedSCVI, RegularizedMultimodalVI
from regvi.plots import log_pearson

from .conftest import MODEL_ARGS, compose_train_config

TRAIN = {"max_epochs": 60, "batch_size": 128, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def rna_model():
    adata, truth = simulate(n_cells=800, n_genes=120, n_cell_types=4, n_batches=2, seed=1)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata, n_latent=6, n_hidden=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**TRAIN)
    return model, adata, truth


@pytest.fixture(scope="module")
def multimodal_model():
    import mudata

    rna, atac, _ = simulate_multiome(
        n_cells=600, n_genes=80, n_peaks=100, n_cell_types=3, n_batches=2, seed=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = mudata.MuData({"rna": rna, "atac": atac})
        mdata.obs = rna.obs.copy()
        RegularizedMultimodalVI.setup_mudata(mdata, batch_key="batch")
        model = RegularizedMultimodalVI(mdata, n_latent={"rna": 6, "atac": 4}, n_hidden=64)
        model.train(**TRAIN)
    return model, mdata


def test_rna_posterior_predictive_means_match_the_data(rna_model):
    model, adata, _ = rna_model
    counts = adata.X.toarray()
    draws = model.posterior_predictive_sample(n_samples=3)
    assert draws.shape == (*counts.shape, 3) and draws.dtype == np.float32
    assert (draws >= 0).all() and np.array_equal(draws, np.round(draws))
    one = model.posterior_predictive_sample(indices=np.arange(10))
    assert one.shape == (10, counts.shape[1])
    # acceptance: per-gene means, log scale, Pearson > 0.95
    assert log_pearson(counts.mean(0), draws.mean(axis=(0, 2))) > 0.95
    table = model.posterior_predictive_check(n_samples=2)
    assert set(table["library"]) == {"batch_0", "batch_1"}
    assert set(table["statistic"]) == {"mean", "variance", "zero_fraction"}
    for stat in ("mean", "variance"):
        part = table[table["statistic"] == stat]
        assert log_pearson(part["observed"], part["predicted"]) > 0.9, stat
    zeros = table[table["statistic"] == "zero_fraction"]
    assert np.corrcoef(zeros["observed"], zeros["predicted"])[0, 1] > 0.9
    # the observed side is exact: the data's own per-library means
    in_batch = (adata.obs["batch"] == "batch_0").to_numpy()
    mean0 = table[(table["statistic"] == "mean") & (table["library"] == "batch_0")]
    np.testing.assert_allclose(mean0["observed"], counts[in_batch].mean(0), rtol=1e-6)
    with pytest.raises(DataError, match="n_samples"):
        model.posterior_predictive_sample(n_samples=0)


def test_rna_library_kl_and_per_gene_error(rna_model):
    model, adata, truth = rna_model
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    library = model.get_latent_library_size()
    assert library.shape == totals.shape and (library > 0).all()
    assert log_pearson(library, totals) > 0.9
    assert 0.7 < np.median(library / totals) < 1.4  # count units, not relative ones
    kl = model.get_latent_kl()
    assert kl.shape == (6,) and (kl >= 0).all()
    per_cell = model.get_latent_kl(per_dimension=False)
    assert per_cell.shape == (adata.n_obs,)
    np.testing.assert_allclose(per_cell.mean(), kl.sum(), rtol=1e-5)
    # the per-gene errors decompose the scalar one (deterministic: posterior means)
    scalar = model.get_reconstruction_error(sample=False)
    per_gene = model.get_reconstruction_error(sample=False, per_feature=True)
    assert list(per_gene.index) == list(adata.var_names)
    np.testing.assert_allclose(per_gene.sum(), scalar, rtol=1e-4)
    # highly expressed genes carry more NLL than rare ones
    means = adata.X.toarray().mean(0)
    assert np.corrcoef(np.log(means + 1e-3), per_gene.to_numpy())[0, 1] > 0.5


def test_multimodal_model_checks_per_modality(multimodal_model):
    model, mdata = multimodal_model
    draws = model.posterior_predictive_sample(n_samples=2)
    assert set(draws) == {"atac", "rna"}
    for m, values in draws.items():
        counts = mdata.mod[m].X.toarray()
        assert values.shape == (*counts.shape, 2)
        assert log_pearson(counts.mean(0), values.mean(axis=(0, 2))) > 0.95, m
    assert model.posterior_predictive_sample(modality="atac").shape == mdata.mod["atac"].shape
    libraries = model.get_latent_library_size()
    for m, values in libraries.items():
        totals = np.asarray(mdata.mod[m].X.sum(axis=1)).ravel()
        assert log_pearson(values, totals) > 0.9, m
    kl = model.get_latent_kl()
    assert kl.shape == (10,) and (kl >= 0).all()
    scalar = model.get_reconstruction_error(sample=False)
    per_feature = model.get_reconstruction_error(sample=False, per_feature=True)
    assert set(per_feature) == {"atac", "rna"}
    total = sum(s.sum() for s in per_feature.values())
    np.testing.assert_allclose(total, scalar, rtol=1e-4)
    rna_only = model.get_reconstruction_error(sample=False, per_feature=True, modality="rna")
    np.testing.assert_allclose(rna_only, per_feature["rna"])
    table = model.posterior_predictive_check()
    assert set(table["modality"]) == {"atac", "rna"}
    with pytest.raises(DataError, match="unknown modality"):
        model.get_latent_library_size(modality="protein")


@pytest.mark.parametrize("model", ["rna", "multimodal"])
def test_train_writes_the_posterior_predictive_check_figure(tmp_path, model):
    from regvi.run import layout
    from regvi.run import train as run_train

    overrides = [
        *MODEL_ARGS[model],
        "data.simulate.n_cells=200",
        "data.simulate.n_genes=30",
        "data.batch_size=64",
        "model.n_hidden=16",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    cfg = compose_train_config(overrides)
    run_dir = run_train(cfg, tmp_path / "run")
    figure = run_dir / layout.FIGURES_DIR / layout.PPC_FIGURE
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
