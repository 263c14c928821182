"""The Python API: train, outputs, save/load, new data."""

import math

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from regvi import AmbientRegularizedSCVI, DataError, RegviError
from regvi.datasets import simulate

from .conftest import shared_file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adata, _ = simulate(n_cells=600, n_genes=120, n_cell_types=3, n_batches=2, seed=1)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = AmbientRegularizedSCVI(adata, n_latent=5, n_hidden=32)
    model.train(max_epochs=15, batch_size=64, enable_progress_bar=False)
    return adata, model


def test_outputs_have_expected_shapes(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (600, 5) and np.isfinite(z).all()
    norm = model.get_normalized_expression(library_size=1e4)
    np.testing.assert_allclose(norm.sum(1), 1e4, rtol=1e-4)
    subset = model.get_normalized_expression(gene_list=["gene_3", "gene_7"], library_size=1e4)
    np.testing.assert_allclose(subset, norm[:, [3, 7]], rtol=1e-5)
    mu = model.get_normalized_expression(library_size="latent")
    assert mu.shape == norm.shape and (mu > 0).all()
    history = model.history
    assert {"loss_train", "loss_validation", "kl_z_train", "dispersion_penalty_train"} <= set(
        history.columns
    )
    assert history["kl_weight"].iloc[-1] == pytest.approx(1.0)


def test_early_stopping_stops_a_run_that_stopped_improving():
    adata, _ = simulate(n_cells=300, n_genes=40, n_cell_types=2, n_batches=2, seed=2)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata, n_latent=3, n_hidden=16)
    # min_delta per feature of 1 count: only the first few epochs improve by that much
    model.train(
        max_epochs=200,
        batch_size=64,
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_min_delta_per_feature=1.0,
        enable_progress_bar=False,
    )
    assert len(model.history) < 200


@pytest.mark.parametrize("kind", ["rna", "multimodal"])
def test_early_stopping_waits_for_the_kl_warmup_and_restores_the_best_epoch(kind, tmp_path):
    """Patience counts only once the KL weight is 1 (an improvement threshold no epoch meets
    used to stop the run within the warm-up), and the model ends with the weights of the
    post-warm-up epoch with the lowest validation ELBO, not those of the last epoch."""
    import torch

    from regvi.train import ElboEarlyStopping

    if kind == "rna":
        adata, _ = simulate(n_cells=300, n_genes=40, n_cell_types=2, n_batches=2, seed=2)
        AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
        model = AmbientRegularizedSCVI(adata, n_latent=3, n_hidden=16)
    else:
        from .test_multimodal import build, make_mdata

        model = build(make_mdata(n_cells=300, seed=2))
    model.train(
        max_epochs=40,
        batch_size=64,
        kl_warmup_fraction=0.5,
        early_stopping=True,
        early_stopping_patience=3,
        early_stopping_min_delta_per_feature=1.0,  # no epoch improves by a count per feature
        checkpoint_dir=tmp_path,
        enable_progress_bar=False,
    )
    history = model.history
    after_warmup = history[history["kl_weight"] >= 1.0]
    first = int(after_warmup.index[0])
    assert first >= 19  # the warm-up ran to its end: 20 of the 40 planned epochs
    # the first epoch at weight 1 sets the bar, then 3 epochs of patience
    assert len(history) == first + 1 + 3
    stopper = next(c for c in model.trainer_.callbacks if isinstance(c, ElboEarlyStopping))
    assert stopper.best_epoch == int(after_warmup["elbo_validation"].idxmin())
    weights = model.module.state_dict()
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    last = {k.removeprefix("module."): v for k, v in last["state_dict"].items()}
    best = stopper.state_dict()["best_state"]
    assert all(torch.equal(weights[k].cpu(), best[k.join(["module.", ""])].cpu()) for k in weights)
    if stopper.best_epoch != len(history) - 1:
        assert any(not torch.equal(weights[k].cpu(), last[k]) for k in weights)


def test_save_load_reproduces_latent(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    with pytest.raises(RegviError, match="already holds"):
        model.save(tmp_path / "m")
    loaded = AmbientRegularizedSCVI.load(tmp_path / "m", adata)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    no_data = AmbientRegularizedSCVI.load(tmp_path / "m")
    np.testing.assert_allclose(
        no_data.get_latent_representation(adata), model.get_latent_representation(), atol=1e-6
    )


def test_models_saved_in_the_earlier_weight_layout_still_load(trained, tmp_path):
    import json

    import torch

    adata, model = trained
    path = model.save(tmp_path / "m")
    # format 1: first layers stored as nn.Linear does, (out, in), and no "format" key
    state = torch.load(path / "model.pt", weights_only=True)
    old = {k: v.t() if k.endswith("layers.linears.0.weight") else v for k, v in state.items()}
    torch.save(old, path / "model.pt")
    meta = json.loads((path / "model.json").read_text())
    assert meta.pop("format") == 2
    # saved before hidden_dropout_rate existed: its hidden layers had dropout_rate
    del meta["init_params"]["hidden_dropout_rate"]
    (path / "model.json").write_text(json.dumps(meta))
    loaded = AmbientRegularizedSCVI.load(path, adata)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    assert loaded.init_params["hidden_dropout_rate"] == meta["init_params"]["dropout_rate"]
    rates = [d.p for d in loaded.module.z_encoder.layers.dropouts]
    assert rates == [meta["init_params"]["dropout_rate"]] * 2
    meta["format"] = 99
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RegviError, match="newer regvi"):
        AmbientRegularizedSCVI.load(path, adata)


def test_new_data_is_matched_by_gene_name_and_checked(trained):
    adata, model = trained
    z = model.get_latent_representation()
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    np.testing.assert_allclose(model.get_latent_representation(shuffled), z, atol=1e-5)
    with pytest.raises(DataError, match="10 of the model's 120 genes are missing"):
        model.get_latent_representation(adata[:, 10:].copy())
    unseen = adata.copy()
    unseen.obs["batch"] = unseen.obs["batch"].cat.rename_categories({"batch_0": "new_lane"})
    with pytest.raises(DataError, match="'new_lane' not seen"):
        model.get_latent_representation(unseen)


def test_model_needs_setup_and_rejects_unknown_arguments():
    adata, _ = simulate(n_cells=60, n_genes=20, n_cell_types=2, n_batches=2, seed=0)
    with pytest.raises(RegviError, match="setup_anndata"):
        AmbientRegularizedSCVI(adata)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(RegviError, match="n_latnet"):
        AmbientRegularizedSCVI(adata, n_latnet=3)
    with pytest.raises(DataError, match="larger than the 54 training cells"):
        AmbientRegularizedSCVI(adata).train(max_epochs=1, batch_size=500)


def test_real_pbmc_labels_separate_better_than_technologies():
    adata = ad.read_h5ad(shared_file("pbmc_3tech_symphony_1500.h5ad"))
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = AmbientRegularizedSCVI(adata)
    model.train(max_epochs=40, batch_size=128, enable_progress_bar=False)
    z = model.get_latent_representation()
    label_sil = silhouette_score(z, adata.obs["cell_type"])
    batch_sil = silhouette_score(z, adata.obs["batch"])
    assert label_sil > batch_sil, (label_sil, batch_sil)
    held_out = model.history["elbo_validation"]
    assert held_out.iloc[-1] < 0.9 * held_out.iloc[0]


def _diverging_run(match: str, **train_kwargs) -> tuple[AmbientRegularizedSCVI, ad.AnnData]:
    """A model trained at lr 1e6, which diverges within the first epoch; checks that
    training stops with a NonFiniteLossError matching ``match``."""
    from regvi.errors import NonFiniteLossError

    adata, _ = simulate(n_cells=600, n_genes=60, n_batches=2, seed=0, return_rho=False)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI(adata)
    with pytest.raises(NonFiniteLossError, match=match):
        model.train(
            max_epochs=5,
            batch_size=64,
            lr=1e6,
            accelerator="cpu",
            enable_progress_bar=False,
            **train_kwargs,
        )
    return model, adata


def test_non_finite_loss_on_the_cpu_stops_before_its_update_reaches_the_weights():
    model, _ = _diverging_run(r"at epoch \d+ \(step \d+\)")
    for name, parameter in model.module.named_parameters():
        assert np.isfinite(parameter.detach().numpy()).all(), name


def test_deferred_finite_check_stops_within_its_window_and_names_the_term():
    """The accelerator path (flags kept on the device, read every n steps), run on the CPU."""
    _, adata = _diverging_run(
        r"steps \d+-\d+\); non-finite term\(s\): \w", finite_check_every_n_steps=4
    )
    # and a healthy run is not stopped by it
    model = AmbientRegularizedSCVI(adata)
    model.train(
        max_epochs=2,
        batch_size=64,
        accelerator="cpu",
        enable_progress_bar=False,
        finite_check_every_n_steps=4,
    )
    assert np.isfinite(model.history["loss_train"]).all()


def test_fetching_several_minibatches_at_once_trains_the_same_model():
    """A fetch of k minibatches is k optimiser steps on the same minibatches in the same
    order: the trained weights and the history equal a one-minibatch-a-fetch run's, and
    ``max_steps`` stops at the step, not at the end of a fetch."""
    import torch

    adata, _ = simulate(n_cells=500, n_genes=60, n_batches=2, seed=3, return_rho=False)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    runs = {}
    for per_fetch in (1, 4):
        torch.manual_seed(0)
        runs[per_fetch] = _small_run(adata, max_epochs=3, minibatches_per_fetch=per_fetch)
    assert runs[4].trainer_.num_training_batches == 4  # 450 cells: 15 minibatches, 4 fetches
    assert runs[1].trainer_.global_step == runs[4].trainer_.global_step == 45
    for (name, one), (_, four) in zip(
        runs[1].module.state_dict().items(), runs[4].module.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-6, msg=name)
    np.testing.assert_allclose(
        runs[1].history.to_numpy(dtype=float), runs[4].history.to_numpy(dtype=float), rtol=1e-5
    )
    model = _small_run(adata, max_epochs=3, max_steps=6, minibatches_per_fetch=4)
    assert model.trainer_.global_step == 6


def _small_run(adata: ad.AnnData, batch_size: int = 32, **train_kwargs) -> AmbientRegularizedSCVI:
    """A small model (4 latent, 16 hidden) trained on the CPU without a progress bar."""
    model = AmbientRegularizedSCVI(adata, n_latent=4, n_hidden=16)
    model.train(batch_size=batch_size, accelerator="cpu", enable_progress_bar=False, **train_kwargs)
    return model


@pytest.mark.parametrize("min_interval_s,expected_writes", [(0.0, 1 + 4), (3600.0, 2)])
def test_checkpoints_are_written_at_most_once_per_interval_and_at_the_end(
    tmp_path, monkeypatch, min_interval_s, expected_writes
):
    import torch

    from regvi.train.callbacks import EpochCheckpoint

    writes = []
    save = EpochCheckpoint.save

    def counted(self, trainer):
        writes.append(trainer.current_epoch)
        save(self, trainer)

    monkeypatch.setattr(EpochCheckpoint, "save", counted)
    adata, _ = simulate(n_cells=300, n_genes=40, n_batches=2, seed=0, return_rho=False)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = _small_run(
        adata,
        batch_size=64,
        max_epochs=4,
        checkpoint_dir=tmp_path,
        checkpoint_min_interval_s=min_interval_s,
    )
    assert len(writes) == expected_writes  # before the first step, then per epoch / at the end
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 3 and state["global_step"] == model.trainer_.global_step


def test_dispersion_prior_jacobian_option_reaches_the_dispersion_of_both_models():

    adata, _ = simulate(n_cells=60, n_genes=20, n_cell_types=2, n_batches=1, seed=0)
    AmbientRegularizedSCVI.setup_anndata(adata)
    for value in (True, False):
        model = AmbientRegularizedSCVI(adata, n_hidden=8, dispersion_prior_jacobian=value)
        assert model.module.rna.dispersion.jacobian is value
    from .test_multimodal import build, make_mdata

    model = build(make_mdata(n_cells=60), dispersion_prior_jacobian={"atac": False})
    assert model.module.modalities["atac"].dispersion.jacobian is False
    assert model.module.modalities["rna"].dispersion.jacobian is True


def test_decoder_norm_option_reaches_the_decoders_of_both_models_only():
    from torch import nn

    from .test_multimodal import build, make_mdata

    def kinds(layers) -> set[type]:
        return {type(norm) for norm in layers.norms}

    adata, _ = simulate(n_cells=60, n_genes=20, n_cell_types=2, n_batches=1, seed=0)
    AmbientRegularizedSCVI.setup_anndata(adata)
    model = AmbientRegularizedSCVI(adata, n_hidden=8, norm="layer", decoder_norm="batch")
    assert kinds(model.module.rna.decoder.layers) == {nn.BatchNorm1d}
    assert kinds(model.module.z_encoder.layers) == {nn.LayerNorm}
    model = AmbientRegularizedSCVI(adata, n_hidden=8, norm="batch", decoder_norm=None)
    assert kinds(model.module.rna.decoder.layers) == {nn.BatchNorm1d}  # None: as norm
    model = build(make_mdata(n_cells=60), norm="layer", decoder_norm={"atac": "batch"})
    assert kinds(model.module.modalities["atac"].decoder.layers) == {nn.BatchNorm1d}
    assert kinds(model.module.modalities["rna"].decoder.layers) == {nn.LayerNorm}
    assert kinds(model.module.encoders["atac"].layers) == {nn.LayerNorm}


@pytest.mark.parametrize("kind", ["rna", "multimodal"])
def test_batchnorm_trains_when_the_last_minibatch_would_hold_one_cell(kind):
    # 65 training cells in minibatches of 32: the third would hold one cell, which
    # BatchNorm cannot normalise; it joins the second instead
    if kind == "rna":
        adata, _ = simulate(n_cells=65, n_genes=20, n_cell_types=2, n_batches=2, seed=0)
        AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
        model = AmbientRegularizedSCVI(adata, n_hidden=8, norm="batch")
    else:
        from .test_multimodal import build, make_mdata

        model = build(make_mdata(n_cells=65), norm="batch")
    model.train(
        max_epochs=2, batch_size=32, train_size=1.0, accelerator="cpu", enable_progress_bar=False
    )
    assert model.trainer_.global_step == 2 * 2
    assert np.isfinite(model.history["elbo_train"]).all()


def test_hidden_dropout_rises_with_the_encoder_input_weights_per_cell(tmp_path):
    """By default the z encoder's hidden-unit dropout is chosen when the model is built: 0.1
    while (n_hidden / 128) x genes per cell is at most 1, 0.3 at 4, 0.7 from 16 on,
    log-linear between, in both models and per modality; its input dropout stays
    ``dropout_rate``. A given rate is kept, and a saved model rebuilds with the rate it was
    trained with."""
    from regvi.model.defaults import hidden_dropout_for

    from .test_multimodal import build, make_mdata

    ratios = {(128, 100, 200): 0.1, (128, 200, 200): 0.1, (128, 400, 200): 0.2}
    ratios |= {(128, 800, 200): 0.3, (128, 1600, 200): 0.5, (128, 3200, 200): 0.7}
    ratios |= {(128, 9000, 200): 0.7, (512, 100, 200): 0.2, (512, 800, 200): 0.7}
    ratios |= {(128, 1131, 200): 0.3 + 0.2 * math.log2(1131 / 800)}
    ratios |= {(64, 200, 2000): 0.1, (32, 400, 100): 0.1}
    for (n_hidden, n_genes, n_cells), expected in ratios.items():
        assert hidden_dropout_for(n_hidden, n_genes, n_cells) == pytest.approx(expected)

    def rates(encoder) -> list[float]:
        return [getattr(d, "p", 0.0) for d in encoder.layers.dropouts]

    adata, _ = simulate(n_cells=60, n_genes=30, n_cell_types=2, n_batches=1, seed=0)
    AmbientRegularizedSCVI.setup_anndata(adata)
    # 30 genes on 60 cells: 0.5 genes per cell
    for n_hidden, expected in ((64, 0.1), (256, 0.1), (512, 0.2), (1024, 0.3)):
        model = AmbientRegularizedSCVI(adata, n_hidden=n_hidden)
        assert rates(model.module.z_encoder) == pytest.approx([0.1, expected])
        assert model.init_params["hidden_dropout_rate"] == pytest.approx(expected)
    given = AmbientRegularizedSCVI(adata, n_hidden=1024, hidden_dropout_rate=0.05)
    assert rates(given.module.z_encoder) == pytest.approx([0.1, 0.05])
    model.train(max_epochs=1, batch_size=30, enable_progress_bar=False)
    # the rate was chosen for the training data, not for the data the model is loaded with
    # (on 4x the cells it would be 0.1)
    more = ad.concat([adata] * 4, index_unique="-", uns_merge="first")
    loaded = AmbientRegularizedSCVI.load(model.save(tmp_path / "rna"), more)
    assert rates(loaded.module.z_encoder) == pytest.approx([0.1, 0.3])

    mdata = make_mdata(n_cells=60)
    n_features = {m: mdata.mod[m].n_vars for m in ("rna", "atac")}
    multimodal = build(mdata, n_layers=2, n_hidden={"rna": 512, "atac": 64})
    for m, n_hidden in (("rna", 512), ("atac", 64)):
        expected = hidden_dropout_for(n_hidden, n_features[m], 60)
        assert rates(multimodal.module.encoders[m]) == pytest.approx([0.1, expected])
    assert multimodal.init_params["hidden_dropout_rate"]["rna"] > 0.1  # many features a cell


def test_kl_warmup_length_comes_from_the_built_trainer():
    """A Trainer that takes fewer steps than the data suggest (here: half of each epoch's
    batches) still ends its warm-up at weight 1: the length is counted from the Trainer."""
    adata, _ = simulate(n_cells=256, n_genes=30, n_cell_types=2, n_batches=1, seed=5)
    AmbientRegularizedSCVI.setup_anndata(adata)
    model = AmbientRegularizedSCVI(adata, n_latent=2, n_hidden=8)
    model.train(
        max_epochs=2,
        batch_size=32,
        train_size=1.0,
        kl_warmup_fraction=1.0,
        minibatches_per_fetch=1,
        limit_train_batches=0.5,
        enable_progress_bar=False,
    )
    plan = model.trainer_.lightning_module
    assert plan.kl_warmup_steps == model.trainer_.global_step == 8  # 4 of 8 steps, twice
    assert model.history["kl_weight"].tolist() == pytest.approx([0.5, 1.0])


def test_a_loaded_model_trains_in_train_mode(trained, tmp_path):
    """``load`` (and ``train``) leave the module in eval mode, and Lightning (2.2+) does not
    switch it back: training it again (or mapping a query onto it) must still train with
    dropout on and the posteriors sampled."""
    import lightning.pytorch as pl

    adata, model = trained
    model.save(tmp_path / "m")
    loaded = AmbientRegularizedSCVI.load(tmp_path / "m", adata)
    assert not loaded.module.training

    class ModeProbe(pl.Callback):
        def __init__(self):
            self.modes = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.modes.append(all(m.training for m in pl_module.modules()))

    query = adata[:200].copy()
    query.obs["batch"] = "batch_new"  # a new library: mapping learns its rows
    quiet = {"max_epochs": 1, "batch_size": 64, "enable_progress_bar": False}
    for fit in (
        lambda probe: loaded.train(callbacks=[probe], **quiet),
        lambda probe: model.train(callbacks=[probe], **quiet),
        lambda probe: loaded.map_query(query, callbacks=[probe], **quiet),
    ):
        probe = ModeProbe()
        fit(probe)
        assert probe.modes and all(probe.modes), probe.modes
    assert not loaded.module.training  # inference afterwards runs in eval mode
