"""Experiment tracking: building the Lightning logger and sending figures to W&B."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from regvi.run.layout import CSV_LOG_DIR, WANDB_ID_FILE

log = logging.getLogger(__name__)


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


#: Values of the ``WANDB_MODE`` environment variable that override ``logger.mode``
#: (``dryrun`` is W&B's older name for offline).
_ENV_MODES = {"disabled": "disabled", "offline": "offline", "dryrun": "offline"}


def wandb_mode(configured: str) -> str:
    """The W&B mode a run uses: ``WANDB_MODE=disabled`` or ``offline`` in the environment
    wins over the configured ``logger.mode`` (as W&B users expect); otherwise ``configured``."""
    return _ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower(), configured)


def make_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """A Lightning logger for ``logger.name`` (``wandb`` | ``csv`` | ``none`` → False).

    W&B runs ``offline`` unless ``logger.mode=online``; ``WANDB_MODE=disabled`` or
    ``offline`` in the environment wins (:func:`wandb_mode`). Its files go to
    ``<run_dir>/wandb``.
    The whole resolved config is logged as hyperparameters. The W&B run id is kept in
    ``<run_dir>/wandb_run_id`` so a resumed run continues the same W&B run.
    """
    lcfg = cfg.logger
    if lcfg.name == "none":
        return False
    if lcfg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name=CSV_LOG_DIR, version="")
    else:
        from lightning.pytorch.loggers import WandbLogger

        group, name = sweep_group_and_name()
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()
        if not id_file.exists() and os.environ.get("RANK", "0") in ("", "0"):
            id_file.write_text(run_id)  # (only global rank 0 of a torchrun run logs)
        logger = WandbLogger(
            id=run_id,
            resume="allow",
            project=lcfg.project,
            name=lcfg.run_name or name or run_dir.name,
            save_dir=str(run_dir),
            entity=lcfg.entity,
            group=lcfg.group or group,
            tags=list(lcfg.tags) or None,
            mode=wandb_mode(lcfg.mode),
        )
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def sweep_group_and_name() -> tuple[str | None, str | None]:
    """W&B group and run name for a run that is part of a sweep, else ``(None, None)``.

    All runs of one sweep share a group named after the sweep; each run is named after its
    swept overrides (``model.n_latent=64 model.n_hidden=256``). An LSF array element gets both
    from its environment (set by ``regvi sweep run-element``); a local ``-m`` sweep from
    Hydra's config. Outside Hydra (``regvi.run.train`` called directly) there is none.
    """
    from regvi import sweep

    group = os.environ.get(sweep.ENV_SWEEP_NAME)
    if group:
        return group, os.environ.get(sweep.ENV_RUN_NAME) or None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None, None
        sweep_dir = Path(str(hc.sweep.dir))
        keys: list[str] = []
        multirun = sweep_dir / "multirun.yaml"
        if multirun.exists():
            master = OmegaConf.load(multirun)
            keys = sweep.swept_keys(OmegaConf.select(master, "hydra.overrides.task") or [])
        name = sweep.run_name(list(hc.overrides.task), keys) or None
        return sweep.sweep_name(sweep_dir), name
    except Exception as exc:  # naming is cosmetic: never fail a run over it
        log.debug("no sweep name for W&B: %s", exc)
        return None, None


def log_figures(logger: Any, figures: dict[str, Path]) -> None:
    """Send PNGs to W&B (no-op for other loggers)."""
    if not figures or logger is False or type(logger).__name__ != "WandbLogger":
        return
    import wandb

    logger.experiment.log({f"figures/{name}": wandb.Image(str(p)) for name, p in figures.items()})


def finish(logger: Any, exit_code: int = 0) -> None:
    """Close the tracking run (flushes W&B's offline files); a non-zero ``exit_code`` (a run
    stopped for requeueing) closes it as not finished, to be continued under the same id."""
    if logger is not False and type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish(exit_code=exit_code or None)
    elif logger is not False:
        logger.finalize("success" if exit_code == 0 else "failed")


def log_after_run(
    run_dir: Path, payload: dict[str, Any], job_type: str, logger: Any = None
) -> bool:
    """Send ``payload`` (W&B objects built by the caller) to W&B for a finished run: into
    ``logger`` when it is a WandbLogger, else into a new W&B run (``job_type``, named
    ``<run>-<job_type>``) in the project and group of the run in ``run_dir`` when its saved
    config says ``logger.name=wandb`` (and ``WANDB_MODE`` does not disable it). Returns
    whether anything was logged."""
    if logger is not None and type(logger).__name__ == "WandbLogger":
        logger.experiment.log(payload)
        return True
    from regvi.run.layout import run_config_path

    path = run_config_path(run_dir)
    cfg = OmegaConf.load(path) if path is not None else None
    if cfg is None or cfg.logger.name != "wandb" or wandb_mode(cfg.logger.mode) == "disabled":
        return False
    import wandb

    lc = cfg.logger
    run = wandb.init(
        project=lc.project,
        entity=lc.get("entity"),
        group=lc.get("group"),
        name=f"{lc.get('run_name') or Path(run_dir).name}-{job_type}",
        dir=str(run_dir),
        mode=wandb_mode(lc.mode),
        job_type=job_type,
        reinit="finish_previous",
    )
    try:
        run.log(payload)
    finally:
        run.finish()
    return True


def run_uses_wandb(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` logged to W&B (its saved ``logger.name``)."""
    from regvi.run.layout import run_config_path

    path = run_config_path(run_dir)
    return path is not None and OmegaConf.load(path).logger.name == "wandb"
