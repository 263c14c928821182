"""Pre-emption: SIGUSR2 / SIGTERM mid-training writes the checkpoint at the next step and
exits with the requeue code; the resumed run ends as an uninterrupted one would (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from regvi import sweep
from regvi.errors import REQUEUE_EXIT_CODE, Preempted
from regvi.run import layout
from regvi.train.plan import MID_EPOCH_KEY

from .conftest import MODEL_ARGS, compose_train_config

TINY = [
    "data.simulate.n_cells=240",
    "data.simulate.n_genes=30",
    "data.batch_size=32",
    "data.minibatches_per_fetch=1",
    "model.n_hidden=16",
    "model.n_latent=3",
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "outputs.figures=false",
    "logger=none",
]
REGVI = [sys.executable, "-m", "regvi.cli.app"]


def compose_config(*overrides: str):
    from regvi.config import validate_config

    return validate_config(compose_train_config(list(overrides)))


class _SignalAt(pl.Callback):
    """Sends this process ``signum`` after training batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int, signum: int):
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)


def _train(cfg, checkpoint_dir: Path, resume_from=None, callbacks=()):
    from regvi.run.adapter import adapter_for
    from regvi.run.pipeline import train_arguments

    adapter = adapter_for(cfg.model.name)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data, _ = adapter.setup(adapter.load_data(cfg), cfg)
    model = adapter.build(data, cfg)
    model.train(
        **train_arguments(cfg),
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        handle_preemption=True,
        callbacks=list(callbacks),
    )
    return model


@pytest.mark.parametrize("model", ["rna", "multimodal"])
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_signal_mid_epoch_checkpoints_and_resumes_to_the_same_result(tmp_path, model, signum):
    from regvi.train.preemption import preemption_signals

    cfg = compose_config(*MODEL_ARGS[model], *TINY)
    reference = _train(cfg, tmp_path / "ref")

    ckpt_dir = tmp_path / "stopped"
    with preemption_signals(), pytest.raises(Preempted, match=signal.Signals(signum).name):
        _train(cfg, ckpt_dir, callbacks=[_SignalAt(1, 2, signum)])
    state = torch.load(ckpt_dir / layout.LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    position = state[MID_EPOCH_KEY]  # written inside epoch 1, after its third fetch
    assert (position["epoch"], position["fetches"]) == (1, 3)
    assert state["epoch"] == 1 and 0 < state["global_step"]
    assert signal.getsignal(signum) is not None  # handlers put back

    resumed = _train(cfg, ckpt_dir, resume_from=ckpt_dir / layout.LAST_CHECKPOINT)
    ref, res = reference.history, resumed.history
    assert len(res) == len(ref) == 3
    for column in ("loss_train", "elbo_validation", "kl_weight"):
        np.testing.assert_allclose(res[column], ref[column], rtol=1e-6, err_msg=column)
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[name], value, msg=name)


def test_signal_in_an_epochs_last_batch_stops_after_the_epoch(tmp_path):
    """A checkpoint written after an epoch's last batch but before its end would resume past
    the epoch without running its validation and history: the stop waits for the epoch end."""
    from regvi.train.preemption import preemption_signals

    cfg = compose_config(*MODEL_ARGS["rna"], *TINY)
    reference = _train(cfg, tmp_path / "ref")
    last_batch = -(-round(240 * 0.9) // 32) - 1  # 216 training cells, batches of 32

    ckpt_dir = tmp_path / "stopped"
    with preemption_signals(), pytest.raises(Preempted, match="SIGUSR2"):
        _train(cfg, ckpt_dir, callbacks=[_SignalAt(1, last_batch, signal.SIGUSR2)])
    state = torch.load(ckpt_dir / layout.LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert MID_EPOCH_KEY not in state and state["epoch"] == 1  # written at epoch 1's end
    history = next(v for k, v in state["callbacks"].items() if k.startswith("HistoryCallback"))
    assert [r["epoch"] for r in history["records"]] == [0, 1]

    resumed = _train(cfg, ckpt_dir, resume_from=ckpt_dir / layout.LAST_CHECKPOINT)
    ref, res = reference.history, resumed.history
    assert list(res["epoch"]) == list(ref["epoch"]) == [0, 1, 2]
    for column in ("loss_train", "elbo_validation", "kl_weight"):
        np.testing.assert_allclose(res[column], ref[column], rtol=1e-6, err_msg=column)


def _element_sweep(tmp_path: Path, n: int) -> Path:
    """A sweep of ``n`` identical elements, prepared as the LSF launcher does (no bsub)."""
    sweep_dir = tmp_path / "sweep"
    overrides = [*TINY, "trainer.max_epochs=6", "trainer.checkpoint_min_interval_s=0"]
    elements = [(i, overrides, sweep_dir / str(i)) for i in range(n)]
    sweep.prepare_array(sweep_dir, elements, sweep.ArraySpec(dry_run=True), cwd=tmp_path)
    return sweep_dir


def run_element(sweep_dir: Path, index: int, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "LSB_JOBINDEX": str(index), "LSB_JOBID": "77", "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [*REGVI, "sweep", "run-element", str(sweep_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sweep_element_sent_the_warning_signal_is_requeued_and_resumes(tmp_path):
    """As LSF does with `-wa USR2 -Q 99`: SIGUSR2 mid-training -> checkpoint, exit 99, state
    "preempted"; the requeued element (same index) resumes and ends as an uninterrupted one."""
    sweep_dir = _element_sweep(tmp_path, 2)
    reference = run_element(sweep_dir, 2)
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]

    element = run_element(sweep_dir, 1)
    ckpt = layout.checkpoint_path(sweep_dir / "0")
    deadline = time.time() + 300
    while not ckpt.exists() and element.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert element.poll() is None, "the element finished before the signal"
    element.send_signal(signal.SIGUSR2)
    out, err = element.communicate(timeout=300)
    assert element.returncode == REQUEUE_EXIT_CODE, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGUSR2")
    assert "resume=" in err and "Traceback" not in err
    status = sweep.read_status(sweep_dir / "0")
    assert (status["state"], status["exit_code"]) == ("preempted", REQUEUE_EXIT_CODE)
    assert layout.results_path(sweep_dir / "0") is None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # complete and loadable
    assert state["global_step"] > 0 and state["epoch"] < 6

    requeued = run_element(sweep_dir, 1)
    out, err = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, err[-2000:]
    assert "resuming from its checkpoint" in out
    assert sweep.read_status(sweep_dir / "0")["state"] == "finished"
    ref = pd.read_csv(sweep_dir / "1" / layout.HISTORY_CSV)
    res = pd.read_csv(sweep_dir / "0" / layout.HISTORY_CSV)
    assert len(res) == len(ref) == 6
    np.testing.assert_allclose(res["loss_train"], ref["loss_train"], rtol=1e-6)
    np.testing.assert_allclose(res["elbo_validation"], ref["elbo_validation"], rtol=1e-6)
    assert json.loads((sweep_dir / "0" / layout.STATUS_FILE).read_text())["exit_code"] == 0


def test_requeue_asks_lsf_for_the_warning_signal_and_the_requeue_exit_code():
    manifest = {"job_name": "regvi_s", "sweep_dir": "/x/s"}
    cmd = sweep.bsub_command(manifest, sweep.ArraySpec(requeue=True, warning_minutes=7), [1, 4])
    assert cmd[cmd.index("-wa") + 1] == "USR2" and cmd[cmd.index("-wt") + 1] == "7"
    assert cmd[cmd.index("-Q") + 1] == str(REQUEUE_EXIT_CODE) == "99"
    plain = sweep.bsub_command(manifest, sweep.ArraySpec(), [1, 4])
    assert not {"-wa", "-wt", "-Q"} & set(plain)
