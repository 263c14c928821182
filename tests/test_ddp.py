"""Data-parallel training: 2 CPU processes (gloo) through the real CLI."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from regvi.data import loader

from .test_cli import FAST, run

TINY = [
    "data.simulate.n_cells=400",
    "data.simulate.n_genes=50",
    "data.batch_size=64",
    "model.n_hidden=16",
    "trainer.max_epochs=2",
    "outputs.figures=false",
]


@pytest.mark.parametrize("minibatches_per_fetch,block_cells", [(1, None), (3, None), (3, 8)])
def test_ranks_get_disjoint_cells_and_equal_steps(monkeypatch, minibatches_per_fetch, block_cells):
    subset = np.arange(1000, 1103)  # 103 cells: one sits out per epoch with 2 ranks
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(loader, "_process_group", lambda rank=rank: (rank, 2))
        torch.manual_seed(7)  # every rank draws the same permutation
        sampler = loader._SubsetBatchSampler(
            subset, 16, True, minibatches_per_fetch, shuffle_block_cells=block_cells
        )
        fetches = list(sampler)
        assert len(fetches) == len(sampler) == -(-4 // minibatches_per_fetch)
        batches = [minibatch for fetch in fetches for minibatch in fetch]
        assert len(batches) == sampler.n_minibatches == 4  # the same steps on both ranks
        shares.append(np.concatenate(batches))
    assert np.intersect1d(shares[0], shares[1]).size == 0
    assert shares[0].size == shares[1].size == 51
    assert set(shares[0]) | set(shares[1]) <= set(subset)


def test_two_process_ddp_run_writes_one_results_file(tmp_path):
    single = run(["train", *TINY, *FAST, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    proc = run(
        ["train", "trainer=ddp", *TINY, *FAST, f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == tmp_path / "ddp"
    written = [p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("*.h5ad")]
    assert written == [Path("results.h5ad")]  # exactly one, from the main process
    history = pd.read_csv(tmp_path / "ddp" / "history.csv")
    assert len(history) == 2 and np.isfinite(history["loss_train"]).all()
    # global priors divided by the full training-set size N, not by a rank's share (N/2)
    reference = pd.read_csv(tmp_path / "single" / "history.csv")
    ratio = history["global_penalty_train"].iloc[0] / reference["global_penalty_train"].iloc[0]
    assert 0.8 < ratio < 1.25


def test_two_process_ddp_trains_from_disk_with_block_shuffling(tmp_path):
    """The on-disk reader travels to the spawned processes (h5py objects cannot be pickled:
    the file is reopened there)."""
    from regvi.datasets import simulate

    adata, _ = simulate(n_cells=400, n_genes=50, n_batches=2, seed=1, return_rho=False)
    adata.write_h5ad(tmp_path / "counts.h5ad")
    args = [
        "train",
        "trainer=ddp",
        f"data.path={tmp_path / 'counts.h5ad'}",
        "data.backed=true",
        "data.shuffle_block_cells=16",
        "covariates.batch_key=batch",
        *TINY[2:],
        *FAST,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2 and np.isfinite(history["loss_train"]).all()
    assert [p.name for p in (tmp_path / "run").rglob("*.h5ad")] == ["results.h5ad"]


class _RecordCells(pl.Callback):
    """Saves, per process and epoch, the cells its training steps used. Cells are told
    apart by a fingerprint of their counts (a random projection), so nothing is added to
    the data or the model; runs in the spawned processes, so it writes files."""

    def __init__(self, out_dir: Path, projection: torch.Tensor):
        self.out_dir, self.projection = Path(out_dir), projection
        self.keys: list[np.ndarray] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.keys = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for minibatch in batch:
            dense = minibatch["x"].to_dense().double()
            self.keys.append((dense @ self.projection).numpy())

    def on_train_epoch_end(self, trainer, pl_module):
        name = f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.npy"
        np.save(self.out_dir / name, np.concatenate(self.keys))


def test_ddp_processes_split_the_cells_disjointly_every_epoch(tmp_path):
    """Two processes (gloo), dropout on (its draws differ between processes, as the global
    RNG streams then do): every epoch the processes' cells are disjoint and together are
    the training set; and the KL warm-up, whose length comes from the built Trainer (each
    process's share of the steps), ends at weight 1."""
    from regvi import AmbientRegularizedSCVI
    from regvi.datasets import simulate

    adata, _ = simulate(n_cells=200, n_genes=60, n_batches=2, seed=4, return_rho=False)
    projection = torch.randn(adata.n_vars, generator=torch.Generator().manual_seed(0)).double()
    fingerprints = (torch.as_tensor(adata.X.toarray()).double() @ projection).numpy()
    assert np.unique(fingerprints).size == adata.n_obs  # every cell told apart
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(0)
    model = AmbientRegularizedSCVI(adata, n_latent=3, n_hidden=16, dropout_rate=0.2)
    epochs = 3
    model.train(
        max_epochs=epochs,
        batch_size=32,
        train_size=1.0,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        kl_warmup_fraction=1.0,
        minibatches_per_fetch=1,
        enable_progress_bar=False,
        callbacks=[_RecordCells(tmp_path, projection)],
    )
    for epoch in range(epochs):
        shares = [np.load(tmp_path / f"rank{rank}_epoch{epoch}.npy") for rank in (0, 1)]
        assert shares[0].size == shares[1].size == 100  # each cell once in its process
        assert np.intersect1d(shares[0], shares[1]).size == 0, f"epoch {epoch}"
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(fingerprints))
    assert model.history["kl_weight"].iloc[-1] == pytest.approx(1.0)


class _StopAfterEpoch(pl.Callback):
    """Stops training at the end of ``epoch`` (the epoch's checkpoint is then written)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class _SignalRankZeroAt(pl.Callback):
    """Sends global rank 0 (only) SIGUSR2 after training batch ``batch`` of ``epoch``: a
    pre-emption inside the epoch, which every rank follows at the same step."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at = (trainer.current_epoch, batch_idx) == (self.epoch, self.batch)
        if at and trainer.global_rank == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGUSR2)


def _two_process_model(checkpoint_dir, resume_from=None, callbacks=(), **kwargs):
    """The same 2-process (gloo) run each call: same data, seed and arguments; dropout on,
    so every rank draws noise from its own global RNG streams."""
    from regvi import AmbientRegularizedSCVI
    from regvi.datasets import simulate

    adata, _ = simulate(n_cells=200, n_genes=60, n_batches=2, seed=4, return_rho=False)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(0)
    model = AmbientRegularizedSCVI(adata, n_latent=3, n_hidden=16, dropout_rate=0.2)
    model.train(
        max_epochs=4,
        batch_size=32,
        train_size=0.9,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        minibatches_per_fetch=1,
        enable_progress_bar=False,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        callbacks=list(callbacks),
        **kwargs,
    )
    return model


def test_two_process_run_resumed_matches_the_uninterrupted_run(tmp_path):
    """A 2-process run stopped after an epoch, or pre-empted inside one, and resumed from its
    checkpoint gives the uninterrupted run's per-epoch losses: each rank continues with its
    own RNG states (dropout, latent samples), not rank 0's."""
    from regvi.run import layout
    from regvi.train.plan import MID_EPOCH_KEY
    from regvi.train.preemption import preemption_signals

    reference = _two_process_model(tmp_path / "ref").history
    assert len(reference) == 4

    # stopped at the end of epoch 1
    stopped = tmp_path / "stopped"
    _two_process_model(stopped, callbacks=[_StopAfterEpoch(1)])
    state = torch.load(stopped / layout.LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert MID_EPOCH_KEY not in state and state["epoch"] == 1
    resumed = _two_process_model(stopped, resume_from=stopped / layout.LAST_CHECKPOINT).history

    # pre-empted inside epoch 1, after its second fetch (fetch = minibatch here)
    preempted = tmp_path / "preempted"
    with preemption_signals(), pytest.raises(Exception, match="stopped by"):
        _two_process_model(preempted, callbacks=[_SignalRankZeroAt(1, 1)], handle_preemption=True)
    state = torch.load(preempted / layout.LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert (state[MID_EPOCH_KEY]["epoch"], state[MID_EPOCH_KEY]["fetches"]) == (1, 2)
    continued = _two_process_model(
        preempted, resume_from=preempted / layout.LAST_CHECKPOINT, handle_preemption=True
    ).history

    for history in (resumed, continued):
        assert list(history["epoch"]) == list(reference["epoch"])
        for column in ("loss_train", "elbo_validation", "kl_weight"):
            np.testing.assert_allclose(
                history[column], reference[column], rtol=1e-6, err_msg=column
            )


@pytest.fixture
def keep_rng_states():
    """Put this process's RNG states (torch, numpy, Python) back after the test."""
    from regvi.train import plan

    saved = plan._get_rng_states()
    yield
    plan._set_rng_states(saved)


def _draws(states) -> torch.Tensor:
    from regvi.train.plan import restore_rng_states

    restore_rng_states(states)
    return torch.rand(3)


def test_rng_states_each_rank_takes_its_own_and_old_checkpoints_still_load(
    monkeypatch, keep_rng_states
):
    """The checkpoint's RNG states: a single process's (also the format written before
    per-rank states) go to every process; one per rank, each rank takes its own; from a run
    with another number of processes, rank 0 takes the first and the other ranks are
    reseeded from it by rank (deterministic, different per rank), with a warning."""
    from regvi.train import plan

    per_rank = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        per_rank.append(plan.gather_rng_states())  # outside a process group: one state
    assert isinstance(per_rank[0], dict)
    expected = [_draws(state) for state in per_rank]
    assert not torch.equal(expected[0], expected[1])

    for rank in (0, 1):
        monkeypatch.setattr(plan, "_process_group", lambda rank=rank: (rank, 2))
        torch.testing.assert_close(_draws(per_rank), expected[rank])  # its own entry
        torch.testing.assert_close(_draws(per_rank[0]), expected[0])  # one state: everyone's

    reseeded = []
    for rank in (0, 1, 2):
        monkeypatch.setattr(plan, "_process_group", lambda rank=rank: (rank, 3))
        with pytest.warns(UserWarning, match="RNG states of 2 processes"):
            reseeded.append(_draws(per_rank))
        with pytest.warns(UserWarning):
            torch.testing.assert_close(_draws(per_rank), reseeded[-1])  # deterministic
    torch.testing.assert_close(reseeded[0], expected[0])
    assert not torch.equal(reseeded[1], reseeded[2])
    assert not torch.equal(reseeded[1], expected[0]) and not torch.equal(reseeded[1], expected[1])


def test_mid_epoch_loss_sums_are_split_so_the_ranks_add_up_to_the_checkpoint(monkeypatch):
    """The epoch's loss sums of a mid-epoch checkpoint (summed over ranks when the epoch's
    means are logged): each rank continues its own; with another number of processes, or
    from a single process's checkpoint, rank 0 carries the total."""
    from regvi.train import plan

    sums = [torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])]
    counts = [3, 4]
    for rank in (0, 1):
        monkeypatch.setattr(plan, "_process_group", lambda rank=rank: (rank, 2))
        own, count = plan._own_epoch_sums(sums, counts)
        torch.testing.assert_close(own, sums[rank])
        assert count == counts[rank]
    for world in (1, 3):
        split = []
        for rank in range(world):
            monkeypatch.setattr(plan, "_process_group", lambda rank=rank, w=world: (rank, w))
            split.append(plan._own_epoch_sums(sums, counts))
        torch.testing.assert_close(sum(s for s, _ in split), torch.tensor([11.0, 22.0]))
        assert [c for _, c in split] == [7] + [0] * (world - 1)
    monkeypatch.setattr(plan, "_process_group", lambda: (1, 2))  # a single process's sums
    own, count = plan._own_epoch_sums(sums[0], counts[0])
    assert count == 0 and not own.any()
