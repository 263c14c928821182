"""Experiment tracking: building the Lightning logger and sending figures to W&B."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def make_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """A Lightning logger for ``logger.name`` (``wandb`` | ``csv`` | ``none`` → False).

    W&B runs ``offline`` unless ``logger.mode=online``; its files go to ``<run_dir>/wandb``.
    The whole resolved config is logged as hyperparameters.
    """
    lcfg = cfg.logger
    if lcfg.name == "none":
        return False
    if lcfg.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="csv_logs", version="")
    else:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(
            project=lcfg.project,
            name=lcfg.run_name or run_dir.name,
            save_dir=str(run_dir),
            entity=lcfg.entity,
            group=lcfg.group,
            tags=list(lcfg.tags) or None,
            mode=lcfg.mode,
        )
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def log_figures(logger: Any, figures: dict[str, Path]) -> None:
    """Send PNGs to W&B (no-op for other loggers)."""
    if not figures or logger is False or type(logger).__name__ != "WandbLogger":
        return
    import wandb

    logger.experiment.log({f"figures/{name}": wandb.Image(str(p)) for name, p in figures.items()})


def finish(logger: Any) -> None:
    """Close the tracking run (flushes W&B's offline files)."""
    if logger is not False and type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
    elif logger is not False:
        logger.finalize("success")
