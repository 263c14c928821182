"""Crash safety and the bad-input catalogue, through the real `regvi` command."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from regvi.datasets import simulate

from .conftest import MODEL_ARGS, RESULTS, read_results
from .test_cli import FAST, REGVI, assert_one_line_error, run

SMALL = [
    "data.simulate.n_cells=600",
    "data.simulate.n_genes=100",
    "data.batch_size=32",
    "model.n_hidden=32",
    "model.n_latent=4",
    "outputs.figures=false",
]


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not written yet
        return -1


@pytest.mark.parametrize("model", ["rna", "multimodal"])
def test_killed_run_resumes_to_the_same_result(tmp_path, model):
    args = ["train", *MODEL_ARGS[model], *SMALL, *FAST]
    args += ["trainer.max_epochs=30", "trainer.checkpoint_min_interval_s=0"]
    results_file = RESULTS[model]
    reference = run([*args, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [*REGVI, *args, f"hydra.run.dir={killed_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while checkpoint_epoch(ckpt) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_epoch(ckpt)
    assert 8 <= killed_at < 29
    assert not (killed_dir / results_file).exists()

    # a plain rerun into the same directory is refused: it would throw the work away
    again = run([*args, f"hydra.run.dir={killed_dir}"], tmp_path)
    assert_one_line_error(again, "unfinished run", "resume=")

    resumed = run(["train", f"resume={killed_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == str(killed_dir)

    ref_hist = pd.read_csv(tmp_path / "ref" / "history.csv")
    res_hist = pd.read_csv(killed_dir / "history.csv")
    assert len(res_hist) == len(ref_hist) == 30
    for column in ("loss_train", "elbo_validation"):
        np.testing.assert_allclose(res_hist[column], ref_hist[column], rtol=1e-5)
    ref = read_results(tmp_path / "ref" / results_file)
    res = read_results(killed_dir / results_file)
    assert res.shape == ref.shape
    layers = res.layers if model == "rna" else res.mod["rna"].layers
    assert "regvi_normalized" in layers
    np.testing.assert_allclose(res.obsm["X_regvi"], ref.obsm["X_regvi"], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(["train", *SMALL, *FAST, "trainer.lr=1e6", f"hydra.run.dir={run_dir}"], tmp_path)
    assert_one_line_error(proc, "non-finite", "epoch")
    assert not (run_dir / "results.h5ad").exists()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_finished_run_is_not_overwritten_without_permission(tmp_path):
    args = ["train", *SMALL, *FAST, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'r'}"]
    assert run(args, tmp_path).returncode == 0
    first = (tmp_path / "r" / "results.h5ad").stat().st_mtime_ns
    assert_one_line_error(run(args, tmp_path), "already holds results.h5ad", "overwrite=true")
    assert (tmp_path / "r" / "results.h5ad").stat().st_mtime_ns == first
    assert run([*args, "overwrite=true"], tmp_path).returncode == 0


def _small():
    adata, _ = simulate(n_cells=120, n_genes=30, n_cell_types=2, n_batches=2, seed=0)
    adata.obs["dataset"] = np.where(adata.obs["batch"] == "batch_0", "d1", "d2")
    return adata


def _with_x(transform):
    def build():
        adata = _small()
        X = adata.X.toarray()
        adata.X = transform(X)
        return adata

    return build


def _mutate(fn):
    def build():
        adata = _small()
        fn(adata)
        return adata

    return build


def _nan_batch(adata):
    batch = adata.obs["batch"].astype(object)
    batch.iloc[5] = np.nan
    adata.obs["batch"] = batch


def _library_in_two_datasets(adata):
    adata.obs.loc[adata.obs_names[0], "dataset"] = (
        "d2" if adata.obs["dataset"].iloc[0] == "d1" else "d1"
    )


CATALOGUE = {
    "negative counts": (_with_x(lambda X: X - 1), [], ["negative"]),
    "NaN counts": (_with_x(lambda X: np.where(X > 3, np.nan, X)), [], ["NaN"]),
    "infinite counts": (_with_x(lambda X: np.where(X > 3, np.inf, X)), [], ["infinite"]),
    "zero cells": (lambda: _small()[:0].copy(), [], ["zero cells"]),
    "all-zero genes only": (_with_x(lambda X: X * 0), [], ["every count", "zero"]),
    "covariate with NaN": (_mutate(_nan_batch), [], ["'batch'", "missing"]),
    "library in two datasets": (
        _mutate(_library_in_two_datasets),
        [
            "covariates.batch_key=null",
            "covariates.library_key=batch",
            "covariates.dataset_key=dataset",
        ],
        ["exactly one dataset"],
    ),
    "duplicate cell names": (
        _mutate(lambda a: setattr(a, "obs_names", ["same"] * 2 + list(a.obs_names[2:]))),
        [],
        ["duplicate cell"],
    ),
    "duplicate gene names": (
        _mutate(lambda a: setattr(a, "var_names", ["g"] * 2 + list(a.var_names[2:]))),
        [],
        ["duplicate gene"],
    ),
    "batch size larger than the data": (_small, ["data.batch_size=5000"], ["batch size 5000"]),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_catalogue(tmp_path, case):
    build, extra, fragments = CATALOGUE[case]
    path = tmp_path / "bad.h5ad"
    build().write_h5ad(path)
    args = ["train", f"data.path={path}", "covariates.batch_key=batch", *extra, *FAST]
    proc = run([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run" / "results.h5ad").exists()


def test_unreadable_and_wrong_format_files(tmp_path):
    garbage = tmp_path / "broken.h5ad"
    garbage.write_bytes(b"this is not an HDF5 file")
    assert_one_line_error(run(["train", f"data.path={garbage}", *FAST], tmp_path), "could not read")
    csv = tmp_path / "counts.csv"
    csv.write_text("a,b\n1,2\n")
    assert_one_line_error(
        run(["train", f"data.path={csv}", *FAST], tmp_path), ".h5ad", "counts.csv"
    )


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    from omegaconf import OmegaConf

    from regvi.config import TrainConfig
    from regvi.run.pipeline import resume, train

    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.simulate.n_cells, cfg.data.simulate.n_genes, cfg.data.batch_size = 200, 30, 64
    cfg.trainer.max_epochs, cfg.trainer.enable_progress_bar = 2, False
    cfg.outputs.figures, cfg.logger.mode = False, "offline"
    run_dir = train(cfg, tmp_path / "run")
    run_id = (run_dir / "wandb_run_id").read_text()
    # make it look unfinished (as after a kill between the last checkpoint and the results)
    (run_dir / "results.h5ad").unlink()
    assert resume(run_dir) == run_dir and (run_dir / "results.h5ad").exists()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # offline run folders are named offline-run-<time>-<id>[-n]: both carry the same id
    assert len(runs) == 2 and all(f"-{run_id}" in name for name in runs)


def test_atac_modality_missing(tmp_path):
    import mudata

    from regvi.datasets import simulate_multiome

    rna, _, _ = simulate_multiome(n_cells=100, n_genes=30, n_peaks=30, seed=0)
    path = tmp_path / "rna_only.h5mu"
    mudata.MuData({"rna": rna}).write(path)
    proc = run(
        ["train", "model=multimodal", f"data.path={path}", "data.modalities=[rna,atac]", *FAST],
        tmp_path,
    )
    assert_one_line_error(proc, "'atac'")


def test_gene_mismatch_at_predict_time(tmp_path):
    adata, _ = simulate(n_cells=200, n_genes=30, n_cell_types=2, n_batches=2, seed=0)
    train_path = tmp_path / "train.h5ad"
    adata.write_h5ad(train_path)
    run_dir = tmp_path / "run"
    args = ["train", f"data.path={train_path}", "covariates.batch_key=batch", "data.batch_size=64"]
    trained = run(
        [*args, "trainer.max_epochs=1", "outputs.figures=false", *FAST, f"hydra.run.dir={run_dir}"],
        tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    adata[:, 5:].copy().write_h5ad(tmp_path / "fewer_genes.h5ad")
    proc = run(["predict", str(run_dir), f"data.path={tmp_path / 'fewer_genes.h5ad'}"], tmp_path)
    assert_one_line_error(proc, "5 of the model's 30 genes are missing")
