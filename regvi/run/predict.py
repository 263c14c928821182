"""``regvi predict <run_dir> data.path=<new.h5ad|new.h5mu>``: encode new cells with a trained
model (either model) and write the same outputs as training (the results file with
``obsm["X_regvi"]``, normalized values, UMAP figures, a copy of the model) into a new
directory."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from regvi.config import TrainConfig, validate_config
from regvi.errors import ConfigError, DataError, RegviError
from regvi.outputs import atomic_write
from regvi.run import layout
from regvi.run.adapter import ModelAdapter, adapter_for_class

log = logging.getLogger("regvi")

#: Keys ``regvi predict`` accepts as ``key=value`` (prefixes end with a dot).
PREDICT_KEYS = ("data.path", "data.layer", "seed", "trainer.enable_progress_bar", "outputs.")

__all__ = ["PREDICT_KEYS", "parse_overrides", "run_config", "load_run_model", "predict"]


def parse_overrides(
    args: Sequence[str], keys: Sequence[str] = PREDICT_KEYS, command: str = "predict"
) -> dict[str, str]:
    """``["data.path=x.h5ad", ...]`` -> ``{"data.path": "x.h5ad"}``; a key not in ``keys``
    (prefixes end with a dot) is an error listing the accepted ones."""
    out: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.strip().lstrip("+")
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {arg!r} (e.g. data.path=new.h5ad)")
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            accepted = ", ".join(f"{k}<key>" if k.endswith(".") else k for k in keys)
            raise ConfigError(f"unknown key {key!r} for regvi {command}; accepted: {accepted}")
        out[key] = value
    return out


def run_config(run_dir: Path, overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """The run's resolved config (``.hydra/config.yaml``, else ``config.yaml``, else the
    defaults) with ``overrides`` applied and validated."""
    path = layout.run_config_path(run_dir)
    cfg = OmegaConf.load(path) if path is not None else OmegaConf.structured(TrainConfig)
    dotlist = [f"{k}={v}" for k, v in (overrides or {}).items()]
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except Exception as exc:
        raise ConfigError(f"invalid override: {str(exc).splitlines()[0]}") from None
    return validate_config(cfg)


def command_output_dir(
    run_dir: Path, subdir: str, out_dir: str | Path | None, results_file: str
) -> Path:
    """Where a command that reads new cells writes: ``out_dir``, or by default a new
    ``<run_dir>/<subdir>/<timestamp>``. Raises :class:`~regvi.errors.RegviError` when it
    already holds a results file, so that no earlier output is overwritten."""
    if out_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        out_dir = run_dir / subdir / stamp
    out_dir = Path(out_dir)
    if (out_dir / results_file).exists():
        raise RegviError(f"{out_dir} already holds {results_file}; choose a new output directory")
    return out_dir


def load_run_model(
    run_dir: Path, values: Mapping[str, Any], command: str
) -> tuple[DictConfig, ModelAdapter, Any]:
    """The run's config with ``values`` applied, the adapter of its model and the model saved
    in ``<run_dir>/model`` (with ``data.layer`` from ``values`` as its count layer), for a
    command that reads new cells (``data.path`` is required)."""
    model_dir = run_dir / layout.MODEL_DIR
    metadata_path = model_dir / layout.MODEL_METADATA
    if not metadata_path.exists():
        raise DataError(
            f"{run_dir} has no {layout.MODEL_DIR}/{layout.MODEL_METADATA}; is it a regvi train run?"
        )
    if not values.get("data.path"):
        raise ConfigError(f"regvi {command} needs the new cells: data.path=<file>")
    cfg = run_config(run_dir, {k: v for k, v in values.items() if k != "data.layer"})
    class_name = json.loads(metadata_path.read_text()).get("class", "")
    adapter = adapter_for_class(class_name, model_dir)
    model = adapter.load_model(model_dir)
    if "data.layer" in values:
        if "layer" not in model.setup_:
            raise ConfigError(
                f"data.layer does not apply to a {class_name}: its count layers are the "
                "modalities' training layers"
            )
        lay = values["data.layer"]
        model.setup_["layer"] = None if lay in ("", "null", "None") else lay
    return cfg, adapter, model


def predict(
    run_dir: str | Path,
    data_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    layer: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Encode the cells of ``data_path`` with the model saved in ``<run_dir>/model`` (either
    model) and write the outputs of training into ``out_dir`` (default
    ``<run_dir>/predict/<timestamp>``); return ``out_dir``.

    The new data (``.h5ad`` for the RNA model, ``.h5mu`` for the multimodal one) must contain
    every feature of the model, per modality (any order: columns are reordered by name, extra
    features are dropped; missing features are an error saying how many), the obs columns of
    the model's covariates with categories seen in training (an unseen category is an error
    naming it), and raw counts in ``X`` or ``layer`` (RNA; default: the training layer) or in
    the modalities' training layers.
    """
    run_dir = Path(run_dir)
    values = dict(overrides or {})
    if data_path is not None:
        values["data.path"] = str(data_path)
    if layer is not None:
        values["data.layer"] = layer
    cfg, adapter, model = load_run_model(run_dir, values, "predict")
    data = adapter.new_data(model, cfg)
    labels_key = adapter.labels_key(model, data)
    out_dir = command_output_dir(run_dir, layout.PREDICT_DIR, out_dir, adapter.results_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.history_ is None:  # the loss-curve figure needs a history table
        model.history_ = pd.DataFrame({"epoch": []})
    adapter.write_outputs(model, data, cfg, out_dir, False, labels_key)
    atomic_write(out_dir / layout.RUN_CONFIG, lambda p: p.write_text(OmegaConf.to_yaml(cfg)))
    return out_dir
