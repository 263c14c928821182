"""Every shipped config composes and validates, and the defaults agree wherever they are
written: ``conf/**/*.yaml``, the schema (:mod:`regvi.config`) and the models' defaults
(:mod:`regvi.model.defaults`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from regvi.config import ModelConfig, TrainConfig, validate_config
from regvi.model.defaults import MULTIMODAL_DEFAULTS, MULTIMODAL_FALLBACKS, RNA_DEFAULTS

CONF = Path(__file__).resolve().parents[1] / "conf"
#: config group -> its options, found by walking conf/ (a group is a directory of YAMLs).
GROUPS = {
    str(d.relative_to(CONF)): sorted(p.stem for p in d.glob("*.yaml"))
    for d in sorted(CONF.rglob("*"))
    if d.is_dir() and any(d.glob("*.yaml"))
}
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]


def composed(*overrides: str, hydra: bool = False):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3", job_name="regvi"):
            return compose("train", overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def flat_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
    return keys


def test_every_group_is_found():
    assert {"data", "covariates", "model", "trainer", "logger", "hydra/launcher"} <= set(GROUPS)
    assert {"rna", "multimodal"} <= set(GROUPS["model"]) and len(OPTIONS) >= 12


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    is_hydra = group.startswith("hydra")
    cfg = composed(f"{group}={option}", hydra=is_hydra)
    plain = OmegaConf.to_container(cfg)
    if is_hydra:  # a launcher: composed with its schema, and the run config is unchanged
        launcher = plain.pop("hydra")["launcher"]
        assert launcher["_target_"].endswith("Launcher") and "queue" in launcher
    validated = validate_config(OmegaConf.create(plain))
    if group in ("model", "logger"):
        assert validated[group]["name"] == option


def test_composed_defaults_equal_the_schema_defaults():
    """`regvi train` with no overrides runs exactly the schema's defaults, key for key."""
    cfg = composed()
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    plain = OmegaConf.to_container(cfg)
    assert flat_keys(plain) == flat_keys(schema) - {"model.modalities"}
    assert OmegaConf.to_container(validate_config(cfg)) == schema


def test_model_yaml_schema_and_python_defaults_agree():
    schema = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert set(schema) == {"name", *RNA_DEFAULTS, "modalities"}
    for key, value in RNA_DEFAULTS.items():
        assert schema[key] == value, key
    # the multimodal model's scalars are the RNA model's but for a 10-d block per modality
    # and one hidden layer (regvi/model/defaults.py says why)
    assert MULTIMODAL_FALLBACKS == {
        **RNA_DEFAULTS,
        "n_latent": 10,
        "n_layers": 1,
        "library_sensitivity": 1.0,
    }

    rna = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "rna.yaml"))
    assert rna == {"name": "rna", **RNA_DEFAULTS}

    multimodal = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "multimodal.yaml"))
    per_modality = multimodal.pop("modalities")
    assert multimodal == {
        "name": "multimodal",
        **{k: MULTIMODAL_FALLBACKS[k] for k in RNA_DEFAULTS},
    }
    # the per-modality defaults of the Python class are written in the YAML...
    for key, value in MULTIMODAL_DEFAULTS.items():
        if isinstance(value, dict):
            for modality, v in value.items():
                assert per_modality[modality][key] == v, (modality, key)
    # ...and every per-modality value in the YAML is the Python default for that modality
    for modality, options in per_modality.items():
        for key, v in options.items():
            default = MULTIMODAL_DEFAULTS[key]
            if isinstance(default, dict) and modality in default:
                assert v == default[modality], (modality, key)
            else:
                assert v == MULTIMODAL_FALLBACKS[key], (modality, key)


def test_multimodal_run_builds_the_python_defaults():
    """model=multimodal composed from the YAML gives the class its own defaults."""
    from regvi.run.multimodal import model_arguments

    kwargs, roles = model_arguments(composed("model=multimodal", "data=multiome"), ["atac", "rna"])
    resolved = {
        key: (value if not isinstance(value, dict) else {m: value.get(m) for m in ("atac", "rna")})
        for key, value in kwargs.items()
    }
    assert roles == {}
    for key, default in MULTIMODAL_DEFAULTS.items():
        if key not in resolved:
            assert key == "library_sensitivity"
            continue
        for m in ("atac", "rna"):
            got = resolved[key][m] if isinstance(resolved[key], dict) else resolved[key]
            want = (
                default.get(m, MULTIMODAL_FALLBACKS[key]) if isinstance(default, dict) else default
            )
            assert got == want, (key, m)


@pytest.mark.parametrize("key", ["dropout_rate", "hidden_dropout_rate"])
def test_dropout_rates_outside_zero_one_are_refused(key):
    from regvi.errors import ConfigError

    cfg = OmegaConf.create(OmegaConf.to_container(composed(f"model.{key}=1.0")))
    with pytest.raises(ConfigError, match=rf"model\.{key} must be in \[0, 1\) \(got 1.0\)"):
        validate_config(cfg)
