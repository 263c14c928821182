"""`regvi sweep status` tells killed / timed-out / requeued elements from failed ones, and
`regvi sweep resubmit` submits exactly those again as ONE job array (stand-in bsub)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from regvi import sweep
from regvi.datasets import simulate
from regvi.errors import REQUEUE_EXIT_CODE

from .test_sweep import TINY, bsub_calls, cli, run


def test_killed_and_failed_elements_are_told_apart_and_resubmitted(
    tmp_path, fake_bsub, monkeypatch
):
    env, log = fake_bsub
    adata, _ = simulate(n_cells=300, n_genes=40, n_batches=2, seed=0, return_rho=False)
    adata.write_h5ad(tmp_path / "d0.h5ad")
    for name in ("d1.h5ad", "d2.h5ad"):
        shutil.copy(tmp_path / "d0.h5ad", tmp_path / name)
    sweep_dir = tmp_path / "sweep"
    # element 2 is killed by "LSF" as soon as it has written its config; element 4's data
    # does not exist yet, so it fails
    kill = f"2:TERM_OWNER:{sweep_dir / '1' / 'config.yaml'}"
    proc = run(
        [
            "train",
            "-m",
            "hydra/launcher=lsf",
            "data.path=d0.h5ad,d1.h5ad,d2.h5ad,d3.h5ad",
            *TINY,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
        {**env, "FAKE_BSUB_KILL": kill},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sweep.read_status(sweep_dir / "1")["state"] == "running"  # it could not record it

    status = cli("sweep", "status", sweep_dir)
    assert status.exit_code == 1
    assert "4 elements: 2 finished, 1 killed, 1 failed" in status.output
    assert "[2] killed   (exit 137) data.path=d1.h5ad [TERM_OWNER: killed by its owner" in (
        status.output
    )
    assert "[4] failed   (exit 1) data.path=d3.h5ad" in status.output
    assert "regvi sweep resubmit" in status.output

    shutil.copy(tmp_path / "d0.h5ad", tmp_path / "d3.h5ad")  # the fix for element 4
    for key, value in env.items():  # `regvi sweep resubmit` runs in this process
        monkeypatch.setenv(key, value)
    again = cli("sweep", "resubmit", sweep_dir, "--failed", "--killed")
    assert again.exit_code == 0, again.output
    assert "Submitted LSF job array 4243 (elements 2,4)" in again.output
    calls = bsub_calls(log)
    assert len(calls) == 2  # the sweep, then ONE call for both elements
    argv = calls[1]
    assert argv[argv.index("-J") + 1] == "regvi_sweep[2,4]"
    assert argv[argv.index("-q") + 1] == "gpu-normal"  # the sweep's own bsub settings
    assert argv[argv.index("-M") + 1] == "40000"
    for num in (1, 3):
        assert sweep.read_status(sweep_dir / str(num))["job_id"] == "4243"
    status = cli("sweep", "status", sweep_dir)
    assert status.exit_code == 0, status.output
    assert "4 elements: 4 finished" in status.output
    # nothing left to do
    assert "nothing to resubmit" in cli("sweep", "resubmit", sweep_dir).output
    assert len(bsub_calls(log)) == 2


def _element(tmp_path: Path, status: dict | None, out: str = "", index: int = 1) -> Path:
    sweep_dir = tmp_path / "s"
    spec = sweep.ArraySpec(requeue=True)
    sweep.prepare_array(sweep_dir, [(index - 1, ["a=1"], sweep_dir / "0")], spec, cwd=tmp_path)
    if status is not None:
        sweep.write_status(sweep_dir / "0", **status)
    if out:
        job = (status or {}).get("job_id", "9")
        marker = f"{sweep.START_MARKER}{index} of LSF job {job} on host\n"
        (sweep_dir / "logs" / f"{job}_{index}.out").write_text(marker + out)
    return sweep_dir


def _state(sweep_dir: Path) -> tuple[str, int | None, str]:
    (element,), _ = sweep.collect(sweep_dir)
    return element.state, element.exit_code, element.note


def test_states_from_status_file_exit_code_and_lsf_report(tmp_path):
    report = "\nSender: LSF System\n\n{}\nExited with exit code {}.\n"
    cases = [
        # (status file, job report) -> state
        (dict(state="running", job_id="9"), report.format("TERM_RUNLIMIT: job killed", 140))
        + ("timed-out",),
        (dict(state="running", job_id="9"), report.format("TERM_OWNER: job killed", 130))
        + ("killed",),
        (dict(state="running", job_id="9"), "") + ("running",),
        (dict(state="failed", exit_code=1, job_id="9"), report.format("", 1)) + ("failed",),
        (dict(state="failed", exit_code=-9, job_id="9"), "") + ("killed",),
        # stopped by the -wa warning with its checkpoint: LSF requeues it on exit 99
        (dict(state="preempted", exit_code=REQUEUE_EXIT_CODE, job_id="9"), "") + ("requeued",),
        (
            dict(state="preempted", exit_code=REQUEUE_EXIT_CODE, job_id="9"),
            report.format("TERM_RUNLIMIT: job killed", REQUEUE_EXIT_CODE),
        )
        + ("requeued",),
        (dict(state="running", job_id="9"), report.format("TERM_REQUEUE_OWNER: x", 130))
        + ("requeued",),
        (dict(state="finished", exit_code=0, job_id="9"), "") + ("failed",),  # no results
    ]
    for i, (status, out, expected) in enumerate(cases):
        sweep_dir = _element(tmp_path / str(i), dict(status), out)
        assert _state(sweep_dir)[0] == expected, (status, out)
    # a requeued job appends to its log: an earlier attempt's report does not count
    rerun = report.format("", REQUEUE_EXIT_CODE) + f"{sweep.START_MARKER}1 of LSF job 9\n"
    sweep_dir = _element(tmp_path / "again", {"state": "running", "job_id": "9"})
    (sweep_dir / "logs" / "9_1.out").write_text(f"{sweep.START_MARKER}1\n" + rerun)
    assert _state(sweep_dir)[0] == "running"
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["spec"]["requeue"] is True and "dry_run" not in manifest["spec"]


def test_index_lists():
    assert sweep.lsf_index_list([1, 2, 3, 4]) == "1-4"
    assert sweep.lsf_index_list([7, 2, 5]) == "2,5,7"
    assert sweep.lsf_index_list([1, 2, 3, 6, 8, 9]) == "1-3,6,8-9"
