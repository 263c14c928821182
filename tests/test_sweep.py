"""Sweeps: `regvi train -m hydra/launcher=lsf ...` as ONE LSF job array (with a fake bsub that
runs the elements locally), `regvi sweep status` / `summarize`, and W&B grouping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from regvi import sweep

REPO = Path(__file__).resolve().parents[1]
REGVI = [sys.executable, "-m", "regvi.cli.app"]
TINY = [
    "data.simulate.n_cells=300",
    "data.simulate.n_genes=40",
    "trainer.max_epochs=1",
    "data.batch_size=64",
    "logger=none",
    "outputs.figures=false",
    "outputs.normalized_expression=false",
    "trainer.enable_progress_bar=false",
]


def run(args, cwd, env=None, timeout=300):
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        REGVI + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def cli(*args):
    """`regvi sweep ...` in this process (its subprocess start would cost seconds)."""
    from typer.testing import CliRunner

    from regvi.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def bsub_calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def lsf_sweep(tmp_path, env, *overrides, sweep_dir="sweep"):
    return run(
        [
            "train",
            "-m",
            "hydra/launcher=lsf",
            *overrides,
            *TINY,
            f"hydra.sweep.dir={tmp_path / sweep_dir}",
        ],
        tmp_path,
        env,
    )


TAGS = ["a b", "c,d", "e]f", "g'h", 'i"j', "k=l"]
TAGS_OVERRIDE = """+logger.tags=[a b,'c,d','e]f',"g'h",'i"j','k=l']"""
GROUPS_OVERRIDE = """+logger.group='x, y',"it's [z]\""""


def test_2x2_sweep_is_one_job_array(tmp_path, fake_bsub):
    """2x2 (n_latent x an awkward string) with a fixed awkward list: one bsub call, four
    finished runs, overrides round-tripping exactly into each element's resolved config."""
    env, log = fake_bsub
    proc = lsf_sweep(tmp_path, env, "model.n_latent=3,4", GROUPS_OVERRIDE, TAGS_OVERRIDE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    assert "Submitted LSF job array 4242" in proc.stdout  # the LSF job id is printed
    assert proc.stdout.strip().splitlines()[-1] == str(sweep_dir)

    calls = bsub_calls(log)
    assert len(calls) == 1
    argv = calls[0]
    assert argv[argv.index("-J") + 1] == "regvi_sweep[1-4]"
    assert argv[argv.index("-q") + 1] == "gpu-normal"
    assert argv[argv.index("-M") + 1] == "40000"
    assert argv[argv.index("-R") + 1] == "select[mem>40000] rusage[mem=40000] span[hosts=1]"
    assert argv[argv.index("-gpu") + 1] == "mode=shared:j_exclusive=yes:gmem=80000:num=1"
    assert argv[argv.index("-o") + 1] == str(sweep_dir / "logs" / "%J_%I.out")

    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert [e["index"] for e in manifest["elements"]] == [1, 2, 3, 4]
    resolved = set()
    for element in manifest["elements"]:
        run_dir = Path(element["dir"])
        assert (run_dir / "results.h5ad").exists()
        assert (run_dir / "history.csv").exists()
        assert sweep.read_status(run_dir)["state"] == "finished"
        # each element ran as a normal single run: its run dir is its last line of output
        out = (sweep_dir / "logs" / f"4242_{element['index']}.out").read_text()
        out, report = out.split("\n---", 1)  # then LSF's job report
        assert out.strip().splitlines()[-1] == str(run_dir)
        assert "Successfully completed." in report
        # overrides reach the element exactly: as given, and as resolved values
        assert list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")) == element["overrides"]
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert list(cfg.logger.tags) == TAGS
        resolved.add((cfg.model.n_latent, cfg.logger.group))
    assert resolved == {(n, g) for n in (3, 4) for g in ("x, y", "it's [z]")}

    status = cli("sweep", "status", sweep_dir)
    assert status.exit_code == 0, status.output
    assert "4 elements: 4 finished" in status.output

    summary = cli("sweep", "summarize", sweep_dir)
    assert summary.exit_code == 0, summary.output
    assert "elbo_validation" in summary.output and "model.n_latent" in summary.output
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert len(table) == 4
    rows = set(zip(table["model.n_latent"], table["logger.group"], strict=True))
    assert rows == resolved
    assert (table["status"] == "finished").all()
    assert table["elbo_validation"].notna().all()


def test_dry_run_prints_and_submits_nothing(tmp_path, fake_bsub):
    env, log = fake_bsub
    proc = run(
        [
            "train",
            "-m",
            "--config-dir",
            str(REPO / "jobs"),
            "hydra/launcher=gpu_small",
            "hydra.launcher.dry_run=true",
            "hydra.launcher.max_parallel=2",
            "hydra.launcher.walltime=2:00",
            "hydra.launcher.project=proj",
            'hydra.launcher.setup=["source /opt/env/bin/activate", "module load cuda"]',
            "model.n_latent=3,4",
            *TINY,
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert bsub_calls(log) == []
    out = proc.stdout
    assert "bsub -J 'regvi_sweep[1-2]%2' -q gpu-normal -n 4 -M 16000" in out
    assert "gmem=16000" in out and "-W 2:00 -P proj" in out
    assert "#!/bin/bash" in out and "source /opt/env/bin/activate\nmodule load cuda" in out
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    assert manifest["train_args"] == ["--config-dir", str(REPO / "jobs")]
    script = (tmp_path / "sweep" / "job.sh").read_text()
    assert "n_latent" not in script  # overrides never go through the shell
    status = cli("sweep", "status", tmp_path / "sweep")
    assert status.exit_code == 0 and "2 pending" in status.output


def test_bsub_refusing_or_missing(tmp_path, fake_bsub):
    env, log = fake_bsub
    proc = lsf_sweep(tmp_path, {**env, "FAKE_BSUB_FAIL": "1"}, "model.n_latent=3,4")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bsub refused") and "exit 255" in last
    assert "Bad resource requirement syntax. Job not submitted." in last
    assert "Traceback" not in proc.stderr
    assert len(bsub_calls(log)) == 1

    no_bsub = lsf_sweep(tmp_path, {"PATH": "/nonexistent"}, "model.n_latent=3,4", sweep_dir="s2")
    assert no_bsub.returncode != 0
    assert no_bsub.stderr.strip().splitlines()[-1].startswith("error: bsub not found on PATH")


def test_failed_element_leaves_others_finished(tmp_path, fake_bsub):
    env, log = fake_bsub
    # the second element asks for an obs column the data lacks: it fails at run time only
    proc = lsf_sweep(tmp_path, env, "data.labels_key=cell_type,no_such_column")
    assert proc.returncode == 0, proc.stderr[-3000:]  # submitting worked
    sweep_dir = tmp_path / "sweep"
    ok, bad = sweep_dir / "0", sweep_dir / "1"
    assert (ok / "results.h5ad").exists() and not (bad / "results.h5ad").exists()
    assert sweep.read_status(ok)["state"] == "finished"
    assert sweep.read_status(bad)["state"] == "failed"
    assert "no_such_column" in (sweep_dir / "logs" / "4242_2.err").read_text()

    status = cli("sweep", "status", sweep_dir)
    assert status.exit_code == 1
    assert "1 finished" in status.output and "1 failed" in status.output
    assert "[2] failed   (exit 1) data.labels_key=no_such_column" in status.output
    summary = cli("sweep", "summarize", sweep_dir)
    assert summary.exit_code == 0, summary.output
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["status"]) == ["finished", "failed"]


def test_local_sweep_status_and_summary(tmp_path):
    """The same commands read a local -m sweep (basic launcher, no manifest)."""
    proc = run(
        [
            "train",
            "-m",
            "data.labels_key=cell_type,no_such_column",
            *TINY,
            f"hydra.sweep.dir={tmp_path / 'local'}",
        ],
        tmp_path,
    )
    assert proc.returncode != 0  # Hydra stops a local sweep at its failed job
    status = cli("sweep", "status", tmp_path / "local")
    assert status.exit_code == 1
    assert "1 finished" in status.output and "1 failed" in status.output
    summary = cli("sweep", "summarize", tmp_path / "local")
    assert summary.exit_code == 0, summary.output
    table = pd.read_csv(tmp_path / "local" / "summary.csv")
    assert list(table["data.labels_key"]) == ["cell_type", "no_such_column"]
    assert list(table["status"]) == ["finished", "failed"]

    missing = run(["sweep", "status", str(tmp_path / "nowhere")], tmp_path)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")


def test_wandb_group_and_run_name(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from regvi import tracking

    # outside Hydra (regvi.run.train called directly): no group
    monkeypatch.delenv(sweep.ENV_SWEEP_NAME, raising=False)
    assert tracking.sweep_group_and_name() == (None, None)

    # an LSF element: from the environment run-element sets
    monkeypatch.setenv(sweep.ENV_SWEEP_NAME, "2024-05-01_10-00-00")
    monkeypatch.setenv(sweep.ENV_RUN_NAME, "model.n_latent=64 model.n_hidden=256")
    assert tracking.sweep_group_and_name() == (
        "2024-05-01_10-00-00",
        "model.n_latent=64 model.n_hidden=256",
    )
    monkeypatch.delenv(sweep.ENV_SWEEP_NAME)

    # a local -m sweep: from Hydra's config and the sweep's multirun.yaml
    sweep_dir = tmp_path / "multirun" / "2024-05-01" / "10-00-00"
    sweep_dir.mkdir(parents=True)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            job = compose(
                "train", overrides=["model.n_latent=4", "seed=1"], return_hydra_config=True
            )
    finally:
        GlobalHydra.instance().clear()
    master = OmegaConf.create({"hydra": {"overrides": {"task": ["model.n_latent=3,4", "seed=1"]}}})
    OmegaConf.save(master, sweep_dir / "multirun.yaml")
    job.hydra.mode = "MULTIRUN"
    job.hydra.sweep.dir = str(sweep_dir)
    HydraConfig.instance().set_config(job)
    try:
        assert tracking.sweep_group_and_name() == ("2024-05-01_10-00-00", "model.n_latent=4")
    finally:
        HydraConfig.instance().cfg = None


def test_helpers():
    assert sweep.element_overrides(
        ["hydra/launcher=lsf", "hydra.sweep.dir=/x", "hydra.launcher.queue=q", "a=1", "+b=[1,2]"]
    ) == ["a=1", "+b=[1,2]"]
    assert sweep.swept_keys(["a=1,2", "b=3", "+c=choice(x,y)"]) == ["a", "c"]
    assert sweep.run_name(["a=1", "b=2", "hydra.x=3"], ["b"]) == "b=2"
    assert sweep.sweep_name("/x/multirun/2024-01-02/03-04-05") == "2024-01-02_03-04-05"
    assert sweep.lsf_job_name("my sweep[1]") == "my_sweep_1_"
    # the template shipped in the plugin package is the one in jobs/
    assert sweep.template_path().read_text() == (REPO / "jobs" / "lsf_job.sh.template").read_text()


@pytest.mark.parametrize(
    ("model", "results"),
    [(["model=rna"], "results.h5ad"), (["model=multimodal", "data=multiome"], "results.h5mu")],
)
def test_lsf_sweep_of_each_model_reports_every_element_finished(
    tmp_path, fake_bsub, model, results
):
    """Whichever results file the model writes, `regvi sweep status` counts it as finished."""
    env, _ = fake_bsub
    proc = lsf_sweep(tmp_path, env, *model, "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    for i in range(2):
        assert (sweep_dir / str(i) / results).exists()
        assert (sweep_dir / str(i) / "config.yaml").exists()
    status = cli("sweep", "status", sweep_dir)
    assert status.exit_code == 0, status.output
    assert "2 elements: 2 finished" in status.output
    summary = cli("sweep", "summarize", sweep_dir)
    assert summary.exit_code == 0, summary.output
    table = pd.read_csv(sweep_dir / "summary.csv")
    assert list(table["status"]) == ["finished", "finished"] and "loss_train" in table
