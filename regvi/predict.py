"""``regvi predict <run_dir> data.path=<new.h5ad>``: encode new cells with a trained model and
write the same outputs as training (``results.h5ad`` with ``obsm["X_regvi"]``, normalized
expression, UMAP figures, a copy of the model) into a new directory."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from regvi.config import TrainConfig, validate_config
from regvi.data.io import read_h5ad
from regvi.errors import ConfigError, DataError, RegviError
from regvi.outputs import MODEL_DIR, RESULTS_H5AD

log = logging.getLogger("regvi")

#: Keys ``regvi predict`` accepts as ``key=value`` (prefixes end with a dot).
PREDICT_KEYS = ("data.path", "data.layer", "seed", "trainer.enable_progress_bar", "outputs.")

__all__ = ["PREDICT_KEYS", "parse_overrides", "run_config", "predict"]


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """``["data.path=x.h5ad", ...]`` -> ``{"data.path": "x.h5ad"}``; unknown keys are an
    error listing the accepted ones."""
    out: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.strip().lstrip("+")
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {arg!r} (e.g. data.path=new.h5ad)")
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in PREDICT_KEYS):
            raise ConfigError(
                f"unknown key {key!r} for regvi predict; accepted: data.path, data.layer, seed, "
                "trainer.enable_progress_bar, outputs.<key>"
            )
        out[key] = value
    return out


def run_config(run_dir: Path, overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """The run's resolved config (``.hydra/config.yaml``, else the defaults) with
    ``overrides`` applied and validated."""
    path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path) if path.exists() else OmegaConf.structured(TrainConfig)
    dotlist = [f"{k}={v}" for k, v in (overrides or {}).items()]
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except Exception as exc:
        raise ConfigError(f"invalid override: {str(exc).splitlines()[0]}") from None
    return validate_config(cfg)


def predict(
    run_dir: str | Path,
    data_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    layer: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Encode the cells of ``data_path`` with the model saved in ``<run_dir>/model`` and
    write the outputs of training into ``out_dir`` (default
    ``<run_dir>/predict/<timestamp>``); return ``out_dir``.

    The new data must contain every gene of the model (any order: columns are reordered by
    name, extra genes are dropped; missing genes are an error saying how many), the obs
    columns of the model's covariates with categories seen in training (an unseen category is
    an error naming it), and raw counts in ``X`` or ``layer`` (default: the training layer).
    """
    from regvi.model import AmbientRegularizedSCVI
    from regvi.workflow import write_outputs

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_DIR).is_dir():
        raise DataError(f"{run_dir} has no {MODEL_DIR}/ directory; is it a regvi train run?")
    values = dict(overrides or {})
    if data_path is not None:
        values["data.path"] = str(data_path)
    if layer is not None:
        values["data.layer"] = layer
    if not values.get("data.path"):
        raise ConfigError("regvi predict needs the new cells: data.path=<file.h5ad>")
    cfg = run_config(run_dir, {k: v for k, v in values.items() if k != "data.layer"})
    model = AmbientRegularizedSCVI.load(run_dir / MODEL_DIR)
    if "data.layer" in values:
        lay = values["data.layer"]
        model.setup_["layer"] = None if lay in ("", "null", "None") else lay
    adata = read_h5ad(cfg.data.path)
    adata = _match_genes(adata, model.gene_names)
    model.adata = adata
    model._data_cache = None
    # validate the covariates now, so an unseen category fails before any output is written
    model._dataset(adata)

    labels_key = model.setup_.get("labels_key")
    if labels_key and labels_key not in adata.obs.columns:
        labels_key = None
    if out_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        out_dir = run_dir / "predict" / stamp
    out_dir = Path(out_dir)
    if (out_dir / RESULTS_H5AD).exists():
        raise RegviError(f"{out_dir} already holds {RESULTS_H5AD}; choose a new output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.history_ is None:  # the loss-curve figure needs a history table
        model.history_ = pd.DataFrame({"epoch": []})
    write_outputs(model, adata, cfg, out_dir, False, labels_key)
    OmegaConf.save(cfg, out_dir / "config.yaml")
    return out_dir


def _match_genes(adata: Any, gene_names: list[str]) -> Any:
    """``adata`` restricted to the model's genes in the model's order."""
    names = pd.Index(map(str, adata.var_names))
    if list(names) == list(gene_names):
        return adata
    missing = pd.Index(gene_names).difference(names)
    if len(missing):
        raise DataError(
            f"{len(missing)} of the model's {len(gene_names)} genes are missing from the data "
            f"(e.g. {', '.join(map(repr, list(missing[:5])))}); the data must contain every "
            "gene the model was trained on"
        )
    if not names.is_unique:
        raise DataError("duplicate gene names in the data; make var_names unique")
    extra = len(names) - len(gene_names)
    if extra:
        log.info("dropping %d genes the model was not trained on", extra)
    adata.var_names = names
    return adata[:, gene_names].copy()
