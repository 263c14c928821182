"""The schema of ``regvi train``'s configuration, and its validation.

``conf/`` holds the YAML groups that Hydra composes; the dataclasses below are the schema the
composed config must fit. :func:`validate_config` merges a composed config into the schema so
an unknown key (``model.n_latnet``) or a wrong type (``model.n_latent=abc``) fails *before*
any data is read, with a :class:`~regvi.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from regvi.errors import ConfigError
from regvi.model.defaults import RNA_DEFAULTS


@dataclass
class SimulateConfig:
    """The built-in dataset used when ``data.path`` is null (see :mod:`regvi.datasets`)."""

    n_cells: int = 3000
    n_genes: int = 1000
    n_cell_types: int = 6
    n_batches: int = 3
    seed: int = 0


@dataclass
class DataConfig:
    path: str | None = None
    layer: str | None = None
    labels_key: str | None = None
    batch_size: int = 128
    validation_batch_size: int | None = None
    train_size: float = 0.9
    num_workers: int = 0
    minibatches_per_fetch: int | None = None
    shuffle_block_cells: int | None = None
    backed: bool = False
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    # Multimodal (.h5mu) only: a list of modality names or {name: count layer}; null = all.
    modalities: Any = None
    missing_cells: str = "error"  # a cell absent from a modality: "error" or "mask"


@dataclass
class CovariatesConfig:
    """SPEC section 1: the five model keys, the purpose keys and ``batch_key``."""

    batch_key: str | None = None
    library_key: str | None = None
    dataset_key: str | None = None
    technical_covariate_keys: list[str] | None = None
    ambient_covariate_keys: list[str] | None = None
    nn_conditioning_covariate_keys: list[str] | None = None
    feature_scaling_covariate_keys: list[str] | None = None
    dispersion_key: str | None = None
    library_size_key: str | None = None
    encoder_covariate_keys: list[str] | None = None
    continuous_covariate_keys: list[str] | None = None


def _model_fields() -> list[tuple[str, Any, Any]]:
    """``name``, then every option of :data:`regvi.model.defaults.RNA_DEFAULTS` with its type
    and default, then ``modalities``."""
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default="rna"))]
    # the options whose default is None: hidden_dropout_rate (chosen from the data) and
    # decoder_norm (as norm)
    unset = {"hidden_dropout_rate": Optional[float], "decoder_norm": Optional[str]}  # noqa: UP045 (OmegaConf)
    for key, value in RNA_DEFAULTS.items():
        kind = unset[key] if value is None else type(value)
        fields.append((key, kind, field(default=value)))
    # Multimodal only: {modality: {option: value}} overriding the options above (n_latent,
    # use_ambient, ...) and the covariate roles (ambient_covariate_keys, ...) per modality.
    fields.append(("modalities", Any, field(default=None)))
    return fields


#: Constructor arguments of the model (``name`` picks the model class), built from the
#: models' defaults (:mod:`regvi.model.defaults`), so the schema cannot drift from them.
ModelConfig = make_dataclass("ModelConfig", _model_fields())
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = "Constructor arguments of the model (``name`` picks the model class)."


@dataclass
class TrainerConfig:
    max_epochs: int | None = None
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    kl_warmup_fraction: float = 0.5
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta_per_feature: float = 2e-4
    gradient_clip_val: float | None = None
    enable_progress_bar: bool = True
    checkpoint_every_n_epochs: int = 1
    checkpoint_min_interval_s: float = 10.0
    deterministic: bool = False
    reuse_host_memory: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "regvi"
    mode: str = "offline"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class OutputsConfig:
    normalized_expression: bool = True
    normalized_library_size: float = 10000.0
    figures: bool = True
    batch_size: int | None = None  # null: up to 1024 cells, fewer for wide data
    normalized_modalities: Any = None  # multimodal: modalities to write; null = all


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    covariates: CovariatesConfig = field(default_factory=CovariatesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    evaluate: bool = False


_CHOICES = {
    "model.name": ("rna", "multimodal"),
    "logger.name": ("wandb", "csv", "none"),
    "logger.mode": ("online", "offline", "disabled"),
    "model.activation": ("relu", "elu", "gelu", "silu", "tanh"),
}


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            full = f"{prefix}{k}"
            keys.append(full)
            keys += _all_keys(v, full + ".")
    return keys


def known_key(full_key: str) -> bool:
    """Whether ``full_key`` (dotted) is a key of the schema."""
    return full_key in _all_keys(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))


def _suggest(full_key: str) -> str:
    known = _all_keys(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    close = difflib.get_close_matches(full_key, known, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key_message(full_key: str) -> str:
    """The one-line message for an unknown config key, with a did-you-mean suggestion."""
    return f"unknown config key '{full_key}'{_suggest(full_key)}"


def validate_config(cfg: DictConfig | dict) -> DictConfig:
    """Merge ``cfg`` into the :class:`TrainConfig` schema; raise :class:`ConfigError` naming
    the first unknown key, wrong-typed value or out-of-range value."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except ConfigKeyError as exc:
        raise ConfigError(unknown_key_message(str(exc.full_key))) from None
    except ValidationError as exc:
        msg = str(exc.msg).splitlines()[0] if exc.msg else str(exc).splitlines()[0]
        raise ConfigError(f"invalid value for config key '{exc.full_key}': {msg}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {str(exc).splitlines()[0]}") from None
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    positive = ("data.batch_size", "model.n_latent", "model.n_hidden", "model.n_layers")
    for key in positive:
        value = OmegaConf.select(merged, key)
        if value < 1:
            raise ConfigError(f"{key} must be at least 1 (got {value})")
    for key in ("data.minibatches_per_fetch", "data.shuffle_block_cells", "outputs.batch_size"):
        value = OmegaConf.select(merged, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1 or null (got {value})")
    if not 0 < merged.data.train_size <= 1:
        raise ConfigError(f"data.train_size must be in (0, 1] (got {merged.data.train_size})")
    if merged.trainer.max_epochs is not None and merged.trainer.max_epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs must be at least 1 (got {merged.trainer.max_epochs})"
        )
    for key in ("dropout_rate", "hidden_dropout_rate"):
        value = merged.model[key]
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"model.{key} must be in [0, 1) (got {value})")
    return merged
