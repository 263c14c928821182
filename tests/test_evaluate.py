"""`regvi evaluate` / `regvi predict` on a tiny trained run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from regvi.config import TrainConfig
from regvi.datasets import simulate
from regvi.errors import DataError, RegviError

CLI = (
    "import sys; from regvi.cli.app import app; "
    "from regvi.cli.evaluate_commands import register; register(app); "
    "sys.argv[0] = 'regvi'; app()"
)


def regvi(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """600 simulated cells with 3 planted batches; a small model trained on them."""
    from regvi.run.pipeline import train

    root = tmp_path_factory.mktemp("evaluate")
    adata, _ = simulate(n_cells=600, n_genes=100, n_batches=3, seed=0)
    data = root / "sim.h5ad"
    adata.write_h5ad(data)
    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.path = str(data)
    cfg.covariates.batch_key = "batch"
    cfg.data.labels_key = "cell_type"
    cfg.data.batch_size = 128
    cfg.model.n_hidden = 32
    cfg.trainer.max_epochs = 30
    cfg.trainer.enable_progress_bar = False
    cfg.logger.name = "none"
    pl.seed_everything(0, verbose=False)
    run = train(cfg, root / "run")
    # what Hydra writes beside a CLI run
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run, data, adata


def test_trained_model_mixes_batches_better_than_pca(trained):
    from regvi.run.evaluate import evaluate_run

    run, _, _ = trained
    long = evaluate_run(run, baseline="pca")
    v = long.pivot_table(index="metric", columns="method", values="value")
    assert v.loc["ilisi", "regvi"] > v.loc["ilisi", "pca"] + 0.15, v
    assert v.loc["batch_entropy", "regvi"] > v.loc["batch_entropy", "pca"] + 0.15, v
    assert v.loc["batch_score", "regvi"] > v.loc["batch_score", "pca"]
    assert v.loc["nmi_kmeans", "regvi"] > 0.7  # cell types are kept apart
    # only library_key (batch_key) is set: no cross-dataset / technical strata
    assert "nbr_corr_same_library" in v.index and "nbr_corr_other_library" in v.index
    assert not any("dataset" in m or "technical" in m for m in v.index)

    payload = json.loads((run / "metrics.json").read_text())
    assert payload["batch_key"] == "batch" and payload["labels_key"] == "cell_type"
    assert set(payload["metrics"]) == {"regvi", "pca"}
    assert "most variable genes" in payload["markers"]["note"]  # simulated genes: no markers
    csv = pd.read_csv(run / "metrics.csv")
    assert list(csv.columns) == ["method", "metric", "value", "category", "note"]
    for png in ("metrics.png", "umap_comparison.png"):
        assert (run / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    per_cell = pd.read_csv(run / "neighbourhood_correlation.csv.gz", index_col=0)
    assert len(per_cell) == 600


def test_predict_reproduces_training_latent(trained, tmp_path):
    from regvi.run.predict import predict

    run, data, _ = trained
    expected = ad.read_h5ad(run / "results.h5ad").obsm["X_regvi"]
    out = predict(run, data, out_dir=tmp_path / "same", overrides={"outputs.figures": "false"})
    got = ad.read_h5ad(out / "results.h5ad")
    np.testing.assert_allclose(got.obsm["X_regvi"], expected, rtol=1e-5, atol=1e-5)
    assert (out / "model" / "model.pt").exists()
    before = (out / "results.h5ad").stat().st_mtime_ns
    with pytest.raises(RegviError, match="already holds results.h5ad"):
        predict(run, data, out_dir=out)
    assert (out / "results.h5ad").stat().st_mtime_ns == before


def test_predict_shuffled_genes_and_errors(trained, tmp_path):
    from regvi.run.predict import predict

    run, _, adata = trained
    expected = ad.read_h5ad(run / "results.h5ad").obsm["X_regvi"]
    rng = np.random.default_rng(0)
    shuffled = adata[:, rng.permutation(adata.n_vars)].copy()
    extra = ad.AnnData(
        X=np.ones((adata.n_obs, 1), dtype=np.float32),
        obs=shuffled.obs,
        var=pd.DataFrame(index=["not_in_model"]),
    )
    shuffled = ad.concat([shuffled, extra], axis=1, merge="first")
    shuffled.obs = adata.obs.copy()
    path = tmp_path / "shuffled.h5ad"
    shuffled.write_h5ad(path)
    out = predict(run, path, out_dir=tmp_path / "shuf")  # with figures
    got = ad.read_h5ad(out / "results.h5ad")
    np.testing.assert_allclose(got.obsm["X_regvi"], expected, rtol=1e-5, atol=1e-5)
    assert list(got.var_names) == list(adata.var_names)
    assert (out / "figures" / "umap.png").exists()

    missing = adata[:, 3:].copy()
    missing.write_h5ad(tmp_path / "missing.h5ad")
    with pytest.raises(DataError, match="3 of the model's 100 genes are missing"):
        predict(run, tmp_path / "missing.h5ad", out_dir=tmp_path / "m")

    unseen = adata.copy()
    unseen.obs["batch"] = unseen.obs["batch"].astype(str)
    unseen.obs.iloc[0, unseen.obs.columns.get_loc("batch")] = "new_lane"
    unseen.write_h5ad(tmp_path / "unseen.h5ad")
    with pytest.raises(DataError, match="'new_lane' not seen"):
        predict(run, tmp_path / "unseen.h5ad", out_dir=tmp_path / "u")
    assert not (tmp_path / "u" / "results.h5ad").exists()


def test_evaluate_errors(trained, tmp_path):
    from regvi.run.evaluate import evaluate_run

    run, _, _ = trained
    with pytest.raises(RegviError, match="unknown baseline 'umap'"):
        evaluate_run(run, baseline="umap")
    with pytest.raises(DataError, match="labels column 'nope'"):
        evaluate_run(run, labels_key="nope")
    with pytest.raises(DataError, match="results.h5ad"):
        evaluate_run(tmp_path)


def test_cli_evaluate_and_predict(trained, tmp_path):
    run, data, _ = trained
    proc = regvi(["evaluate", run, "--no-wandb", "--markers", _marker_csv(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run / "metrics.csv")
    assert "ilisi" in proc.stdout and "nbr_corr_same_library" in proc.stdout
    markers = json.loads((run / "metrics.json").read_text())["markers"]
    assert markers["n_genes"] == 12 and "12 of 12 listed markers" in markers["note"]

    out = tmp_path / "pred"
    proc = regvi(
        ["predict", run, f"data.path={data}", "outputs.figures=false", "--out-dir", out], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "results.h5ad").exists()

    bad = regvi(["predict", run, "data.pth=x.h5ad"], tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "unknown key 'data.pth'" in bad.stderr and "Traceback" not in bad.stderr
    if importlib.util.find_spec("scvi") is None:
        proc = regvi(["evaluate", run, "--baseline", "scvi", "--no-wandb"], tmp_path)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and last.startswith("error: ")
        assert 'pip install "regvi[bench]"' in last


def _marker_csv(tmp_path: Path) -> Path:
    path = tmp_path / "markers.csv"
    rows = [f"gene_{i},type{i % 3},L,C" for i in range(12)]
    path.write_text("gene,cell_type,lineage,category\n" + "\n".join(rows) + "\n")
    return path


def test_shipped_marker_list():
    from regvi.run.evaluate import load_markers

    table = load_markers()
    assert list(table.columns) == ["gene", "cell_type", "lineage", "category"]
    assert len(table) > 100 and not table.duplicated(["gene", "cell_type"]).any()
    assert {"CD34", "MS4A1", "CD3E", "CD14", "HBB", "NKG7"} <= set(table.gene)
    assert set(table.lineage) >= {"Lymphoid", "Myeloid", "Progenitor", "Erythroid"}


def test_evaluate_logs_to_offline_wandb_run(trained, tmp_path):
    import shutil

    from regvi.run.evaluate import evaluate_run

    run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("predict", "wandb"))
    cfg = OmegaConf.load(copy / ".hydra" / "config.yaml")
    cfg.logger.name, cfg.logger.mode = "wandb", "offline"
    OmegaConf.save(cfg, copy / ".hydra" / "config.yaml")
    evaluate_run(copy)
    media = list((copy / "wandb").glob("offline-run-*/files/media/images/figures/*.png"))
    assert len(media) == 2
    assert list((copy / "wandb").glob("offline-run-*/files/media/table/evaluate/*.json"))
