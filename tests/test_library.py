"""The learned library size sees sequencing depth (both encoder modes, both models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from regvi import AmbientRegularizedSCVI
from regvi.datasets import simulate

from .test_multimodal import build, make_mdata


def _library_means(model, scale, key="x", modality=None):
    """Posterior means of l for every cell, with its counts multiplied by ``scale``."""
    out = []
    with torch.no_grad():
        for batch in model._iterate(None, None, 256):
            batch = dict(batch)
            batch[key] = batch[key].with_values(batch[key].values * scale)
            inf = model.module.inference(batch)
            lib = inf["library"] if modality is None else inf["per_modality"][modality]["library"]
            out.append(lib["mean"])
    return torch.cat(out).numpy()


@pytest.mark.parametrize("residual", [True, False])
def test_library_posterior_moves_with_depth_rna(residual):
    """q(l | 4x) is q(l | x) shifted by about log 4 (a little less: the prior, centred at
    the observed depths, holds it back; 0.83 log 4 here in both modes). Without the
    residual the encoder read only depth-normalised input, so E[l | 4x] = E[l | x] exactly;
    it now has a linear term in the centred observed log library."""
    seed_everything(0, verbose=False)
    adata, _ = simulate(n_cells=600, n_genes=100, n_cell_types=3, n_batches=2, seed=0)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(
        adata, n_latent=4, n_hidden=32, residual_library_encoder=residual
    )
    model.train(max_epochs=30, batch_size=64, lr=5e-3, enable_progress_bar=False)
    shift = _library_means(model, 4.0) - _library_means(model, 1.0)
    assert (shift > 0).all()
    assert 0.6 * np.log(4.0) < np.median(shift) < 1.2 * np.log(4.0)


def test_library_posterior_moves_with_depth_multimodal():
    seed_everything(0, verbose=False)
    model = build(make_mdata(n_cells=300), residual_library_encoder=False)
    model.train(max_epochs=30, batch_size=64, lr=5e-3, enable_progress_bar=False)
    for name in ("atac", "rna"):
        shift = _library_means(model, 4.0, f"x_{name}", name) - _library_means(
            model, 1.0, f"x_{name}", name
        )
        assert (shift > 0).all(), name
        assert 0.6 * np.log(4.0) < np.median(shift) < 1.2 * np.log(4.0), name
