"""The RNA model's part of a run (``model=rna``): :class:`AmbientRegularizedSCVI` on an
AnnData, results in ``results.h5ad``.

``results.h5ad`` holds the input cells with ``obsm["X_regvi"]`` (the latent),
``obsm["X_umap"]``, the ``regvi_normalized`` layer and the run's config in
``uns["regvi_config"]``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from regvi import tracking
from regvi.run import layout
from regvi.run.adapter import (
    EvaluationData,
    ModelAdapter,
    covariate_arguments,
    labels_key_of,
)

log = logging.getLogger("regvi")

#: Options of ``cfg.model`` that are not constructor arguments of the RNA model.
_NOT_MODEL_ARGUMENTS = ("name", "modalities")


def load_input(cfg: DictConfig) -> Any:
    """The input AnnData: ``data.path`` or, when null, the built-in simulated dataset."""
    from regvi.data.io import read_h5ad

    if cfg.data.path is None:
        from regvi.datasets import simulate

        s = cfg.data.simulate
        adata, _ = simulate(
            n_cells=s.n_cells,
            n_genes=s.n_genes,
            n_cell_types=s.n_cell_types,
            n_batches=s.n_batches,
            seed=s.seed,
        )
        return adata
    return read_h5ad(cfg.data.path, backed=cfg.data.backed)


class RnaAdapter(ModelAdapter):
    """:class:`~regvi.model.AmbientRegularizedSCVI` runs."""

    name = "rna"
    results_file = layout.RESULTS_FILES["rna"]

    def load_data(self, cfg: DictConfig) -> Any:
        return load_input(cfg)

    def setup(self, data: Any, cfg: DictConfig) -> tuple[Any, str | None]:
        from regvi.model.rna import AmbientRegularizedSCVI

        labels_key = labels_key_of(cfg)
        AmbientRegularizedSCVI.setup_anndata(
            data, layer=cfg.data.layer, labels_key=labels_key, **covariate_arguments(cfg)
        )
        return data, labels_key

    def build(self, data: Any, cfg: DictConfig) -> Any:
        from regvi.model.rna import AmbientRegularizedSCVI

        options = OmegaConf.to_container(cfg.model, resolve=True)
        kwargs = {k: v for k, v in options.items() if k not in _NOT_MODEL_ARGUMENTS}
        return AmbientRegularizedSCVI(data, **kwargs)

    def describe(self, model: Any, data: Any) -> str:
        p = model.init_params
        return (
            f"data: {data.n_obs} cells x {data.n_vars} genes; model: n_latent={p['n_latent']} "
            f"n_hidden={p['n_hidden']} n_layers={p['n_layers']}"
        )

    def write_outputs(
        self,
        model: Any,
        data: Any,
        cfg: DictConfig,
        run_dir: Path,
        logger: Any = False,
        labels_key: str | None = None,
    ) -> dict[str, Path]:
        import anndata as ad
        from tqdm.auto import tqdm

        from regvi import plots
        from regvi.outputs import write_h5ad_atomic

        adata = data
        o = cfg.outputs
        steps = ["latent", "normalized expression", "UMAP + figures", "model", self.results_file]
        written: dict[str, Path] = {}
        figures: dict[str, Path] = {}
        streamed: dict[str, Any] = {}
        bar = tqdm(steps, desc="writing outputs", disable=not cfg.trainer.enable_progress_bar)
        for step in bar:
            bar.set_postfix_str(step)
            if step == "latent":
                adata.obsm[layout.LATENT_KEY] = model.get_latent_representation(
                    batch_size=o.batch_size, progress="latent"
                )
            elif step == "normalized expression" and o.normalized_expression:
                # Streamed into the results file batch by batch when it is written: never a
                # dense cells x genes array in memory.
                def fill(dataset, model=model) -> None:
                    model.get_normalized_expression(
                        library_size=o.normalized_library_size,
                        batch_size=o.batch_size,
                        out=dataset,
                        progress="normalized expression",
                    )

                streamed[layout.NORMALIZED_LAYER] = fill
            elif step == "UMAP + figures" and o.figures:
                fig_dir, curves = self.model_figures(model, run_dir, cfg.seed, o.batch_size)
                figures.update(curves)
                plots.compute_umap(adata, use_rep=layout.LATENT_KEY, seed=cfg.seed)
                keys = [k for k in (model.covariates.keys.library_key, labels_key) if k]
                figures["umap"] = plots.plot_embedding(
                    adata, keys, fig_dir / "umap.png", title_prefix="regvi latent: "
                )
                written.update(figures)
            elif step == "model":
                written.update(self.save_model_and_history(model, run_dir))
            elif step == self.results_file:
                adata.uns[layout.CONFIG_UNS_KEY] = OmegaConf.to_yaml(cfg)
                target = adata
                if adata.isbacked:
                    # Out-of-core input: write everything but X from memory, then copy X from
                    # the input file inside HDF5 (never loaded).
                    target = ad.AnnData(
                        obs=adata.obs, var=adata.var, obsm=dict(adata.obsm), uns=dict(adata.uns)
                    )
                written["results"] = write_h5ad_atomic(
                    target,
                    run_dir / self.results_file,
                    streamed,
                    copy_x_from=adata.filename if adata.isbacked else None,
                )
        tracking.log_figures(logger, figures)
        log.info("outputs written to %s", os.fspath(run_dir))
        return written

    def load_model(self, model_dir: Path) -> Any:
        from regvi.model.rna import AmbientRegularizedSCVI

        return AmbientRegularizedSCVI.load(model_dir)

    def read_matched(self, model: Any, cfg: DictConfig) -> Any:
        from regvi.data.features import match_features
        from regvi.data.io import read_h5ad

        adata = read_h5ad(cfg.data.path)
        adata = match_features(adata, model.gene_names, "genes")
        return adata.copy() if adata.is_view else adata

    def evaluation_data(self, run_dir: Path, metadata: dict[str, Any]) -> EvaluationData:
        from regvi.data.io import count_matrix, read_h5ad
        from regvi.errors import DataError

        results = run_dir / self.results_file
        adata = read_h5ad(results)
        if layout.LATENT_KEY not in adata.obsm:
            raise DataError(f"{results} has no obsm[{layout.LATENT_KEY!r}]")
        layer = metadata.get("setup", {}).get("layer")
        return EvaluationData(
            view=adata,
            embeddings={"regvi": np.asarray(adata.obsm[layout.LATENT_KEY])},
            counts=count_matrix(adata, layer),
            covariate_keys=metadata["covariates"]["keys"] if "covariates" in metadata else None,
            var_names=list(map(str, adata.var_names)),
        )
