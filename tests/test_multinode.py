"""Multi-node DDP from the LSF launcher: `hydra.launcher.nodes=2 trainer=ddp` makes each
element one multi-host job whose run-element starts one torchrun per host with (a stand-in)
blaunch; two "hosts" on this machine train over gloo as one world of 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from regvi import sweep
from regvi.errors import REQUEUE_EXIT_CODE
from regvi.run import layout

from .conftest import REPO
from .test_sweep import REGVI, TINY, bsub_calls, run


@pytest.fixture
def two_hosts(fake_bsub, tmp_path):
    """fake_bsub's environment plus tests/fake_blaunch on PATH as `blaunch` and the two
    "hosts" LSF gave the job (both this machine); returns (env, bsub log)."""
    env, log = fake_bsub
    bin_dir = tmp_path / "bin"
    (bin_dir / "blaunch").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "fake_blaunch"}" "$@"\n'
    )
    (bin_dir / "blaunch").chmod(0o755)
    env = {**env, "LSB_MCPU_HOSTS": "localhost 1 127.0.0.1 1", "OMP_NUM_THREADS": "1"}
    return env, log


def test_two_node_element_trains_as_one_world_and_writes_one_results_file(tmp_path, two_hosts):
    env, log = two_hosts
    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "trainer.max_epochs=2", "data.minibatches_per_fetch=1"]
    proc = run(
        [
            "train",
            "-m",
            "hydra/launcher=lsf",
            "hydra.launcher.nodes=2",
            "trainer=ddp",
            "trainer.devices=1",
            "seed=0",
            *args,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = bsub_calls(log)[0]
    assert argv[argv.index("-n") + 1] == "2"
    assert "span[ptile=1]" in argv[argv.index("-R") + 1]
    assert "-gpu" in argv  # the GPU request, per host
    out = (sweep_dir / "logs" / "4242_1.out").read_text()
    err = (sweep_dir / "logs" / "4242_1.err").read_text()
    port = sweep.rendezvous_port(4242, 1)
    assert f"--rdzv_endpoint localhost:{port}" in out, out[-2000:] + err[-3000:]
    assert "--nnodes 2 --nproc_per_node 1" in out
    run_dir = sweep_dir / "0"
    assert sweep.read_status(run_dir)["state"] == "finished", err[-3000:]
    written = sorted(p.name for p in run_dir.rglob("*.h5ad"))
    assert written == ["results.h5ad"]  # exactly one, from global rank 0
    history = pd.read_csv(run_dir / layout.HISTORY_CSV)
    assert len(history) == 2

    # each rank trained on half of the cells: half the steps of a single-process run
    single = run(["train", *args, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]

    def steps(path):
        ckpt = torch.load(layout.checkpoint_path(path), map_location="cpu", weights_only=True)
        return ckpt["global_step"]

    n_train = round(300 * 0.9)
    assert steps(tmp_path / "single") == 2 * -(-n_train // 64)
    assert steps(run_dir) == 2 * -(-(n_train // 2) // 64)
    # global priors divided by the full training-set size, as in single-node DDP
    reference = pd.read_csv(tmp_path / "single" / layout.HISTORY_CSV)
    ratio = history["global_penalty_train"].iloc[0] / reference["global_penalty_train"].iloc[0]
    assert 0.8 < ratio < 1.25


def _multinode_sweep(tmp_path: Path, n: int, *overrides: str) -> Path:
    """A 2-node sweep of ``n`` identical elements, prepared as the LSF launcher does."""
    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "trainer=ddp", "trainer.devices=1", "seed=0", *overrides]
    elements = [(i, args, sweep_dir / str(i)) for i in range(n)]
    spec = sweep.ArraySpec(nodes=2, requeue=True, dry_run=True)
    sweep.prepare_array(sweep_dir, elements, spec, cwd=tmp_path)
    return sweep_dir


def _start_element(sweep_dir: Path, index: int, env: dict, job_id: int) -> subprocess.Popen:
    """`regvi sweep run-element` as LSF starts it on the first host: a process group of its
    own (the job's), output into logs/<index>.out|.err."""
    logs = sweep_dir / "logs"
    return subprocess.Popen(
        [*REGVI, "sweep", "run-element", str(sweep_dir)],
        env={**os.environ, **env, "LSB_JOBINDEX": str(index), "LSB_JOBID": str(job_id)},
        cwd=sweep_dir.parent,
        stdout=(logs / f"{index}.out").open("a"),
        stderr=(logs / f"{index}.err").open("a"),
        start_new_session=True,
    )


def _log(sweep_dir: Path, index: int) -> str:
    logs = sweep_dir / "logs"
    return (logs / f"{index}.out").read_text()[-2000:] + (logs / f"{index}.err").read_text()[-4000:]


def test_two_node_element_sent_the_warning_signal_is_requeued_and_resumes(tmp_path, two_hosts):
    """As LSF does with `-wa USR2 -Q 99`: SIGUSR2 to all of the element's processes
    mid-training (run-element, blaunch, the torchrun agents) -> both ranks stop at the same
    step, rank 0 writes the checkpoint, the element exits 99 and is `requeued`; run again,
    it resumes and gives the uninterrupted element's per-epoch losses (CPU)."""
    env, _ = two_hosts
    epochs = 12
    sweep_dir = _multinode_sweep(
        tmp_path, 2, f"trainer.max_epochs={epochs}", "trainer.checkpoint_min_interval_s=0"
    )
    run_dir, reference_dir = sweep_dir / "0", sweep_dir / "1"
    ckpt = layout.checkpoint_path(run_dir)

    element = _start_element(sweep_dir, 1, env, job_id=5001)
    deadline = time.time() + 300
    while element.poll() is None and time.time() < deadline:
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state["epoch"] >= 1:
                break
        time.sleep(0.2)
    assert element.poll() is None, "the element ended before the signal\n" + _log(sweep_dir, 1)
    os.killpg(element.pid, signal.SIGUSR2)  # the job's process group, as LSF signals a job
    assert element.wait(timeout=300) == REQUEUE_EXIT_CODE, _log(sweep_dir, 1)

    status = sweep.read_status(run_dir)
    assert (status["state"], status["exit_code"]) == ("preempted", REQUEUE_EXIT_CODE)
    elements, _ = sweep.collect(sweep_dir)
    assert elements[0].state == "requeued" and elements[0].has_checkpoint
    assert layout.results_path(run_dir) is None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # complete and loadable
    assert 0 < state["global_step"] and state["epoch"] < epochs
    assert "stopped by SIGUSR2" in (sweep_dir / "logs" / "1.err").read_text()

    # LSF requeues it (exit 99 is in -Q): the same element starts again and resumes
    element = _start_element(sweep_dir, 1, env, job_id=5001)
    assert element.wait(timeout=300) == 0, _log(sweep_dir, 1)
    assert sweep.read_status(run_dir)["state"] == "finished"
    assert sorted(p.name for p in run_dir.rglob("*.h5ad")) == ["results.h5ad"]
    assert not (run_dir / layout.PREEMPTED_MARKER).exists()

    # the same element, never interrupted
    reference = _start_element(sweep_dir, 2, env, job_id=5002)
    assert reference.wait(timeout=300) == 0, _log(sweep_dir, 2)
    ref = pd.read_csv(reference_dir / layout.HISTORY_CSV)
    res = pd.read_csv(run_dir / layout.HISTORY_CSV)
    assert list(res["epoch"]) == list(ref["epoch"]) == list(range(epochs))
    assert np.isfinite(res["loss_train"]).all()
    # every epoch, before and after the stop, is the uninterrupted run's: each rank resumed
    # with its own RNG states (and, inside an epoch, its own loss sums so far)
    for column in ("loss_train", "elbo_validation", "kl_weight"):
        np.testing.assert_allclose(res[column], ref[column], rtol=1e-6, err_msg=column)


@pytest.mark.parametrize("rank", [0, 1])
def test_only_global_rank_zero_writes_hydras_directory(tmp_path, monkeypatch, rank):
    """Every rank composes the element's config with Hydra in the same run dir: ranks other
    than 0 run with hydra.output_subdir=null, so .hydra/ has one writer."""
    sweep_dir = _multinode_sweep(tmp_path, 1, "hydra.output_subdir=.cfg")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.chdir(tmp_path)
    seen = []
    assert sweep.run_element(sweep_dir, 1, train=lambda args: seen.append(args) or 0) == 0
    subdirs = [a for a in seen[0] if a.startswith("hydra.output_subdir=")]
    assert subdirs == (["hydra.output_subdir=.cfg"] if rank == 0 else ["hydra.output_subdir=null"])
    assert "trainer.num_nodes=2" in seen[0]


_RECORD_CELLS = """
import sys
from pathlib import Path

import torch

sys.path.insert(0, {repo!r})
from regvi import AmbientRegularizedSCVI
from regvi.datasets import simulate
from tests.test_ddp import _RecordCells

out = Path(sys.argv[1])
adata, _ = simulate(n_cells=200, n_genes=60, n_batches=2, seed=4, return_rho=False)
projection = torch.randn(adata.n_vars, generator=torch.Generator().manual_seed(0)).double()
AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
torch.manual_seed(0)
model = AmbientRegularizedSCVI(adata, n_latent=3, n_hidden=16, dropout_rate=0.2)
model.train(
    max_epochs=2, batch_size=32, train_size=1.0, accelerator="cpu", devices=1, num_nodes=2,
    strategy="ddp", minibatches_per_fetch=1, enable_progress_bar=False,
    callbacks=[_RecordCells(out, projection)],
)
"""


def test_two_host_ranks_train_on_disjoint_shares_of_the_cells(tmp_path, two_hosts):
    """Each rank of a 2-host element sees its own share of the cells: two torchrun agents
    started as run-element starts them (one blaunch call, rendezvous on the first host), a
    world of 2 gloo processes training with strategy=ddp, num_nodes=2 (what an element's
    ranks use), each recording the cells of its training steps (tests/test_ddp.py's
    fingerprint callback)."""
    import socket

    from regvi.datasets import simulate

    env, _ = two_hosts
    script = tmp_path / "record_cells.py"
    script.write_text(_RECORD_CELLS.format(repo=str(REPO)))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    manifest = {"job_name": "cells", "sweep_dir": str(tmp_path)}
    hosts = env["LSB_MCPU_HOSTS"].split()[0::2]
    cmd = sweep.launch_command(manifest, {"index": 1}, hosts, "1", sweep.ArraySpec(nodes=2))
    cmd = [a.replace(f":{sweep.rendezvous_port(1, 1)}", f":{port}") for a in cmd]
    cmd = cmd[: cmd.index("regvi.cli.app") - 1] + [str(script), str(tmp_path)]
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    adata, _ = simulate(n_cells=200, n_genes=60, n_batches=2, seed=4, return_rho=False)
    projection = torch.randn(adata.n_vars, generator=torch.Generator().manual_seed(0)).double()
    every_cell = (torch.as_tensor(adata.X.toarray()).double() @ projection).numpy()
    assert np.unique(every_cell).size == adata.n_obs  # every cell told apart
    for epoch in range(2):
        shares = [np.load(tmp_path / f"rank{rank}_epoch{epoch}.npy") for rank in (0, 1)]
        assert shares[0].size == shares[1].size == 100  # each cell once, in one rank
        assert np.intersect1d(shares[0], shares[1]).size == 0  # disjoint
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(every_cell))
