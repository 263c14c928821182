"""Multi-node DDP from the LSF launcher: `hydra.launcher.nodes=2 trainer=ddp` makes each
element one multi-host job whose run-element starts one torchrun per host with (a stand-in)
blaunch; two "hosts" on this machine train over gloo as one world of 2."""

from __future__ import annotations

import sys

import pandas as pd
import torch

from regvi import sweep
from regvi.run import layout

from .conftest import REPO
from .test_sweep import TINY, bsub_calls, run


def test_two_node_element_trains_as_one_world_and_writes_one_results_file(tmp_path, fake_bsub):
    env, log = fake_bsub
    bin_dir = tmp_path / "bin"
    (bin_dir / "blaunch").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "fake_blaunch"}" "$@"\n'
    )
    (bin_dir / "blaunch").chmod(0o755)
    # the two "hosts" LSF gave the job: both this machine
    env = {**env, "LSB_MCPU_HOSTS": "localhost 1 127.0.0.1 1", "OMP_NUM_THREADS": "1"}
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
