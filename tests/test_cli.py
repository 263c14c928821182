"""The real `regvi` command in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import matplotlib.image as mpimg
import numpy as np
import pytest
import scanpy as sc

from regvi.datasets import simulate
from regvi.model.defaults import RNA_DEFAULTS

from .conftest import MODEL_ARGS, RESULTS, read_results, shared_file

REGVI = [sys.executable, "-m", "regvi.cli.app"]
FAST = ["logger=none", "trainer.enable_progress_bar=false"]


def run(args, cwd, timeout=600, env=None):
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        REGVI + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err, "no error message"
    assert err[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in err[-1], err[-1]


def assert_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mpimg.imread(path).std() > 0


def test_help_texts(tmp_path):
    top = run(["--help"], tmp_path)
    assert top.returncode == 0 and "train" in top.stdout
    train_help = run(["train", "--help"], tmp_path)
    assert train_help.returncode == 0
    for key in ("data.path", "covariates", "model", "logger", "trainer.max_epochs"):
        assert key in train_help.stdout


def test_default_run_with_no_arguments(tmp_path):
    """`regvi train` alone: the built-in dataset, W&B offline, outputs under ./outputs/."""
    proc = run(["train"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.is_dir() and tmp_path / "outputs" in run_dir.parents
    results = ad.read_h5ad(run_dir / "results.h5ad")
    assert results.obsm["X_regvi"].shape == (3000, RNA_DEFAULTS["n_latent"])
    assert "regvi_normalized" in results.layers
    # the offline W&B run holds the figures (and the per-epoch metrics, in its .wandb file)
    logged = list((run_dir / "wandb").glob("offline-run-*/files/media/images/figures/*.png"))
    assert len(logged) == 3
    for png in ("loss_curves.png", "umap.png", "posterior_predictive_check.png"):
        assert_png(run_dir / "figures" / png)


def test_real_data_run_opens_in_scanpy(tmp_path):
    data = shared_file("pbmc_3tech_symphony_1500.h5ad")
    proc = run(
        [
            "train",
            f"data.path={data}",
            "covariates.batch_key=batch",
            "data.labels_key=cell_type",
            "trainer.max_epochs=5",
            "model.n_latent=6",
            "logger=csv",
            "evaluate=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "run"
    results = sc.read_h5ad(run_dir / "results.h5ad")
    assert results.obsm["X_regvi"].shape == (1500, 6)
    sc.pp.neighbors(results, use_rep="X_regvi")  # usable in scanpy with no glue
    assert results.obsm["X_umap"].shape == (1500, 2)
    assert results.layers["regvi_normalized"].shape == results.shape
    for png in ("loss_curves.png", "umap.png"):
        assert_png(run_dir / "figures" / png)
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 6 and "reconstruction_loss_validation" in history[0]
    assert (run_dir / "csv_logs" / "metrics.csv").exists()
    assert (run_dir / "model" / "model.pt").exists()
    metrics = (run_dir / "metrics.csv").read_text()  # evaluate=true ran after training
    assert "ilisi" in metrics.lower() and (run_dir / "figures" / "metrics.png").exists()


def test_multirun_over_two_values(tmp_path):
    proc = run(
        [
            "train",
            "-m",
            "model.n_latent=3,4",
            "data.simulate.n_cells=300",
            "data.simulate.n_genes=50",
            "trainer.max_epochs=2",
            "outputs.figures=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *FAST,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dims = sorted(
        ad.read_h5ad(tmp_path / "sweep" / str(i) / "results.h5ad").obsm["X_regvi"].shape[1]
        for i in range(2)
    )
    assert dims == [3, 4]


def test_cfg_job_prints_composed_config(tmp_path):
    proc = run(["train", "--cfg", "job", "model.n_latent=7"], tmp_path)
    assert proc.returncode == 0
    assert "n_latent: 7" in proc.stdout and "batch_size:" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_user_config_dir(tmp_path):
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "tiny.yaml").write_text(
        "defaults:\n  - rna\n  - _self_\nn_latent: 2\nn_hidden: 8\n"
    )
    proc = run(
        ["train", "--config-dir", str(tmp_path / "myconf"), "model=tiny", "--cfg", "job"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "n_latent: 2" in proc.stdout and "n_hidden: 8" in proc.stdout


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("model.n_latnet=8", ["unknown config key 'model.n_latnet'", "model.n_latent"]),
        ("model.n_latent=abc", ["model.n_latent", "abc"]),
        ("logger=nosuch", ["logger", "nosuch"]),
        ("data.minibatches_per_fetch=0", ["data.minibatches_per_fetch", "at least 1"]),
        ("outputs.batch_size=0", ["outputs.batch_size", "at least 1"]),
        ("data.shuffle_block_cells=0", ["data.shuffle_block_cells", "at least 1"]),
    ],
)
def test_bad_config_fails_before_any_output(tmp_path, override, fragments):
    proc = run(["train", override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_h5ad(tmp_path):
    adata, _ = simulate(n_cells=200, n_genes=40, n_cell_types=2, n_batches=2, seed=0)
    path = tmp_path / "small.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_missing_obs_column(tmp_path, small_h5ad):
    _, path = small_h5ad
    proc = run(
        [
            "train",
            f"data.path={path}",
            "covariates.batch_key=lane",
            f"hydra.run.dir={tmp_path / 'r'}",
            *FAST,
        ],
        tmp_path,
    )
    assert_one_line_error(proc, "'lane'", "not found")
    assert not (tmp_path / "r" / "results.h5ad").exists()


def test_non_integer_counts(tmp_path, small_h5ad):
    adata, _ = small_h5ad
    adata.X = adata.X * 0.5
    path = tmp_path / "fractional.h5ad"
    adata.write_h5ad(path)
    proc = run(["train", f"data.path={path}", f"hydra.run.dir={tmp_path / 'r'}", *FAST], tmp_path)
    assert_one_line_error(proc, "not whole numbers")
    assert not (tmp_path / "r" / "results.h5ad").exists()


def test_missing_file_and_debug_traceback(tmp_path):
    proc = run(["train", "data.path=/no/such.h5ad", *FAST], tmp_path)
    assert_one_line_error(proc, "not found", "/no/such.h5ad")
    debug = run(["train", "data.path=/no/such.h5ad", *FAST], tmp_path, env={"REGVI_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_train_function_is_callable_without_cli(tmp_path):
    from omegaconf import OmegaConf

    from regvi.config import TrainConfig
    from regvi.run.pipeline import train

    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.simulate.n_cells, cfg.data.simulate.n_genes = 200, 30
    cfg.trainer.max_epochs, cfg.logger.name, cfg.data.batch_size = 2, "none", 64
    cfg.trainer.enable_progress_bar = False
    cfg.outputs.figures = False
    out = train(cfg, tmp_path / "run")
    first = ad.read_h5ad(out / "results.h5ad").obsm["X_regvi"]
    again = ad.read_h5ad(train(cfg, tmp_path / "run2") / "results.h5ad").obsm["X_regvi"]
    np.testing.assert_array_equal(first, again)  # same seed, same data: same latent


# ------------------------------------------------------------------ every model, one pipeline
MODELS = ["rna", "multimodal"]


def write_dataset(model: str, path_stem: Path, n_cells: int = 300, n_genes: int = 40):
    """Simulated cells with batches and cell types, written as .h5ad (rna) or .h5mu; returns
    (path, the written object)."""
    if model == "rna":
        adata, _ = simulate(n_cells=n_cells, n_genes=n_genes, n_cell_types=3, n_batches=2, seed=0)
        path = path_stem.with_suffix(".h5ad")
        adata.write_h5ad(path)
        return path, adata
    import warnings

    import mudata

    from regvi.datasets import simulate_multiome

    rna, atac, _ = simulate_multiome(
        n_cells=n_cells, n_genes=n_genes, n_peaks=n_genes, n_cell_types=3, n_batches=2, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"rna": rna, "atac": atac})
        mdata.obs = rna.obs.copy()
        path = path_stem.with_suffix(".h5mu")
        mdata.write(path)
    return path, mdata


def reordered(model: str, data, drop: int = 0, unseen_batch: bool = False):
    """``data`` with every modality's features in reverse order (minus the first ``drop`` of
    that order), optionally with one cell in a batch the model never saw."""
    import warnings

    def flip(adata):
        out = adata[:, adata.var_names[::-1][drop:]].copy()
        if unseen_batch:
            out.obs["batch"] = out.obs["batch"].astype(str)
            out.obs.iloc[0, out.obs.columns.get_loc("batch")] = "batch_new"
        return out

    if model == "rna":
        return flip(data)
    import mudata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        new = mudata.MuData({m: flip(a) for m, a in data.mod.items()})
        new.obs = flip(data.mod["rna"]).obs.copy()
    return new


def write_like(obj, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        obj.write(path) if path.suffix == ".h5mu" else obj.write_h5ad(path)
    return path


@pytest.mark.parametrize("model", MODELS)
def test_train_evaluate_predict_for_every_model(tmp_path, model):
    """One run of each model through the CLI: train (evaluate=true), `regvi evaluate`, and
    `regvi predict` on the same cells with reordered features, plus its one-line errors."""
    data_path, data = write_dataset(model, tmp_path / "cells")
    run_dir = tmp_path / "run"
    proc = run(
        [
            "train",
            *MODEL_ARGS[model],
            f"data.path={data_path}",
            "covariates.batch_key=batch",
            "data.labels_key=cell_type",
            "data.batch_size=64",
            "model.n_hidden=32",
            "trainer.max_epochs=3",
            "evaluate=true",
            *FAST,
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (RESULTS[model], "config.yaml", "checkpoints/last.ckpt", "model/model.json"):
        assert (run_dir / name).exists(), name
    results = read_results(run_dir / RESULTS[model])
    latent = np.asarray(results.obsm["X_regvi"])
    assert latent.shape[0] == 300 and np.isfinite(latent).all()

    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = {"regvi"} if model == "rna" else {"regvi", "regvi_atac", "regvi_rna"}
    assert set(metrics["metrics"]) == expected
    if model == "multimodal":
        shares = metrics["modality_attribution"]["mean_share"]
        assert set(shares) == {"atac", "rna"}
        for decoder, row in shares.items():
            assert set(row) == {"atac", "rna"} and abs(sum(row.values()) - 1) < 1e-6, decoder
        blocks = {"atac": (0, 10), "rna": (10, 30)}  # alphabetical blocks, default sizes
        for m, (lo, hi) in blocks.items():
            np.testing.assert_array_equal(results.obsm[f"X_regvi_{m}"], latent[:, lo:hi])
    (run_dir / "metrics.json").unlink()
    evaluated = run(["evaluate", str(run_dir), "--no-wandb"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert set(json.loads((run_dir / "metrics.json").read_text())["metrics"]) == expected

    new_path = write_like(reordered(model, data), tmp_path / f"new{data_path.suffix}")
    predicted = run(
        ["predict", str(run_dir), f"data.path={new_path}", "outputs.figures=false"], tmp_path
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    out = Path(predicted.stdout.strip().splitlines()[-1])
    again = read_results(out / RESULTS[model])
    np.testing.assert_allclose(again.obsm["X_regvi"], latent, rtol=1e-4, atol=1e-5)
    # a second predict into the same directory refuses, leaving the first results untouched
    before = (out / RESULTS[model]).stat().st_mtime_ns
    proc = run(["predict", str(run_dir), f"data.path={new_path}", "--out-dir", str(out)], tmp_path)
    assert_one_line_error(proc, f"already holds {RESULTS[model]}", "new output directory")
    assert (out / RESULTS[model]).stat().st_mtime_ns == before

    fewer = write_like(reordered(model, data, drop=3), tmp_path / f"fewer{data_path.suffix}")
    what = "genes" if model == "rna" else "'atac' features"  # modalities checked in order
    proc = run(["predict", str(run_dir), f"data.path={fewer}"], tmp_path)
    assert_one_line_error(proc, f"3 of the model's 40 {what} are missing")
    unseen = write_like(
        reordered(model, data, unseen_batch=True), tmp_path / f"unseen{data_path.suffix}"
    )
    proc = run(["predict", str(run_dir), f"data.path={unseen}"], tmp_path)
    assert_one_line_error(proc, "'batch_new'", "batch")
