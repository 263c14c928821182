"""The Lightning training plan: optimisation, KL warm-up and logging; no model math here."""

from __future__ import annotations

import atexit
import functools
import math
import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from regvi.errors import NonFiniteLossError, RegviError
from regvi.module.base import monte_carlo
from regvi.train.optim import make_adam

#: Checkpoint key of the position inside an epoch (written by a pre-emption checkpoint).
MID_EPOCH_KEY = "regvi_mid_epoch"
#: Checkpoint key of the RNG states: one state (a dict) from a single process, or a list of
#: states, one for each global rank in rank order, from a data-parallel run.
RNG_STATES_KEY = "rng_states"


class TrainingPlan(pl.LightningModule):
    r"""Trains any regvi module exposing ``loss(batch, n_obs, kl_weight) -> LossOutput``.

    * Global priors are divided by ``n_obs_training`` (the training-set size N), for training
      and validation alike, so both losses are on one per-cell scale.
    * KL warm-up: :math:`\kappa = \min(\text{step} / S_{warm}, 1)` on KL(z) only, counted in
      optimiser steps. With ``kl_warmup_fraction`` (the model's ``train`` passes it),
      :math:`S_{warm}` is that fraction of the steps the built Trainer will take, worked out
      when training starts (:meth:`on_train_start`) in each process from its own data loader
      (a data-parallel process's share of the cells, ``limit_train_batches``) and the
      Trainer's ``max_epochs``/``max_steps``: the weight reaches 1 within the run whatever
      its length or number of processes. Otherwise ``kl_warmup_steps`` is taken as given;
      0 means no warm-up.
    * Adam with ``lr=1e-3``, ``eps=0.01``, ``weight_decay=1e-6`` (scvi-tools' defaults).
    * Every loss term is logged as ``<term>_train`` / ``<term>_validation`` per epoch.
      Validation runs in eval mode (no dropout) but samples every latent as training does
      (:func:`~regvi.module.base.monte_carlo`), so ``elbo_validation`` is a Monte-Carlo ELBO.
    * A non-finite loss stops training with :class:`NonFiniteLossError` naming the terms.
      The per-term epoch sums, kept on the device for logging, carry any non-finite value on,
      so they are what is checked: every ``finite_check_every_n_steps`` steps (every step on
      the CPU; 50 on accelerators, where each read is a host-device synchronisation that
      would stop the host queueing work ahead of the GPU, the low GPU use of small batches)
      and at the last step of every epoch, before the epoch's checkpoint is written: a
      non-finite step is reported at most that many steps late, and no checkpoint holds its
      weights. The check comes before the optimiser step, so when it runs every step (the
      CPU default) the update of a non-finite step never reaches the weights in memory.
    * Optimisation is written out (Lightning's manual optimisation): zero_grad, backward,
      optional gradient-norm clipping (``gradient_clip_val``), Adam step.
    * Each item of the data loader is a list of minibatches (a *fetch*, see
      :func:`regvi.data.loader.make_dataloader`); ``training_step`` takes one optimiser step
      for each, so Lightning's batches are fetches while ``global_step`` counts optimiser
      steps (the KL schedule, the finiteness checks and ``max_steps`` go by those).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        n_obs_training: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        kl_warmup_steps: int = 0,
        gradient_clip_val: float | None = None,
        kl_warmup_fraction: float | None = None,
        finite_check_every_n_steps: int | None = None,
    ):
        super().__init__()
        self.finite_check_every_n_steps = finite_check_every_n_steps
        self._checked_through = -1  # the last step whose loss terms were checked finite
        self._trainable: list[torch.nn.Parameter] = []  # the optimiser's parameters
        # One step is zero_grad, backward, (clip), step, done here: Lightning's automatic
        # optimisation wraps the same calls in a closure and a dozen hooks, a fixed cost every
        # step (docs/performance.md).
        self.automatic_optimization = False
        self.gradient_clip_val = gradient_clip_val
        self.module = module
        self.n_obs_training = int(n_obs_training)
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.kl_warmup_fraction = kl_warmup_fraction
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._names: dict[str, list[str]] = {}
        self._logged: set[str] = set()
        self._fetches_done = 0  # training fetches (Lightning batches) done this epoch
        self._resume_position: dict[str, Any] | None = None  # from a mid-epoch checkpoint

    def planned_steps(self) -> int:
        """Optimiser steps this process will take in the whole run, from the built Trainer:
        its training batches (fetches) an epoch, after ``limit_train_batches``, times the
        minibatches a fetch, times ``max_epochs``, capped by ``max_steps``."""
        trainer = self.trainer
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        per_fetch = getattr(sampler, "minibatches_per_fetch", 1)
        steps_per_epoch = trainer.num_training_batches * per_fetch
        if hasattr(sampler, "n_minibatches"):  # the last fetch of an epoch may be short
            steps_per_epoch = min(steps_per_epoch, sampler.n_minibatches)
        total = math.inf
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            total = steps_per_epoch * trainer.max_epochs
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            total = min(total, trainer.max_steps)
        if not math.isfinite(total):
            raise RegviError("set max_epochs or max_steps: the KL warm-up needs a run length")
        return int(total)

    def on_train_start(self) -> None:
        if self.kl_warmup_fraction is not None:
            self.kl_warmup_steps = int(round(self.kl_warmup_fraction * self.planned_steps()))
        if self._resume_position is not None:
            self._continue_epoch(self._resume_position)
            self._resume_position = None

    def _continue_epoch(self, position: dict[str, Any]) -> None:
        """Resuming from a checkpoint written inside an epoch (a pre-emption): the sampler
        skips the fetches already trained on (Lightning runs the epoch's remaining batches),
        the epoch's loss sums continue (each process's own, see :func:`_own_epoch_sums`), and
        the RNG states are put back now (each process's own), after Lightning
        made the epoch's data-loader iterator (which draws from the global generator), so the
        next step draws what it would have drawn without the interruption."""
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "resume_within_epoch"):
            sampler.resume_within_epoch(int(position["epoch"]), int(position["fetches"]))
        self._fetches_done = int(position["fetches"])
        if position.get("names"):
            sums, counts = _own_epoch_sums(position["sums"], position["counts"])
            self._names["train"] = list(position["names"])
            self._sums["train"] = sums.to(self.device)
            self._counts["train"] = counts
        restore_rng_states(position[RNG_STATES_KEY])

    @property
    def kl_weight(self) -> float:
        if self.kl_warmup_steps <= 0:
            return 1.0
        return min(1.0, self.global_step / self.kl_warmup_steps)

    def _check_finite(self, output, stage: str) -> None:
        """Raise, naming the terms, if this step's loss is not finite. The loss is a sum of
        the terms (each scaled by a finite weight), so a non-finite term makes it non-finite:
        one number is read."""
        if math.isfinite(output.loss.item()):
            return
        bad = [name for name, value in output.terms.items() if not torch.isfinite(value)]
        self._raise_non_finite(stage, f"step {self.global_step}", bad)

    def _raise_non_finite(self, stage: str, when: str, bad: list[str]) -> None:
        terms = ", ".join(name for name in bad if name not in ("loss", "elbo")) or "loss"
        raise NonFiniteLossError(
            f"the {stage} loss became non-finite at epoch {self.current_epoch} "
            f"({when}); non-finite term(s): {terms}. "
            "Try a lower learning rate (trainer.lr) or check the input counts."
        )

    def _check_every(self) -> int:
        if self.finite_check_every_n_steps is not None:
            return max(1, int(self.finite_check_every_n_steps))
        return 1 if self.device.type == "cpu" else 50

    def _check_training(self, output, last: bool) -> None:
        """Every n steps and at the last step of an epoch or run, check the epoch's term
        sums (see :meth:`_accumulate`): a non-finite value stays non-finite in a sum, so a
        finite sum vouches for every step added since the last check, and the non-finite
        entries name the terms, with no per-step flags to keep. When every step is checked
        (the CPU default), the step's loss alone is (see :meth:`_check_finite`): one number
        read, where the sums take a reduction and a read, a fixed cost on every step."""
        every = self._check_every()
        if every == 1:
            self._check_finite(output, "training")
            self._checked_through = self.global_step
            return
        if not last and (self.global_step + 1) % every:
            return
        sums = self._sums["train"]
        if bool(torch.isfinite(sums).all()):
            self._checked_through = self.global_step
            return
        flags = (~torch.isfinite(sums)).tolist()
        bad = [name for name, b in zip(self._names["train"], flags, strict=True) if b]
        since, now = self._checked_through + 1, self.global_step
        when = f"step {now}" if since == now else f"steps {since}-{now}"
        self._raise_non_finite("training", when, bad)

    # ------------------------------------------------------------------ metrics
    # Lightning's ``self.log`` has a large fixed cost per call, and with a dozen terms a step
    # logging took a large share of a small step (docs/performance.md). Terms are instead
    # summed on the device (one stack + add per step) and logged once per epoch; the progress
    # bar gets the loss every step.
    def _accumulate(self, output, stage: str, batch_size: int) -> None:
        """Add the step's terms to the epoch sums (on the device)."""
        values = torch.stack([output.loss, output.elbo, *output.terms.values()]).detach()
        if stage not in self._sums:
            self._names[stage] = ["loss", "elbo", *output.terms]
            self._sums[stage] = torch.zeros_like(values)
            self._counts[stage] = 0
        self._sums[stage] += values * batch_size
        self._counts[stage] += batch_size

    def _reset(self, stage: str) -> None:
        self._sums.pop(stage, None)
        self._counts.pop(stage, None)
        self._logged.discard(stage)

    def log_epoch_metrics(self, stage: str) -> None:
        """Log the epoch means of every term for ``stage`` (once per epoch; summed over
        processes under DDP, so the means cover every rank's cells)."""
        if stage in self._logged or stage not in self._sums:
            return
        sums = self._sums[stage]
        count = torch.tensor(float(self._counts[stage]), device=sums.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        means = (sums / count).tolist()
        metrics = {
            f"{name}_{stage}": value for name, value in zip(self._names[stage], means, strict=True)
        }
        if stage == "train":
            metrics["kl_weight"] = self.kl_weight
        self._publish(metrics)
        self._logged.add(stage)

    def _publish(self, metrics: dict[str, float]) -> None:
        """Hand epoch means to the callbacks (``trainer.callback_metrics``, read by the
        history and early stopping) and to the loggers (at the optimiser step, with the
        epoch), as ``self.log(..., on_epoch=True)`` would. ``self.log`` re-walks every value
        already logged in the epoch on each call, so logging 25 (RNA) to 45 (multimodal) terms
        that way costs time quadratic in their number, noticeable on small data sets (see
        ``docs/performance.md``)."""
        trainer = self.trainer
        trainer.callback_metrics.update({name: torch.tensor(v) for name, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": self.current_epoch}, step=self.global_step)
            logger.save()

    def on_train_epoch_start(self) -> None:
        self._fetches_done = 0
        self._reset("train")
        self._checked_through = self.global_step - 1  # also right after a resume

    def on_validation_epoch_start(self) -> None:
        self._reset("validation")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("validation")

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")

    def training_step(self, minibatches: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """One optimiser step for each minibatch of the fetch (see
        :func:`regvi.data.loader.make_dataloader`), in order."""
        optimizer = self.optimizers()
        last_fetch = batch_idx + 1 >= self.trainer.num_training_batches
        max_steps = self.trainer.max_steps
        for position, minibatch in enumerate(minibatches):
            # Lightning checks max_steps only between fetches: stop inside one, and treat
            # the run's last step like an epoch's (its terms are always checked)
            last_step = 0 <= max_steps <= self.global_step + 1
            last = last_step or (last_fetch and position + 1 == len(minibatches))
            loss = self._optimisation_step(optimizer, minibatch, last)
            if last_step:
                break
        self._fetches_done = batch_idx + 1
        if batch_idx % self.trainer.log_every_n_steps == 0:
            # progress-bar value only; refreshed every log_every_n_steps (self.log is slow)
            self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=1)
        return loss

    def _optimisation_step(
        self, optimizer: Any, minibatch: dict[str, Any], last: bool
    ) -> torch.Tensor:
        output = self.module.loss(minibatch, self.n_obs_training, self.kl_weight)
        # what optimizer.zero_grad(set_to_none=True) does, without its wrappers' per-step cost
        for parameter in self._trainable:
            parameter.grad = None
        self.manual_backward(output.loss)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
        # before the step: a non-finite loss caught at once (every step on the CPU) stops
        # training without its update reaching the weights
        batch_size = minibatch["x"].shape[0]
        self._accumulate(output, "train", batch_size)
        self._check_training(output, last)
        optimizer.step()
        return output.loss

    def validation_step(self, minibatches: list[dict[str, Any]], batch_idx: int) -> None:
        """The validation loss in eval mode (dropout off) with every latent sampled (see
        :func:`~regvi.module.base.monte_carlo`): ``elbo_validation`` is a single-sample
        Monte-Carlo ELBO with the training objective's global terms, not the optimistic
        plug-in value at the posterior means (16 nats a cell lower on a 600-cell
        simulation)."""
        for minibatch in minibatches:
            with monte_carlo(self.module):
                output = self.module.loss(minibatch, self.n_obs_training, self.kl_weight)
            self._check_finite(output, "validation")
            self._accumulate(output, "validation", minibatch["x"].shape[0])

    def transfer_batch_to_device(
        self, minibatches: list[dict[str, Any]], device: torch.device, dataloader_idx: int
    ) -> list[dict[str, Any]]:
        """Flat dicts of tensors and :class:`~regvi.data.counts.SparseCounts`: moved value by
        value (asynchronously from pinned memory), without Lightning's generic collection
        walk, a fixed cost every step (see ``docs/performance.md``); nothing to do on the
        CPU."""
        if device.type == "cpu":
            return minibatches
        return [
            {key: value.to(device, non_blocking=True) for key, value in minibatch.items()}
            for minibatch in minibatches
        ]

    def setup(self, stage: str) -> None:
        # In each data-parallel process: Lightning destroys the process group at exit only
        # for NCCL. A gloo group left to C++ static destruction aborted about one CPU DDP
        # run in six at exit ("terminate called without an active exception"), after
        # training, so the run failed before writing outputs.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _destroy_process_group_at_exit()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every RNG state, so a resumed run draws the same minibatches and noise; inside
        an epoch (a pre-emption checkpoint) also where the epoch stands. Under data-parallel
        training every process's states are stored (see :func:`gather_rng_states`: saving is
        collective, every rank calls it), since each process draws its own dropout and latent
        noise."""
        checkpoint[RNG_STATES_KEY] = gather_rng_states()
        trainer = self.trainer
        # the same fetches on every rank, so every rank takes this branch (collective calls)
        if 0 < self._fetches_done < trainer.num_training_batches:
            sums = self._sums.get("train")
            checkpoint[MID_EPOCH_KEY] = {
                "epoch": int(trainer.current_epoch),
                "fetches": int(self._fetches_done),
                "names": list(self._names.get("train", [])) if sums is not None else [],
                # the epoch's sums so far: this process's, or every process's (in rank order)
                "sums": _gather_per_rank(
                    sums.detach().cpu() if sums is not None else torch.zeros(0)
                ),
                "counts": _gather_per_rank(int(self._counts.get("train", 0))),
                RNG_STATES_KEY: checkpoint[RNG_STATES_KEY],
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_position = checkpoint.get(MID_EPOCH_KEY)
        states = checkpoint.get(RNG_STATES_KEY)
        if states:
            restore_rng_states(states)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self._trainable = params
        # The fused kernel updates every parameter in one call (CPU and CUDA), where the
        # per-parameter loop is a tenth of a batch-128 CPU step (torch Adam on the
        # reference path, see regvi.fastpath).
        return make_adam(params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)


def _get_rng_states() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # as tensors and ints: checkpoints stay loadable with torch.load(weights_only=True)
        "numpy": _numpy_state_to_tensors(np.random.get_state()),  # noqa: NPY002
        "python": random.getstate(),
    }


def _process_group() -> tuple[int, int]:
    """(global rank, world size) of torch.distributed, or (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rng_states() -> dict[str, Any] | list[dict[str, Any]]:
    """This process's RNG states (torch, CUDA, numpy, Python) or, in a process group of more
    than one process, every process's, as a list in global-rank order.

    Collective in a process group: every rank must call it (as every rank calls
    ``Trainer.save_checkpoint``, which calls ``on_save_checkpoint``). The processes of a
    data-parallel run start from the same seed but their streams part at the first step
    (each draws noise for its own cells, and how much some samplers draw depends on the
    values), so one process's states continue another's run with different noise."""
    return _gather_per_rank(_get_rng_states())


def _gather_per_rank(value: Any) -> Any:
    """``value`` in a single process; in a process group of more than one, every rank's
    ``value`` as a list in global-rank order (collective: every rank must call it)."""
    _, world = _process_group()
    if world == 1:
        return value
    values: list[Any] = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def _own_epoch_sums(
    sums: torch.Tensor | list[torch.Tensor], counts: int | list[int]
) -> tuple[torch.Tensor, int]:
    """This process's share of a mid-epoch checkpoint's loss sums and cell count. The epoch
    means are summed over processes (:meth:`TrainingPlan.log_epoch_metrics`), so any split
    that adds up to the checkpoint's totals gives the same means: each process takes its own
    entry when the checkpoint holds one per current process; otherwise (one process's sums,
    or another number of processes) rank 0 takes the total and the others start at zero."""
    rank, world = _process_group()
    if isinstance(sums, torch.Tensor):
        sums, counts = [sums], [int(counts)]
    if len(sums) == world:
        return sums[rank], int(counts[rank])
    if rank == 0:
        return torch.stack(list(sums)).sum(0), int(sum(counts))
    return torch.zeros_like(sums[0]), 0


def restore_rng_states(states: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Put back RNG states written by :func:`gather_rng_states`.

    * One state (a single-process checkpoint, or one written before per-rank states were
      stored): every process takes it.
    * One state per rank, as many as there are processes now: each process takes its own.
    * One state per rank of a run with a different number of processes: the run cannot
      repeat the interrupted one anyway (each process's share of the cells changes), so
      rank 0 takes the first state and every other rank a seed drawn from it and its rank
      (deterministic, and different on every rank), with a warning.
    """
    if isinstance(states, dict):
        _set_rng_states(states)
        return
    rank, world = _process_group()
    if len(states) == world:
        _set_rng_states(states[rank])
        return
    warnings.warn(
        f"the checkpoint holds the RNG states of {len(states)} processes and this run has "
        f"{world}: process 0 continues with the first, the others are reseeded from it by "
        "rank; the run will not repeat the interrupted one",
        stacklevel=2,
    )
    _set_rng_states(states[0])
    if rank > 0:
        _reseed_all(int(torch.randint(2**62, (), dtype=torch.int64)), rank)


def _reseed_all(base: int, rank: int) -> None:
    """Seed every generator (torch, CUDA, numpy, Python) from ``(base, rank)``."""
    seeds = np.random.SeedSequence((base, rank)).generate_state(4, np.uint32)
    torch.manual_seed(int(seeds[0]) << 32 | int(seeds[1]))  # also seeds every CUDA device
    np.random.seed(int(seeds[2]))  # noqa: NPY002
    random.seed(int(seeds[3]))


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(_numpy_state_from_tensors(states["numpy"]))  # noqa: NPY002
    random.setstate(states["python"])


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Destroy this process's process group when the interpreter exits (registered once)."""
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])
