"""The validation ELBO and the held-out NLL are Monte-Carlo estimates, not plug-in values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn

from regvi import AmbientRegularizedSCVI
from regvi.datasets import simulate

from .test_multimodal import build, make_mdata


def _validation_batch(model):
    dataset = model._dataset()
    return dataset.in_order(model.validation_indices_)


def _sampled_elbos(model, batch, n_draws):
    """Independent single-sample ELBOs of the validation cells: the training-mode forward
    pass (every latent sampled) of a copy with every dropout rate set to 0."""
    module = copy.deepcopy(model.module)
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    module.train()
    with torch.no_grad():
        return np.array(
            [module.loss(batch, model.n_obs_training_).elbo.item() for _ in range(n_draws)]
        )


def _plug_in_elbo(model, batch):
    model.module.eval()
    with torch.no_grad():
        return model.module.loss(batch, model.n_obs_training_).elbo.item()


def _check_logged_elbo_is_monte_carlo(model, apart=5.0):
    batch = _validation_batch(model)
    draws = _sampled_elbos(model, batch, 200)
    expected, single_sd = draws.mean(), draws.std()
    logged = model.history["elbo_validation"].iloc[-1]
    plug_in = _plug_in_elbo(model, batch)
    # the test can tell the two apart: the plug-in value is optimistic by many MC errors
    assert expected - plug_in > apart * single_sd
    # the logged value is one draw of the Monte-Carlo ELBO (one pass over the cells)
    assert abs(logged - expected) < 4 * single_sd + 1e-3 * abs(expected)
    return logged, expected, single_sd, plug_in


@pytest.fixture(scope="module")
def rna_model():
    seed_everything(0, verbose=False)
    adata, _ = simulate(n_cells=600, n_genes=120, n_cell_types=3, n_batches=2, seed=1)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata, n_latent=5, n_hidden=32)
    model.train(max_epochs=20, batch_size=64, enable_progress_bar=False)
    return model


def test_validation_elbo_is_a_monte_carlo_elbo_rna(rna_model):
    """Validation switches dropout off but samples z, l, w and theta, with the training
    objective's global terms: the logged elbo_validation agrees with an independent
    Monte-Carlo estimate, not with the plug-in value (posterior means, median theta)."""
    _check_logged_elbo_is_monte_carlo(rna_model)


def test_validation_elbo_is_a_monte_carlo_elbo_multimodal():
    seed_everything(0, verbose=False)
    model = build(make_mdata(n_cells=300))
    model.train(max_epochs=20, batch_size=64, enable_progress_bar=False)
    _check_logged_elbo_is_monte_carlo(model, apart=3.0)


def test_reconstruction_error_samples_by_default_and_posterior_means_stay_deterministic(
    rna_model,
):
    model = rna_model
    indices = model.validation_indices_
    sampled = [model.get_reconstruction_error(indices=indices) for _ in range(30)]
    deterministic = model.get_reconstruction_error(indices=indices, sample=False)
    assert deterministic == model.get_reconstruction_error(indices=indices, sample=False)
    # the plug-in value is optimistic against the Monte-Carlo one
    assert np.mean(sampled) - deterministic > 3 * np.std(sampled)
    # and the Monte-Carlo one matches the independent estimate of the reconstruction term
    module = copy.deepcopy(model.module)
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    module.train()
    batch = _validation_batch(model)
    with torch.no_grad():
        reference = np.mean(
            [
                module.loss(batch, model.n_obs_training_).terms["reconstruction_loss"].item()
                for _ in range(100)
            ]
        )
    assert np.mean(sampled) == pytest.approx(reference, abs=4 * np.std(sampled))
    # posterior-mean outputs are unaffected
    z = model.get_latent_representation(indices=indices)
    np.testing.assert_array_equal(z, model.get_latent_representation(indices=indices))
    rho = model.get_normalized_expression(indices=indices)
    np.testing.assert_array_equal(rho, model.get_normalized_expression(indices=indices))
    assert not model.module.training


def test_multimodal_reconstruction_error_samples_by_default():
    seed_everything(0, verbose=False)
    model = build(make_mdata(n_cells=200))
    model.train(max_epochs=10, batch_size=50, enable_progress_bar=False)
    sampled = [model.get_reconstruction_error() for _ in range(10)]
    deterministic = model.get_reconstruction_error(sample=False)
    assert deterministic == model.get_reconstruction_error(sample=False)
    assert np.mean(sampled) - deterministic > 3 * np.std(sampled)
    per_modality = {
        m: model.get_reconstruction_error(modality=m, sample=False) for m in ("atac", "rna")
    }
    assert sum(per_modality.values()) == pytest.approx(deterministic, rel=1e-5)
