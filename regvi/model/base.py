"""Shared machinery of the user-facing model classes: training loop set-up, inference
batching, persistence. Model classes add data set-up and the module they build."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from regvi.data.loader import (
    CsrMinibatchDataset,
    default_minibatches_per_fetch,
    make_dataloader,
    stratified_split,
)
from regvi.errors import DataError, RegviError
from regvi.model.defaults import saved_options
from regvi.model.mapping import QueryMappingMixin
from regvi.model.posterior import DifferentialExpressionMixin, PosteriorMixin
from regvi.outputs import atomic_write
from regvi.run.layout import MODEL_HISTORY, MODEL_METADATA, MODEL_WEIGHTS
from regvi.train import (
    ElboEarlyStopping,
    EpochCheckpoint,
    HistoryCallback,
    ThrottledProgressBar,
    TrainingPlan,
)
from regvi.train.preemption import PreemptionCallback

#: Layout of saved weights. 2: the first layer of every block stack (``InputLinear``) stores
#: its weight as ``(in_features, out_features)``; 1 (no ``format`` key) stored it transposed,
#: as ``nn.Linear`` does.
SAVE_FORMAT = 2
#: Cells per inference batch when none is given ...
INFERENCE_BATCH_SIZE = 1024
#: ... and at most this many values (16 MB in float32) in each dense cells x features buffer
#: of a batch that decodes: at 20k genes a batch of 1024 cells held ~280 MB of such buffers.
INFERENCE_VALUES_PER_BUFFER = 2**22


def inference_batch_size(
    batch_size: int | None, n_decoded: int = 0, most: int = INFERENCE_BATCH_SIZE
) -> int:
    """Cells per inference batch: ``batch_size`` when given; otherwise ``most``, or fewer
    where a batch decodes ``n_decoded`` features per cell, so that one dense cells x features
    buffer holds at most :data:`INFERENCE_VALUES_PER_BUFFER` values (209 cells at 20k genes).
    Results do not depend on it: inference treats cells independently."""
    if batch_size is None:
        if n_decoded <= 0:
            return most
        return max(1, min(most, INFERENCE_VALUES_PER_BUFFER // n_decoded))
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return int(batch_size)


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: ``min(round(20000 / n_cells * 400), 400)`` epochs."""
    return int(max(1, min(round(20000 / max(n_cells, 1) * 400), 400)))


class BaseModel(PosteriorMixin, DifferentialExpressionMixin, QueryMappingMixin):
    """Common training / inference / persistence logic.

    Subclasses provide ``_dataset(adata) -> CsrMinibatchDataset`` (validated data for any
    AnnData/MuData compatible with the model), ``_strata`` (library codes of the training
    cells for the stratified split), ``n_features``, ``_build_module`` and the hooks of
    :class:`~regvi.model.posterior.PosteriorMixin` (posterior predictive samples and checks,
    library size, KL, reconstruction error, differential expression) and of
    :class:`~regvi.model.mapping.QueryMappingMixin` (query mapping).
    """

    module: torch.nn.Module
    init_params: dict[str, Any]
    setup_: dict[str, Any]
    #: ``uns`` key where the class's set-up method records its choices, the method's name,
    #: and the attribute holding the model's default data (set by each subclass).
    SETUP_KEY: str = ""
    SETUP_METHOD: str = ""
    DATA_ATTRIBUTE: str = ""

    def __init__(self) -> None:
        self.history_: pd.DataFrame | None = None
        self.is_trained_ = False
        self.n_obs_training_: int | None = None
        self.train_indices_: np.ndarray | None = None
        self.validation_indices_: np.ndarray | None = None

    # ---------------------------------------------------------------- hooks
    def _dataset(self, adata: Any = None) -> CsrMinibatchDataset:  # pragma: no cover
        raise NotImplementedError

    def _strata(self) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    @property
    def n_features(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def _restore(self, metadata: dict[str, Any]) -> None:  # pragma: no cover
        """Set the attributes saved in ``metadata`` (covariate encoders, feature names)."""
        raise NotImplementedError

    def _module_for_loading(self) -> torch.nn.Module:  # pragma: no cover
        """The module with placeholder data-driven parts, to load saved weights into."""
        raise NotImplementedError

    # ---------------------------------------------------------------- set-up
    @classmethod
    def _read_setup(cls, data: Any) -> dict[str, Any]:
        """The set-up that :attr:`SETUP_METHOD` recorded in ``data.uns``."""
        raw = data.uns.get(cls.SETUP_KEY)
        if raw is None:
            raise RegviError(
                f"call {cls.__name__}.{cls.SETUP_METHOD}(...) before creating the model"
            )
        return json.loads(raw) if isinstance(raw, str) else dict(raw)

    def _copy(self, data: Any) -> BaseModel:
        """An independent copy of this model (arguments, set-up, covariate encoders, feature
        names, module) with ``data`` as its default data: what :meth:`save` and
        :meth:`_load` would give, without files."""
        model = type(self).__new__(type(self))
        BaseModel.__init__(model)
        model.init_params = copy.deepcopy(self.init_params)
        model.setup_ = copy.deepcopy(self.setup_)
        model.n_obs_training_ = self.n_obs_training_
        model._restore(json.loads(json.dumps(self._metadata())))
        model.module = copy.deepcopy(self.module)
        model.module.eval()
        model._attach(data)
        model.is_trained_ = self.is_trained_
        return model

    def _attach(self, data: Any) -> None:
        """Make ``data`` the model's default data (validated lazily, on first use)."""
        setattr(self, self.DATA_ATTRIBUTE, data)
        self._data_cache = None

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        train_size: float = 0.9,
        validation_batch_size: int | None = None,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_min_delta_per_feature: float = 2e-4,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        kl_warmup_fraction: float = 0.5,
        accelerator: str = "auto",
        devices: int | str = "auto",
        strategy: str = "auto",
        precision: str | int | None = None,
        gradient_clip_val: float | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        logger: Any = False,
        callbacks: list[pl.Callback] | None = None,
        enable_progress_bar: bool = True,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every_n_epochs: int = 1,
        checkpoint_min_interval_s: float = 0.0,
        resume_from: str | Path | None = None,
        reuse_host_memory: bool | None = None,
        finite_check_every_n_steps: int | None = None,
        minibatches_per_fetch: int | None = None,
        shuffle_block_cells: int | None = None,
        handle_preemption: bool = False,
        **trainer_kwargs: Any,
    ) -> BaseModel:
        """Train with Lightning.

        Parameters
        ----------
        max_epochs
            Number of passes over the training cells; default scvi-tools' heuristic
            ``min(round(20000 / n_cells * 400), 400)``.
        batch_size
            Cells per minibatch.
        train_size
            Fraction of each library's cells used for training; the rest is validation
            (stratified by library, so every library is represented in both).
        early_stopping
            Stop when ``elbo_validation`` (a single-sample Monte-Carlo ELBO: eval mode, no
            dropout, every latent sampled) has not improved by
            ``early_stopping_min_delta_per_feature * n_features`` for
            ``early_stopping_patience`` epochs, counting only once the KL warm-up is over,
            and keep the weights of the best such epoch
            (:class:`~regvi.train.ElboEarlyStopping`). Off by default: on small data it
            trades batch mixing for held-out likelihood (``docs/integration.md``).
        kl_warmup_fraction
            KL(z) weight rises linearly from 0 to 1 over this fraction of the planned
            optimiser steps (0 disables warm-up). The final weight is logged as ``kl_weight``.
        lr, weight_decay, eps
            Adam settings.
        accelerator, devices, precision, gradient_clip_val
            Passed to :class:`lightning.pytorch.Trainer` (``precision="bf16-mixed"`` for AMP).
        strategy
            ``"ddp_spawn"`` with ``devices=k`` trains data-parallel in k processes (gloo on
            CPU, NCCL on GPUs): each process sees a disjoint share of the training cells every
            epoch, the global priors stay divided by the full training-set size N, epoch
            metrics are summed over processes, and only this process continues afterwards
            (so outputs are written once).
        logger, callbacks, trainer_kwargs
            Extra Lightning logger / callbacks / Trainer arguments.
        checkpoint_dir, checkpoint_every_n_epochs, checkpoint_min_interval_s
            Write ``<checkpoint_dir>/last.ckpt`` (weights, optimizer, step counter and so the
            KL schedule, RNG states, history) before the first step, every n epochs once at
            least ``checkpoint_min_interval_s`` seconds have passed since the last write, and
            after the last epoch.
        resume_from
            A checkpoint to continue from. With the same data, arguments, seed and number of
            processes the continued run matches an uninterrupted one on the CPU (each
            data-parallel process takes back its own RNG states).
        reuse_host_memory
            Deprecated, ignored: ``train()`` no longer changes the process's allocator. Wrap
            the call in :func:`regvi.train.host_memory.reuse_host_memory` instead (the
            command-line run does, per ``trainer.reuse_host_memory``).
        finite_check_every_n_steps
            How often a non-finite loss is looked for: every step on the CPU, every 50 steps
            (and at each epoch's last step) on accelerators by default, where each look is a
            host-device synchronisation (see :class:`~regvi.train.plan.TrainingPlan`).
        minibatches_per_fetch
            Minibatches handed over per data-loader item (one Lightning batch), each still
            one optimiser step: same minibatches, same order, same result, but Lightning's
            and the loader's fixed cost is paid once per fetch. Default (None): as many
            minibatches as fit in 2048 cells and 2**20 stored entries (16 at batch 128 and 2
            at batch 1024 on 2k genes; 1 at 20k genes).
        shuffle_block_cells
            Shuffle blocks of this many consecutive training cells instead of single cells;
            each fetch pools its blocks' cells and shuffles them into minibatches (see
            :class:`~regvi.data.loader._SubsetBatchSampler`). For data on disk
            (``backed``), this turns a minibatch's one read per cell into one read per
            block. Default (None): cells are shuffled one by one, as in memory.
        handle_preemption
            With ``checkpoint_dir``: on ``SIGUSR2`` or ``SIGTERM`` write the checkpoint after
            the current training batch and raise :class:`~regvi.train.preemption.Preempted`
            (see :mod:`regvi.train.preemption`); ``resume_from`` that checkpoint continues
            inside the epoch, with the same result as an uninterrupted run on the CPU.
        """
        if reuse_host_memory is not None:
            warnings.warn(
                "train(reuse_host_memory=...) is deprecated and ignored: wrap the call in "
                "regvi.train.host_memory.reuse_host_memory() instead",
                DeprecationWarning,
                stacklevel=2,
            )
        dataset = self._dataset()
        n_cells = len(dataset)
        train_idx, val_idx = stratified_split(self._strata(), train_size, seed=split_seed)
        if batch_size > train_idx.size:
            raise DataError(
                f"batch size {batch_size} is larger than the {train_idx.size} training cells; "
                "lower data.batch_size"
            )
        max_epochs = default_max_epochs(n_cells) if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise DataError(f"max_epochs must be at least 1 (got {max_epochs})")
        pin = accelerator not in ("cpu",) and torch.cuda.is_available()
        if minibatches_per_fetch is None:
            minibatches_per_fetch = default_minibatches_per_fetch(
                batch_size, dataset.entries_per_cell()
            )
        train_loader = make_dataloader(
            dataset,
            train_idx,
            batch_size,
            True,
            num_workers,
            pin,
            minibatches_per_fetch,
            shuffle_block_cells,
        )
        val_batch_size = validation_batch_size or batch_size
        val_loader = (
            make_dataloader(
                dataset,
                val_idx,
                val_batch_size,
                False,
                num_workers,
                pin,
                max(1, minibatches_per_fetch * batch_size // val_batch_size),
            )
            if val_idx.size
            else None
        )
        # devices=k > 1 trains in k processes under any strategy ("auto" picks DDP); this
        # estimate only sets the logging interval and where spawned processes leave history
        n_processes = int(devices) if str(devices).isdigit() else 1
        steps_per_epoch = -(-(train_idx.size // n_processes) // batch_size)
        fetches_per_epoch = -(-steps_per_epoch // minibatches_per_fetch)
        plan = TrainingPlan(
            self.module,
            n_obs_training=train_idx.size,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            # the warm-up length comes from the built Trainer (its processes, its limits)
            kl_warmup_fraction=kl_warmup_fraction,
            gradient_clip_val=gradient_clip_val,
            finite_check_every_n_steps=finite_check_every_n_steps,
        )
        history = HistoryCallback()
        all_callbacks: list[pl.Callback] = [history, *(callbacks or [])]
        if enable_progress_bar and not any(
            isinstance(c, pl.callbacks.ProgressBar) for c in all_callbacks
        ):
            all_callbacks.append(ThrottledProgressBar())
        if n_processes > 1 and checkpoint_dir is None:
            # The worker processes' history comes back through the last checkpoint.
            self._ddp_tmp = tempfile.TemporaryDirectory(prefix="regvi-ddp-")
            checkpoint_dir = self._ddp_tmp.name
        checkpoint = (
            EpochCheckpoint(checkpoint_dir, checkpoint_every_n_epochs, checkpoint_min_interval_s)
            if checkpoint_dir
            else None
        )
        if early_stopping:
            if val_loader is None:
                raise DataError("early stopping needs a validation set: set train_size below 1")
            all_callbacks.append(
                ElboEarlyStopping(
                    min_delta=early_stopping_min_delta_per_feature * self.n_features,
                    patience=early_stopping_patience,
                )
            )
        if checkpoint is not None:
            all_callbacks.append(checkpoint)  # last: it saves the others' state
            if handle_preemption:
                all_callbacks.append(PreemptionCallback(checkpoint.save))
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,  # our sampler splits cells across processes
            precision=precision,
            logger=logger,
            callbacks=all_callbacks,
            enable_progress_bar=enable_progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(50, fetches_per_epoch)),
            limit_val_batches=None if val_loader is not None else 0,
            **trainer_kwargs,
        )
        # Lightning (>= 2.2) trains the module in whatever mode it finds it; a model from
        # load(), _copy() or an earlier train() is in eval mode (dropout off, posteriors at
        # their means), so switch every submodule to train mode here.
        plan.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            # our sampler resumes inside an epoch (see TrainingPlan._continue_epoch)
            warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
            trainer.fit(
                plan,
                train_loader,
                val_loader,
                ckpt_path=str(resume_from) if resume_from else None,
                weights_only=True if resume_from else None,
            )
        # Lightning moves the module back to the CPU at teardown; inference (latent,
        # normalized expression) should run on the accelerator that trained it.
        self.module.to(trainer.strategy.root_device)
        self.module.eval()
        if not history.records and checkpoint is not None and checkpoint.path.exists():
            # Spawned processes trained; this one holds only the final weights.
            state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
            for key, value in state.get("callbacks", {}).items():
                if key.startswith(HistoryCallback.__name__):
                    history.load_state_dict(value)
        self.history_ = history.to_frame()
        self.trainer_ = trainer
        self.is_trained_ = True
        self.n_obs_training_ = int(train_idx.size)
        self.train_indices_, self.validation_indices_ = train_idx, val_idx
        return self

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch metrics (``<term>_train``, ``<term>_validation``, ``kl_weight``)."""
        if self.history_ is None:
            raise RegviError("the model has not been trained yet")
        return self.history_

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ---------------------------------------------------------------- inference
    def _iterate(
        self,
        adata: Any,
        indices: np.ndarray | None,
        batch_size: int | None,
        progress: str | None = None,
        n_decoded: int = 0,
        most: int = INFERENCE_BATCH_SIZE,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Minibatches (on the module's device, eval mode, in cell order); ``progress`` names
        a progress bar over the batches (none when None). ``batch_size=None``: see
        :func:`inference_batch_size` (``n_decoded`` features decoded per cell)."""
        from tqdm.auto import tqdm

        batch_size = inference_batch_size(batch_size, n_decoded, most)
        dataset = self._dataset(adata)
        idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        self.module.eval()
        device = self.device
        starts = range(0, idx.size, batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            batch = dataset.in_order(idx[start : start + batch_size])
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    # ---------------------------------------------------------------- persistence
    def _metadata(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def save(self, dir_path: str | Path, overwrite: bool = False) -> Path:
        """Write weights (``model.pt``), metadata (``model.json``: class, constructor
        arguments, set-up, feature names, category maps) and ``history.csv`` to
        ``dir_path``. Each file is written atomically."""
        out = Path(dir_path)
        if (out / MODEL_WEIGHTS).exists() and not overwrite:
            raise RegviError(f"{out} already holds a saved model; pass overwrite=True")
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        atomic_write(out / MODEL_WEIGHTS, lambda p: torch.save(state, p))
        meta = self._metadata()
        meta.update(
            {
                "class": type(self).__name__,
                "format": SAVE_FORMAT,
                "init_params": self.init_params,
                "n_obs_training": self.n_obs_training_,
            }
        )
        atomic_write(out / MODEL_METADATA, lambda p: p.write_text(json.dumps(meta, indent=1)))
        if self.history_ is not None:
            atomic_write(out / MODEL_HISTORY, lambda p: self.history_.to_csv(p, index=False))
        return out

    @classmethod
    def _load(cls, dir_path: str | Path, data: Any = None) -> BaseModel:
        """Rebuild a model saved by :meth:`save`; ``data`` (optional) becomes its default
        data, validated against the saved features and category maps when used."""
        meta, state = cls._read_saved(dir_path)
        if meta.get("class") != cls.__name__:
            raise RegviError(
                f"{dir_path} holds a saved {meta.get('class')}, not {cls.__name__}; load it "
                f"with regvi.{meta.get('class')}.load"
            )
        model = cls.__new__(cls)
        BaseModel.__init__(model)
        model.init_params = saved_options(meta["init_params"])
        model.setup_ = meta["setup"]
        model.n_obs_training_ = meta.get("n_obs_training")
        model._restore(meta)
        model.module = model._module_for_loading()
        model.module.load_state_dict(state)
        model.module.eval()
        model._attach(data)
        model.is_trained_ = True
        history = Path(dir_path) / MODEL_HISTORY
        model.history_ = pd.read_csv(history) if history.exists() else None
        return model

    @staticmethod
    def _read_saved(dir_path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        path = Path(dir_path)
        if not (path / MODEL_METADATA).exists() or not (path / MODEL_WEIGHTS).exists():
            raise RegviError(
                f"no saved regvi model in {path} (expected {MODEL_METADATA} and {MODEL_WEIGHTS})"
            )
        meta = json.loads((path / MODEL_METADATA).read_text())
        state = torch.load(path / MODEL_WEIGHTS, map_location="cpu", weights_only=True)
        if meta.get("format", 1) > SAVE_FORMAT:
            raise RegviError(
                f"{path} was saved by a newer regvi (format {meta['format']}); upgrade regvi"
            )
        if meta.get("format", 1) < 2:  # first layers were saved in nn.Linear's layout
            state = {
                key: value.t().contiguous() if key.endswith("layers.linears.0.weight") else value
                for key, value in state.items()
            }
        return meta, state
