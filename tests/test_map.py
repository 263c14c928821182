"""Query mapping (issue 20, item 2): a library left out of training is mapped onto the
reference (`map_query`, `regvi map`): its cells get their planted types by kNN label
transfer, its planted ambient profile is recovered, the reference is untouched, known
libraries keep their parameters, and bad queries fail with one error line."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from regvi.datasets import simulate, simulate_multiome
from regvi.errors import ConfigError, DataError
from regvi.metrics import knn_label_transfer
from regvi.model import AmbientRegularizedSCVI

from .conftest import MODEL_ARGS, RESULTS, compose_train_config, read_results


def _cli(args: list) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "regvi.cli.app", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_knn_label_transfer_votes_and_uncertainty():
    reference = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2], [9.0]])
    labels = pd.Series(["a", "a", "a", "b", "b", "b", None])  # an unlabelled cell is ignored
    query = np.array([[0.05], [5.05], [2.6]])
    predicted, uncertainty = knn_label_transfer(reference, labels, query, k=3)
    assert list(predicted) == ["a", "b", "a"]
    np.testing.assert_allclose(uncertainty, [0.0, 0.0, 1 / 3])
    # a 2-2 tie goes to the label of the nearest neighbour
    predicted, uncertainty = knn_label_transfer(reference[1:5], labels[1:5], [[2.7]], k=4)
    assert list(predicted) == ["b"] and uncertainty[0] == 0.5
    with pytest.raises(DataError, match="dimensions"):
        knn_label_transfer(reference, labels, np.zeros((2, 2)))


def test_map_run_places_a_left_out_library(tmp_path):
    """Acceptance: train without batch_3, map batch_3 (and 100 cells of the known batch_0)
    with the library function behind `regvi map`."""
    from omegaconf import OmegaConf

    from regvi.config import TrainConfig
    from regvi.run import layout
    from regvi.run.map import map_query_run
    from regvi.run.pipeline import train

    adata, truth = simulate(n_cells=1600, n_genes=200, n_cell_types=5, n_batches=4, seed=0)
    in_ref = (adata.obs["batch"] != "batch_3").to_numpy()
    known = np.flatnonzero(adata.obs["batch"] == "batch_0")[:100]
    query_cells = np.concatenate([np.flatnonzero(~in_ref), known])
    adata[in_ref].copy().write_h5ad(tmp_path / "ref.h5ad")
    query = adata[query_cells].copy()
    query.obs = query.obs.drop(columns="cell_type")  # the query's types are unknown
    query.write_h5ad(tmp_path / "query.h5ad")

    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.path = str(tmp_path / "ref.h5ad")
    cfg.covariates.batch_key = "batch"  # decoder conditioned on it: new one-hot columns
    cfg.data.labels_key = "cell_type"
    cfg.model.n_latent, cfg.model.n_hidden = 8, 64
    cfg.trainer.max_epochs = 60
    cfg.trainer.enable_progress_bar = False
    cfg.outputs.figures = False
    cfg.logger.name = "none"
    pl.seed_everything(0, verbose=False)
    run = train(cfg, tmp_path / "run")
    weights = run / layout.MODEL_DIR / layout.MODEL_WEIGHTS
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()

    out = map_query_run(
        run, tmp_path / "query.h5ad", overrides={"outputs.figures": "false"}, n_neighbors=15
    )
    assert out.parent == run / layout.MAP_DIR
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # reference untouched
    results = ad.read_h5ad(out / "results.h5ad")
    assert results.n_obs == query.n_obs and layout.LATENT_KEY in results.obsm
    predicted = results.obs["regvi_predicted_cell_type"].astype(str).to_numpy()
    planted = adata.obs["cell_type"].astype(str).to_numpy()[query_cells]
    accuracy = float((predicted == planted).mean())
    assert accuracy >= 0.9, accuracy
    uncertainty = results.obs["regvi_prediction_uncertainty"].to_numpy()
    assert ((uncertainty >= 0) & (uncertainty <= 1)).all()

    reference = AmbientRegularizedSCVI.load(run / layout.MODEL_DIR)
    mapped = AmbientRegularizedSCVI.load(out / layout.MODEL_DIR, query)
    assert mapped.covariates.categories["batch"] == [f"batch_{b}" for b in range(4)]
    # the planted ambient of the new library, recovered (log scale). The simulator's soups
    # share one profile (each library's is the soup times log-normal noise, sd 0.5), so the
    # planted soups correlate with each other at about 0.93 on the log scale: the learned
    # soup must also be closer to its own library's planted soup than to any other's, and
    # its library-specific part (minus the reference libraries' mean) must follow the planted one
    ambient = mapped.get_ambient_profiles()
    learned = np.log(ambient.to_numpy())
    planted = np.log(truth.ambient)
    pearson = [float(np.corrcoef(learned[3], planted[b])[0, 1]) for b in range(4)]
    assert pearson[3] > 0.8, pearson
    assert pearson[3] > max(pearson[:3]) + 0.02, pearson
    specific = float(
        np.corrcoef(learned[3] - learned[:3].mean(0), planted[3] - planted[:3].mean(0))[0, 1]
    )
    assert specific > 0.2, specific
    # the reference latent of the training cells, bitwise (through save and load)
    training = ad.read_h5ad(run / "results.h5ad")
    np.testing.assert_array_equal(
        mapped.get_latent_representation(training), training.obsm[layout.LATENT_KEY]
    )
    # a known library keeps its trained parameters: same rows, same expected counts
    old = reference.get_ambient_profiles()
    pd.testing.assert_frame_equal(ambient.iloc[:3], old)
    np.testing.assert_array_equal(mapped.get_dispersion().iloc[:3], reference.get_dispersion())
    cells = query[query.n_obs - known.size :].copy()
    np.testing.assert_array_equal(
        mapped.get_normalized_expression(cells, library_size="latent"),
        reference.get_normalized_expression(cells, library_size="latent"),
    )
    assert len(pd.read_csv(out / "history.csv")) > 0


def test_map_run_places_a_left_out_multiome_library(tmp_path):
    """The multimodal acceptance: a multiome (RNA + ATAC) reference trained without batch_3,
    batch_3 (and 100 cells of the known batch_0) mapped with the function behind `regvi map`:
    the transferred labels match the planted types (>= 0.9, as for RNA) and the reference
    weights are untouched. (1000 cells, 100 genes + 100 peaks, 40 + 60 epochs: accuracy 1.0.)"""
    import mudata

    from regvi.run import layout
    from regvi.run.map import map_query_run
    from regvi.run.pipeline import train

    rna, atac, _ = simulate_multiome(
        n_cells=1000, n_genes=100, n_peaks=100, n_cell_types=5, n_batches=4, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        data = mudata.MuData({"rna": rna, "atac": atac})
        data.obs = rna.obs.copy()
        in_ref = (data.obs["batch"] != "batch_3").to_numpy()
        known = np.flatnonzero(data.obs["batch"] == "batch_0")[:100]
        query_cells = np.concatenate([np.flatnonzero(~in_ref), known])
        data[in_ref].copy().write_h5mu(tmp_path / "ref.h5mu")
        query = data[query_cells].copy()
        for table in (query, *query.mod.values()):  # the query's types are unknown
            table.obs = table.obs.drop(columns="cell_type")
        query.write_h5mu(tmp_path / "query.h5mu")

    cfg = compose_train_config(
        [
            *MODEL_ARGS["multimodal"],
            f"data.path={tmp_path / 'ref.h5mu'}",
            "covariates.batch_key=batch",
            "data.labels_key=cell_type",
            "model.n_latent=8",
            "model.n_hidden=32",
            "trainer.max_epochs=40",
            "trainer.enable_progress_bar=false",
            "outputs.figures=false",
            "logger=none",
        ]
    )
    pl.seed_everything(0, verbose=False)
    run = train(cfg, tmp_path / "run")
    weights = run / layout.MODEL_DIR / layout.MODEL_WEIGHTS
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = map_query_run(
        run,
        tmp_path / "query.h5mu",
        overrides={"outputs.figures": "false", "trainer.max_epochs": "60"},
        n_neighbors=15,
    )
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest  # reference untouched
    results = read_results(out / RESULTS["multimodal"])
    assert results.n_obs == len(query_cells) and layout.LATENT_KEY in results.obsm
    predicted = results.obs["regvi_predicted_cell_type"].astype(str).to_numpy()
    planted = rna.obs["cell_type"].astype(str).to_numpy()[query_cells]
    accuracy = float((predicted == planted).mean())
    assert accuracy >= 0.9, accuracy
    new = slice(0, len(query_cells) - known.size)  # the new library's cells alone
    assert float((predicted[new] == planted[new]).mean()) >= 0.9


def test_map_query_surgery_keeps_reference_columns(tmp_path):
    """The library key conditions the encoder (not the decoder) and is the first of two
    feature-scaling keys: the new rows are inserted between the known ones, only they are learned, and the
    reference latent stays bitwise equal. Queries the mapping refuses."""
    adata, _ = simulate(n_cells=300, n_genes=40, n_cell_types=3, n_batches=3, seed=1)
    adata.obs["kit"] = np.where(adata.obs["batch"] == "batch_0", "kit_a", "kit_b")
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] != "batch_1"].copy()
    AmbientRegularizedSCVI.setup_anndata(
        ref,
        library_key="batch",
        nn_conditioning_covariate_keys=[],
        feature_scaling_covariate_keys=["batch", "kit"],
        encoder_covariate_keys=["batch"],
    )
    model = AmbientRegularizedSCVI(ref, n_latent=4, n_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, enable_progress_bar=False)
        state = {k: v.clone() for k, v in model.module.state_dict().items()}
        latent = model.get_latent_representation()
        mapped = model.map_query(query, max_epochs=3, enable_progress_bar=False)
    assert all(torch.equal(state[k], v) for k, v in model.module.state_dict().items())
    np.testing.assert_array_equal(mapped.get_latent_representation(ref), latent)
    grown = {k: v for k, v in mapped.module.state_dict().items() if v.shape != state[k].shape}
    # feature scaling rows: batch_0, batch_1, [batch_2], kit_a, kit_b
    old, new = state["rna.feature_scaling.raw"], grown.pop("rna.feature_scaling.raw")
    assert new.shape[0] == 5
    assert torch.equal(new[[0, 1, 3, 4]], old) and not torch.equal(new[2], torch.zeros_like(new[2]))
    injections = [k for k in grown if "injections" in k]
    assert any(k.startswith("z_encoder") for k in injections)
    assert any(k.startswith("rna.library.encoder") for k in injections)
    assert not any(k.startswith("rna.decoder") for k in injections)  # not conditioned on it
    for key, value in grown.items():  # the rest grows at the end
        assert value.shape[0] == state[key].shape[0] + 1
        assert torch.equal(value[:-1], state[key]), key
    for key, value in mapped.module.state_dict().items():
        if key not in grown and key != "rna.feature_scaling.raw":
            assert torch.equal(value, state[key]), key
    # a query of known libraries only: nothing to learn, the reference's parameters
    same = model.map_query(ref, enable_progress_bar=False)
    assert same.history_ is None
    assert all(torch.equal(state[k], v) for k, v in same.module.state_dict().items())

    # a new kit too (a feature-scaling key besides the library): both keys grow, each at
    # the end of its own block: batch_0, batch_1, [batch_2], kit_a, kit_b, [kit_new]
    unseen = query.copy()
    unseen.obs["kit"] = unseen.obs["kit"].astype(str).replace("kit_a", "kit_new")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kits = model.map_query(unseen, max_epochs=1, enable_progress_bar=False)
    assert kits.covariates.categories["kit"] == ["kit_a", "kit_b", "kit_new"]
    scaling = kits.module.state_dict()["rna.feature_scaling.raw"]
    assert scaling.shape[0] == 6 and torch.equal(scaling[[0, 1, 3, 4]], old)
    assert not (scaling[[2, 5]] == 0).all(dim=1).any()  # both new rows learned
    with pytest.raises(DataError, match="1 of the model's 40 genes are missing"):
        model.map_query(query[:, 1:].copy(), max_epochs=1)
    with pytest.raises(ConfigError, match="weight_decay"):
        model.map_query(query, weight_decay=0.1)
    # one reference library: its dispersion is not pooled, nor after mapping (save + load)
    single = adata[adata.obs["batch"] == "batch_0"].copy()
    AmbientRegularizedSCVI.setup_anndata(single, batch_key="batch")
    one = AmbientRegularizedSCVI(single, n_latent=4, n_hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
        two = one.map_query(query, max_epochs=1, enable_progress_bar=False)
    assert two.init_params["dispersion_pooling"] is False
    assert two.get_dispersion().shape == (2, 40)  # batch_0, batch_2
    two.save(tmp_path / "two")
    reloaded = AmbientRegularizedSCVI.load(tmp_path / "two", query)
    np.testing.assert_array_equal(
        reloaded.get_latent_representation(), two.get_latent_representation()
    )

    AmbientRegularizedSCVI.setup_anndata(ref)  # no library key: nothing to map
    with pytest.raises(ConfigError, match="library key"):
        AmbientRegularizedSCVI(ref, n_hidden=8).map_query(query)


def _simulated(model: str, n_cells: int, n_genes: int, n_batches: int, seed: int):
    """3 planted types in ``n_batches`` libraries: an AnnData (``"rna"``) or a MuData of RNA
    and ATAC (30 peaks) with the cells' obs at the top level."""
    if model == "rna":
        return simulate(
            n_cells=n_cells, n_genes=n_genes, n_cell_types=3, n_batches=n_batches, seed=seed
        )[0]
    from .test_multimodal import make_mdata

    return make_mdata(
        n_cells=n_cells, seed=seed, n_genes=30, n_peaks=30, n_cell_types=3, n_batches=n_batches
    )


def _study_data(model: str):
    """4 libraries in 3 studies (batch_0, batch_1 in study_a; batch_2 in study_b; batch_3,
    left out of the reference, in the new study_c), for either model."""
    data = _simulated(model, n_cells=400, n_genes=40, n_batches=4, seed=3)
    batch = data.obs["batch"].astype(str)
    study = batch.map({"batch_0": "study_a", "batch_1": "study_a", "batch_2": "study_b"})
    data.obs["study"] = study.fillna("study_c").to_numpy()
    return data


@pytest.mark.parametrize("model", ["rna", "multimodal"])
def test_map_query_from_a_new_study(model):
    """A left-out library from a new study (a new value of dataset_key, which drives feature
    scaling per study) maps like a new library: new feature-scaling rows for the study and
    new library rows, learned on the query; the reference's parameters stay bitwise; a
    known library cannot move to the new study."""
    from regvi.model import RegularizedMultimodalVI

    data = _study_data(model)
    new = (data.obs["batch"] == "batch_3").to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = data[~new].copy()
        query = data[new | (data.obs["batch"] == "batch_0").to_numpy()].copy()
        keys = {"library_key": "batch", "dataset_key": "study"}
        if model == "rna":
            AmbientRegularizedSCVI.setup_anndata(ref, **keys)
            reference = AmbientRegularizedSCVI(ref, n_latent=4, n_hidden=16)
        else:
            RegularizedMultimodalVI.setup_mudata(ref, **keys)
            reference = RegularizedMultimodalVI(ref, n_latent=4, n_hidden=16)
        reference.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
        state = {k: v.clone() for k, v in reference.module.state_dict().items()}
        latent = reference.get_latent_representation()
        mapped = reference.map_query(query, max_epochs=3, enable_progress_bar=False)
    assert all(torch.equal(state[k], v) for k, v in reference.module.state_dict().items())
    encoders = mapped._covariate_encoders()
    assert all(e.categories["study"] == ["study_a", "study_b", "study_c"] for e in encoders)
    after = mapped.module.state_dict()
    grown = {k for k, v in after.items() if v.shape != state[k].shape}
    scaling = [k for k in grown if k.endswith("feature_scaling.raw")]
    assert scaling and all(after[k].shape[0] == 3 for k in scaling)
    for key in grown:  # every table grows at the end (one new study, one new library)
        assert torch.equal(after[key][:-1], state[key]), key
        assert not torch.equal(after[key][-1], torch.zeros_like(after[key][-1])), key
    assert any("ambient" in k for k in grown) and any("injections" in k for k in grown)
    for key in set(after) - grown:
        assert torch.equal(after[key], state[key]), key
    np.testing.assert_array_equal(mapped.get_latent_representation(ref), latent)

    moved = query.copy()
    moved.obs["study"] = "study_c"  # batch_0 belongs to study_a in the reference
    with pytest.raises(DataError, match="'study'.*'study_c'.*'batch_0'"):
        reference.map_query(moved, max_epochs=1)


def _reference_and_query(model: str, root: Path) -> tuple[Path, Path, Path]:
    """Files of 3 libraries (in kits a, b, b): the reference without batch_2, the query
    with batch_2, and two bad queries: a missing feature, no kit column."""
    data = _simulated(model, n_cells=300, n_genes=30, n_batches=3, seed=0)
    data.obs["kit"] = np.where(data.obs["batch"] == "batch_0", "kit_a", "kit_b")
    suffix = RESULTS[model].rsplit(".", 1)[1]

    def write(cells, name, drop_feature=False, no_kit=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            part = data[cells].copy()
            if drop_feature:
                part = part[:, 1:].copy() if model == "rna" else _drop_first_rna_gene(part)
            if no_kit:
                part.obs = part.obs.drop(columns="kit")
            path = root / f"{name}.{suffix}"
            part.write(path) if model == "rna" else part.write_h5mu(path)
        return path

    new = (data.obs["batch"] == "batch_2").to_numpy()
    write(~new, "reference")
    write(new, "query")
    write(new, "missing", drop_feature=True)
    write(new, "no_kit", no_kit=True)
    return root / f"reference.{suffix}", root / f"query.{suffix}", root


def _drop_first_rna_gene(mdata):
    import mudata

    rna = mdata.mod["rna"][:, 1:].copy()
    out = mudata.MuData({"rna": rna, "atac": mdata.mod["atac"].copy()})
    out.obs = mdata.obs.copy()
    return out


@pytest.mark.parametrize("model", ["rna", "multimodal"])
def test_cli_map(tmp_path, model):
    from regvi.run import layout
    from regvi.run.pipeline import train

    reference, query, root = _reference_and_query(model, tmp_path)
    cfg = compose_train_config(
        [
            *MODEL_ARGS[model],
            f"data.path={reference}",
            "covariates.library_key=batch",
            "covariates.technical_covariate_keys=[kit]",
            "data.labels_key=cell_type",
            "data.batch_size=64",
            "model.n_hidden=16",
            "trainer.max_epochs=3",
            "trainer.enable_progress_bar=false",
            "outputs.figures=false",
            "logger=none",
        ]
    )
    run = train(cfg, tmp_path / "run")
    out = tmp_path / "mapped"
    proc = _cli(
        [
            "map",
            run,
            f"data.path={query}",
            "trainer.max_epochs=2",
            "outputs.figures=true",
            "--out-dir",
            out,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    results = read_results(out / RESULTS[model])
    assert results.obsm[layout.LATENT_KEY].shape[0] == 100
    assert set(results.obs["regvi_predicted_cell_type"].astype(str)) <= {
        "type_0",
        "type_1",
        "type_2",
    }
    assert results.obs["regvi_prediction_uncertainty"].between(0, 1).all()
    assert (out / "figures" / layout.MAP_UMAP_FIGURE).read_bytes()[:4] == b"\x89PNG"
    assert (out / layout.MODEL_DIR / layout.MODEL_WEIGHTS).exists()

    missing = _error_line(_cli(["map", run, f"data.path={root / ('missing' + query.suffix)}"]))
    assert "of the model's 30" in missing and "missing" in missing
    no_kit = _error_line(_cli(["map", run, f"data.path={root / ('no_kit' + query.suffix)}"]))
    assert "'kit'" in no_kit and "not found" in no_kit
    assert not (run / layout.MAP_DIR).exists() or not any((run / layout.MAP_DIR).rglob("*.h5*"))
