"""Shared fixtures. Real data lives in ../shared/data beside the checkout (CI has it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def compose_train_config(overrides: list[str]):
    """The ``train`` config composed from ``conf/`` with ``overrides``, as ``regvi train``
    composes it (Hydra's global state cleared before and after)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from regvi.cli.app import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="regvi"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def shared_file(name: str) -> Path:
    """Path of a real dataset; missing data fails in CI and skips only on a dev machine."""
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real data {path} is missing in CI")
        pytest.skip(f"real data {path} not available")
    return path


#: Per model: the config-group overrides of a run, and the results file it writes (the
#: multimodal one on the simulated multiome).
MODEL_ARGS = {"rna": ["model=rna"], "multimodal": ["model=multimodal", "data=multiome"]}
RESULTS = {"rna": "results.h5ad", "multimodal": "results.h5mu"}


def read_results(path: Path):
    """A run's results file: AnnData (.h5ad) or MuData (.h5mu)."""
    if path.suffix == ".h5mu":
        import warnings

        import mudata

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return mudata.read_h5mu(path)
    import anndata as ad

    return ad.read_h5ad(path)


@pytest.fixture
def fake_bsub(tmp_path):
    """Put tests/fake_bsub on PATH as `bsub`; return (env, log file of its calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "bsub"
    wrapper.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "fake_bsub"}" "$@"\n'
    )
    wrapper.chmod(0o755)
    log = tmp_path / "bsub_calls.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_BSUB_LOG": str(log),
        "WANDB_MODE": "offline",
    }
    return env, log
