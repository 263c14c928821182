"""RegularizedMultimodalVI: block order, missing-modality rule, attribution, CLI on real data."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import h5py
import lightning.pytorch as pl
import mudata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from regvi import DataError, RegularizedMultimodalVI
from regvi.config import validate_config
from regvi.datasets import simulate_multiome
from regvi.run.multimodal import model_arguments

from .conftest import shared_file

SMALL = {"n_latent": {"rna": 4, "atac": 3}, "n_hidden": 32}


def make_mdata(informative=("rna", "atac"), n_cells=300, seed=0, **simulation):
    """A MuData of simulated RNA + ATAC with the cells' obs at the top level; ``simulation``
    overrides :func:`simulate_multiome`'s sizes (default 60 genes, 80 peaks, 4 types)."""
    sizes = {"n_genes": 60, "n_peaks": 80, "n_cell_types": 4, **simulation}
    rna, atac, _ = simulate_multiome(n_cells=n_cells, informative=informative, seed=seed, **sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"rna": rna, "atac": atac})
    mdata.obs = rna.obs.copy()
    return mdata


def build(mdata, modalities=None, **kwargs):
    RegularizedMultimodalVI.setup_mudata(mdata, modalities=modalities)
    return RegularizedMultimodalVI(mdata, **{**SMALL, **kwargs})


_TRAINED: dict[str, RegularizedMultimodalVI] = {}


def trained(informative: str) -> RegularizedMultimodalVI:
    """A model trained on data where only ``informative`` carries cell types (cached)."""
    if informative not in _TRAINED:
        pl.seed_everything(0)
        model = build(make_mdata(informative=(informative,)))
        model.train(max_epochs=40, batch_size=100, lr=5e-3, enable_progress_bar=False)
        _TRAINED[informative] = model
    return _TRAINED[informative]


def test_latent_blocks_are_alphabetical_whatever_the_config_order():
    for order in (["rna", "atac"], ["atac", "rna"], {"rna": None, "atac": None}):
        model = build(make_mdata(n_cells=60), modalities=order)
        assert model.modality_names == ["atac", "rna"]
        assert model.latent_blocks == {"atac": slice(0, 3), "rna": slice(3, 7)}
        assert list(model.module.encoders) == ["atac", "rna"]
        joint = model.get_latent_representation()
        assert joint.shape == (60, 7)
        np.testing.assert_array_equal(model.get_latent_representation(modality="rna"), joint[:, 3:])
        # every decoder reads the full joint z
        for part in model.module.modalities.values():
            assert part.decoder.layers.linears[0].in_features == 7


def test_all_zero_rows_are_not_measured_and_masked():
    """Rule: row total 0 in a modality = not measured there; its terms vanish and its latent
    block is the prior N(0, I) (mean exactly 0)."""
    mdata = make_mdata(n_cells=80)
    empty = np.arange(10)
    X = mdata.mod["atac"].X.tolil()
    X[empty] = 0
    mdata.mod["atac"].X = sp.csr_matrix(X)
    model = build(mdata)
    z_atac = model.get_latent_representation(modality="atac")
    assert np.all(z_atac[empty] == 0) and np.all(np.abs(z_atac[10:]).sum(axis=1) > 0)
    batch = model._dataset()[empty]
    model.module.train()
    out = model.module.loss(batch, n_obs=80)
    inf = model.module.inference(batch)
    assert torch.all(inf["per_modality"]["atac"]["qz_var"] == 1)
    for term in ("reconstruction_loss_atac", "kl_z_atac", "kl_library_atac"):
        assert out.terms[term].item() == 0.0
    assert out.terms["reconstruction_loss_rna"].item() > 0
    assert torch.isfinite(out.loss)


def test_missing_cells_error_or_mask():
    mdata = make_mdata(n_cells=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        partial = mudata.MuData({"rna": mdata.mod["rna"], "atac": mdata.mod["atac"][10:].copy()})
    with pytest.raises(DataError, match="not shared: missing from modality 'atac'") as err:
        RegularizedMultimodalVI.setup_mudata(partial)
    assert "\n" not in str(err.value)
    RegularizedMultimodalVI.setup_mudata(partial, missing_cells="mask")
    model = RegularizedMultimodalVI(partial, **SMALL)
    z_atac = model.get_latent_representation(modality="atac")
    cells = model._cells(None)
    absent = ~cells.isin(partial.mod["atac"].obs_names)
    assert absent.sum() == 10 and np.all(z_atac[absent] == 0)


def test_bad_input_fails_with_one_line_naming_it():
    mdata = make_mdata(n_cells=40)
    with pytest.raises(DataError, match="modality 'protein' named in data.modalities") as err:
        RegularizedMultimodalVI.setup_mudata(mdata, modalities=["rna", "protein"])
    assert "\n" not in str(err.value)
    mdata.mod["atac"].X = mdata.mod["atac"].X * 0.5
    RegularizedMultimodalVI.setup_mudata(mdata)
    with pytest.raises(DataError, match="modality 'atac': counts in X are not whole") as err:
        RegularizedMultimodalVI(mdata)
    assert "\n" not in str(err.value)


def test_per_modality_options_from_config():
    cfg = validate_config(
        OmegaConf.create(
            {
                "model": {
                    "name": "multimodal",
                    "n_latent": 5,
                    "modalities": {
                        "rna": {"n_latent": 7, "ambient_covariate_keys": ["batch"]},
                        "atac": {"use_ambient": False, "library_sensitivity": 0.2},
                        "protein": {"n_latent": 2},
                    },
                }
            }
        )
    )
    kwargs, covariates = model_arguments(cfg, ["atac", "rna"])
    assert kwargs["n_latent"] == {"atac": 5, "rna": 7}
    assert kwargs["use_ambient"] == {"atac": False, "rna": True}
    assert kwargs["library_sensitivity"] == {"atac": 0.2}
    assert kwargs["n_hidden"] == 128
    assert covariates == {"rna": {"ambient_covariate_keys": ["batch"]}}


@pytest.mark.parametrize(("informative", "other"), [("rna", "atac"), ("atac", "rna")])
def test_attribution_follows_the_informative_modality(informative, other):
    """Only one modality carries cell types: its decoder depends on its own block."""
    model = trained(informative)
    table = model.get_modality_attribution()
    assert table.shape == (300, 4)
    assert list(table.columns.names) == ["decoder", "block"]
    own = table[(informative, informative)].mean()
    cross = table[(informative, other)].mean()
    assert own > 2 * cross, (own, cross)


def test_exact_and_finite_difference_attribution_agree():
    model = trained("rna")
    idx = np.arange(0, 300, 3)
    exact = model.get_modality_attribution(indices=idx, batch_size=64)
    approx = model.get_modality_attribution(indices=idx, method="finite_difference", batch_size=64)
    relative = ((exact - approx).abs() / exact).to_numpy()
    assert relative.max() < 1e-2
    assert list(exact.index) == list(model._cells(None)[idx])
    # cells given in another order come back in that order
    reverse = idx[::-1]
    flipped = model.get_modality_attribution(indices=reverse, batch_size=64)
    np.testing.assert_allclose(flipped.to_numpy(), exact.to_numpy()[::-1], rtol=1e-5)
    assert list(flipped.index) == list(exact.index[::-1])
    latent = model.get_latent_representation()
    np.testing.assert_allclose(
        model.get_latent_representation(indices=reverse), latent[reverse], atol=1e-6
    )


def test_save_load_round_trip(tmp_path):
    model = trained("rna")
    model.save(tmp_path / "model")
    loaded = RegularizedMultimodalVI.load(tmp_path / "model", mdata=model.mdata)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    assert loaded.latent_blocks == model.latent_blocks


def test_two_layer_encoders_take_hidden_dropout_per_modality(tmp_path):
    """With ``n_layers=2`` each modality's z encoder drops its input features at
    ``dropout_rate`` and its hidden units at its own ``hidden_dropout_rate``; the rates survive
    training, save and load."""
    pl.seed_everything(0)
    model = build(
        make_mdata(n_cells=200),
        n_layers=2,
        dropout_rate=0.1,
        hidden_dropout_rate={"rna": 0.4, "atac": 0.0},
    )
    model.train(max_epochs=2, batch_size=100, enable_progress_bar=False)

    def rates(m: RegularizedMultimodalVI) -> dict[str, list[float]]:
        return {
            name: [getattr(d, "p", 0.0) for d in m.module.encoders[name].layers.dropouts]
            for name in m.modality_names
        }

    assert rates(model) == {"atac": [0.1, 0.0], "rna": [0.1, 0.4]}
    assert np.isfinite(model.get_latent_representation()).all()
    model.save(tmp_path / "model")
    loaded = RegularizedMultimodalVI.load(tmp_path / "model", mdata=model.mdata)
    assert rates(loaded) == rates(model)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )


def test_real_multiome_trains_end_to_end_through_the_cli(tmp_path):
    path = shared_file("multiome_pbmc_muon_1000cells.h5mu")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "regvi.cli.app",
            "train",
            "model=multimodal",
            "data=multiome",
            f"data.path={path}",
            "data.modalities=[rna,atac]",
            "logger=none",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result = mudata.read_h5mu(run_dir / "results.h5mu")
    assert result.obsm["X_regvi"].shape == (1000, 30)  # atac 10 + rna 20, atac first
    np.testing.assert_array_equal(result.obsm["X_regvi"][:, :10], result.obsm["X_regvi_atac"])
    empty = np.asarray(result.mod["atac"].X.sum(axis=1)).ravel() == 0
    assert empty.sum() > 0 and np.all(result.obsm["X_regvi_atac"][empty] == 0)
    assert np.array_equal(result.obs["regvi_measured_atac"].to_numpy(), ~empty)
    for decoder in ("atac", "rna"):
        for block in ("atac", "rna"):
            assert np.isfinite(result.obs[f"regvi_attr_{decoder}_z_{block}"]).all()
    assert result.mod["atac"].layers["regvi_normalized"].shape == (1000, 174)
    for png in ("umap.png", "attribution.png"):
        assert (run_dir / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    loaded = RegularizedMultimodalVI.load(run_dir / "model", mdata=result)
    assert loaded.modality_names == ["atac", "rna"]
    # the normalized layers were streamed (row-chunked datasets) and equal the in-memory values
    with h5py.File(run_dir / "results.h5mu") as f:
        assert f["mod/rna/layers/regvi_normalized"].chunks is not None
    for m in ("atac", "rna"):
        rows = result.obs_names.get_indexer(result.mod[m].obs_names)
        in_memory = loaded.get_normalized_expression(m)[rows]
        np.testing.assert_allclose(
            result.mod[m].layers["regvi_normalized"], in_memory, rtol=1e-5, atol=1e-5
        )
