"""What differs between models in a run: the :class:`ModelAdapter` interface, the registry
of adapters by ``model.name``, and the helpers every adapter shares.

The pipeline (:mod:`regvi.run.pipeline`) trains, resumes, writes outputs, evaluates and
predicts through an adapter, so it has no model-specific branch. Adapters are imported only
when asked for (:func:`adapter_for`), so reading the registry costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regvi.errors import ConfigError, DataError

#: ``model.name`` -> (module, adapter class, the model class it trains).
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "rna": ("regvi.run.rna", "RnaAdapter", "AmbientRegularizedSCVI"),
    "multimodal": ("regvi.run.multimodal", "MultimodalAdapter", "RegularizedMultimodalVI"),
}
MODEL_NAMES = tuple(_REGISTRY)


@dataclass
class EvaluationData:
    """What ``regvi evaluate`` measures in a finished run.

    ``view``: an AnnData with the cells' obs (and ``obsm["X_umap"]`` when the run computed
    one), no X; ``embeddings``: name -> cells x dims array, ``"regvi"`` (the joint latent)
    first; ``covariate_keys``: the model's resolved covariate keys (shared by every
    modality); ``cell_masks``: name -> boolean mask of the cells an embedding is measured on
    (default: all); ``counts`` / ``var_names``: raw counts (cells x genes, CSR) in which
    marker genes are looked up and from which baselines are computed; ``info``: extra entries
    for ``metrics.json``.
    """

    view: Any
    embeddings: dict[str, Any]
    counts: Any
    var_names: list[str]
    covariate_keys: dict[str, Any] | None = None
    cell_masks: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class ModelAdapter:
    """The per-model steps of a run. Subclasses set :attr:`name` and :attr:`results_file`
    and implement every method."""

    name: str = ""
    results_file: str = ""

    # ------------------------------------------------ output steps every model shares
    @staticmethod
    def model_figures(
        model: Any, run_dir: Path, seed: int = 0, batch_size: int | None = None
    ) -> tuple[Path, dict[str, Path]]:
        """``figures/`` of the run (created) and the figures about the model drawn into it:
        the loss curves and the posterior predictive check (observed against predicted
        per-feature mean, variance and zero fraction by library, on at most
        :data:`~regvi.model.posterior.PPC_MAX_CELLS` cells; see
        :meth:`~regvi.model.posterior.PosteriorMixin.posterior_predictive_check`)."""
        from regvi import plots
        from regvi.run import layout

        fig_dir = run_dir / layout.FIGURES_DIR
        fig_dir.mkdir(exist_ok=True)
        table = model.posterior_predictive_check(batch_size=batch_size, seed=seed)
        return fig_dir, {
            "loss_curves": plots.plot_loss_curves(
                model.history, fig_dir / layout.LOSS_CURVES_FIGURE
            ),
            "posterior_predictive_check": plots.plot_posterior_predictive_check(
                table, fig_dir / layout.PPC_FIGURE
            ),
        }

    @staticmethod
    def save_model_and_history(model: Any, run_dir: Path) -> dict[str, Path]:
        """``model/`` and ``history.csv`` of the trained model, each written atomically."""
        from regvi.outputs import write_csv_atomic
        from regvi.run import layout

        return {
            "model": model.save(run_dir / layout.MODEL_DIR, overwrite=True),
            "history": write_csv_atomic(model.history, run_dir / layout.HISTORY_CSV),
        }

    def load_data(self, cfg: Any) -> Any:
        """The input cells: ``data.path`` or, when null, a built-in simulated dataset."""
        raise NotImplementedError

    def setup(self, data: Any, cfg: Any) -> tuple[Any, str | None]:
        """Register the data with the model class (covariates, layers); return the data to
        train on (possibly a subset of cells) and the labels key used for figures."""
        raise NotImplementedError

    def build(self, data: Any, cfg: Any) -> Any:
        """The untrained model for ``data`` with the options of ``cfg.model``."""
        raise NotImplementedError

    def describe(self, model: Any, data: Any) -> str:
        """One log line about the data and the model."""
        raise NotImplementedError

    def write_outputs(
        self,
        model: Any,
        data: Any,
        cfg: Any,
        run_dir: Path,
        logger: Any = False,
        labels_key: str | None = None,
    ) -> dict[str, Path]:
        """Latents, normalized values, figures, ``model/``, ``history.csv`` and the results
        file, each written atomically into ``run_dir``."""
        raise NotImplementedError

    def load_model(self, model_dir: Path) -> Any:
        """The model saved in ``model_dir``, without data."""
        raise NotImplementedError

    def read_matched(self, model: Any, cfg: Any) -> Any:
        """The cells of ``cfg.data.path`` with ``model``'s features (reordered by name, extra
        features dropped; missing ones are a :class:`~regvi.errors.DataError`); covariates
        not checked yet."""
        raise NotImplementedError

    def new_data(self, model: Any, cfg: Any) -> Any:
        """The cells of ``cfg.data.path`` matched to ``model`` (see :meth:`read_matched`),
        covariates checked (an unseen category fails here, before any output), set as the
        model's data."""
        data = self.read_matched(model, cfg)
        model._attach(data)
        model._dataset()
        return data

    def labels_key(self, model: Any, data: Any) -> str | None:
        """The labels column the model was set up with, when ``data`` has it."""
        key = model.setup_.get("labels_key")
        return key if key and key in data.obs.columns else None

    def evaluation_data(self, run_dir: Path, metadata: dict[str, Any]) -> EvaluationData:
        """What ``regvi evaluate`` needs from the finished run in ``run_dir``."""
        raise NotImplementedError


def adapter_for(name: str) -> ModelAdapter:
    """The adapter of ``model.name`` ``name``."""
    if name not in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is not one of {', '.join(MODEL_NAMES)}")
    module, cls, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()


def adapter_for_class(class_name: str, where: Path | str = "") -> ModelAdapter:
    """The adapter of the model class named ``class_name`` (as saved in ``model.json``)."""
    for name, (_, _, model_class) in _REGISTRY.items():
        if model_class == class_name:
            return adapter_for(name)
    raise DataError(f"{where} holds an unknown model class {class_name!r}")


def covariate_arguments(cfg: Any) -> dict[str, Any]:
    """The ``covariates.*`` keys as set-up arguments; for the built-in dataset with none set,
    its batches are its libraries (``batch_key="batch"``)."""
    from omegaconf import OmegaConf

    covariates = OmegaConf.to_container(cfg.covariates, resolve=True)
    if cfg.data.path is None and not any(covariates.values()):
        covariates["batch_key"] = "batch"
    return covariates


def labels_key_of(cfg: Any) -> str | None:
    """``data.labels_key``; for the built-in dataset, its ``cell_type`` column by default."""
    if cfg.data.labels_key is None and cfg.data.path is None:
        return "cell_type"
    return cfg.data.labels_key


def plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (other values unchanged)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
