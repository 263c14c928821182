"""Experiment tracking: the W&B mode the environment asks for wins over the config."""

from __future__ import annotations

from omegaconf import OmegaConf

from regvi import tracking
from regvi.config import TrainConfig


def test_wandb_mode_from_the_environment_wins(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.wandb_mode("online") == "online"
    assert tracking.wandb_mode("offline") == "offline"
    for env, expected in (("disabled", "disabled"), ("offline", "offline"), ("dryrun", "offline")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert tracking.wandb_mode("online") == expected
    monkeypatch.setenv("WANDB_MODE", "online")  # only disabled / offline override the config
    assert tracking.wandb_mode("offline") == "offline"


def test_logger_of_an_online_config_is_disabled_by_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.structured(TrainConfig)
    cfg.logger.name, cfg.logger.mode = "wandb", "online"
    logger = tracking.make_logger(cfg, tmp_path)
    try:
        assert logger._wandb_init["mode"] == "disabled"
        assert not (tmp_path / "wandb").exists() or not any((tmp_path / "wandb").iterdir())
    finally:
        tracking.finish(logger)
