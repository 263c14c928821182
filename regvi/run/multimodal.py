"""The multimodal model's part of a run (``model=multimodal``): :class:`RegularizedMultimodalVI`
on a MuData, results in ``results.h5mu``.

``results.h5mu`` holds the input MuData with ``obsm["X_regvi"]`` (the joint latent, blocks in
alphabetical order of modality names), ``obsm["X_regvi_<modality>"]``, ``obsm["X_umap"]``,
each asked modality's ``layers["regvi_normalized"]``, and in ``obs`` the attribution scores
``regvi_attr_<decoder>_z_<block>``, the shares ``regvi_attr_share_<decoder>_z_<block>`` and
``regvi_measured_<modality>``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from regvi import tracking
from regvi.errors import ConfigError, DataError
from regvi.run import layout
from regvi.run.adapter import (
    EvaluationData,
    ModelAdapter,
    covariate_arguments,
    labels_key_of,
    plain,
)

log = logging.getLogger("regvi")

#: Attribution share columns in obs: ``regvi_attr_share_<decoder>_z_<block>``.
_SHARE_PREFIX = "regvi_attr_share_"


def load_multiome(cfg: DictConfig) -> Any:
    """``data.path`` as MuData or, when null, a simulated RNA + ATAC multiome."""
    from regvi.data.mudata_io import read_h5mu

    if cfg.data.path is not None:
        return read_h5mu(cfg.data.path)
    import mudata

    from regvi.datasets import simulate_multiome

    # data.simulate's keys are simulate_multiome's arguments; as many peaks as genes.
    rna, atac, _ = simulate_multiome(**plain(cfg.data.simulate), n_peaks=cfg.data.simulate.n_genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.MuData({"rna": rna, "atac": atac})
    mdata.obs = rna.obs.copy()
    return mdata


def model_arguments(cfg: DictConfig, names: list[str]) -> tuple[dict, dict]:
    """Model keyword arguments (per-modality dicts where ``model.modalities`` overrides a
    scalar) and the per-modality covariate roles, for the data's modalities ``names``."""
    from regvi.model.defaults import MULTIMODAL_DEFAULTS
    from regvi.model.multimodal import MODALITY_COVARIATE_ROLES

    options = plain(cfg.model)
    options.pop("name", None)
    per = options.pop("modalities", None) or {}
    absent = sorted(set(per) - set(names))
    if absent:
        log.info("model.modalities: ignoring %s (not in the data)", ", ".join(absent))
    covariates: dict[str, dict] = {}
    for m in names:
        for key in per.get(m) or {}:
            if key not in MULTIMODAL_DEFAULTS and key not in MODALITY_COVARIATE_ROLES:
                raise ConfigError(f"model.modalities.{m}.{key} is not a model option or role")
        covariates[m] = {
            k: v for k, v in (per.get(m) or {}).items() if k in MODALITY_COVARIATE_ROLES
        }
    kwargs: dict[str, Any] = {}
    for key in MULTIMODAL_DEFAULTS:
        given = {m: per[m][key] for m in names if key in (per.get(m) or {})}
        if key in options:
            kwargs[key] = {m: given.get(m, options[key]) for m in names} if given else options[key]
        elif given:
            kwargs[key] = given
    return kwargs, {m: c for m, c in covariates.items() if c}


def _subset(mdata: Any, cells: Any) -> Any:
    if cells.equals(mdata.obs_names):
        return mdata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mdata[cells].copy()


class MultimodalAdapter(ModelAdapter):
    """:class:`~regvi.model.RegularizedMultimodalVI` runs."""

    name = "multimodal"
    results_file = layout.RESULTS_FILES["multimodal"]

    def load_data(self, cfg: DictConfig) -> Any:
        return load_multiome(cfg)

    def setup(self, data: Any, cfg: DictConfig) -> tuple[Any, str | None]:
        from regvi.data.mudata_io import resolve_modalities, shared_cells
        from regvi.model.multimodal import RegularizedMultimodalVI

        layers = resolve_modalities(data, plain(cfg.data.modalities))
        # cells only in unused modalities are dropped
        mdata = _subset(data, shared_cells(data, list(layers), cfg.data.missing_cells))
        _, modality_covariates = model_arguments(cfg, list(layers))
        labels_key = labels_key_of(cfg)
        RegularizedMultimodalVI.setup_mudata(
            mdata,
            modalities=layers,
            labels_key=labels_key,
            missing_cells=cfg.data.missing_cells,
            modality_covariates=modality_covariates,
            **covariate_arguments(cfg),
        )
        return mdata, labels_key

    def build(self, data: Any, cfg: DictConfig) -> Any:
        from regvi.data.mudata_io import resolve_modalities
        from regvi.model.multimodal import RegularizedMultimodalVI

        names = list(resolve_modalities(data, plain(cfg.data.modalities)))
        kwargs, _ = model_arguments(cfg, names)
        return RegularizedMultimodalVI(data, **kwargs)

    def describe(self, model: Any, data: Any) -> str:
        features = ", ".join(f"{m} {len(f)} features" for m, f in model.feature_names.items())
        blocks = {m: (s.start, s.stop) for m, s in model.latent_blocks.items()}
        return f"data: {data.n_obs} cells; {features}; latent blocks {blocks}"

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

        from regvi import plots
        from regvi.attribution import attribution_obs_columns
        from regvi.outputs import write_h5mu_atomic

        mdata = data
        o = cfg.outputs
        written: dict[str, Path] = {}
        bars = cfg.trainer.enable_progress_bar
        joint = model.get_latent_representation(
            batch_size=o.batch_size, progress="latent" if bars else None
        )
        mdata.obsm[layout.LATENT_KEY] = joint
        for m, cols in model.latent_blocks.items():
            mdata.obsm[layout.modality_latent_key(m)] = joint[:, cols]
            totals = np.asarray(model._dataset().matrices[m].sum(axis=1)).ravel()
            mdata.obs[layout.measured_column(m)] = totals > 0
        asked = plain(o.normalized_modalities)
        if asked is None:
            asked = model.modality_names
        elif isinstance(asked, str):
            asked = [asked]
        # Streamed into the results file batch by batch when it is written, in each
        # modality's own cell order: never a dense cells x features array in memory.
        streamed: dict[str, dict[str, Any]] = {}
        for m in asked if o.normalized_expression else []:

            def fill(dataset, modality=m) -> None:
                model.get_normalized_expression(
                    modality,
                    indices=mdata.obs_names.get_indexer(mdata.mod[modality].obs_names),
                    library_size=o.normalized_library_size,
                    batch_size=o.batch_size,
                    out=dataset,
                    progress=f"normalized {modality}" if bars else None,
                )

            streamed[m] = {layout.NORMALIZED_LAYER: fill}
        table = model.get_modality_attribution(
            batch_size=None if o.batch_size is None else min(o.batch_size, 256),
            progress="attribution" if bars else None,
        )
        for col, values in attribution_obs_columns(table).items():
            mdata.obs[col] = values.to_numpy()
        if o.figures:
            fig_dir, curves = self.model_figures(model, run_dir, cfg.seed, o.batch_size)
            written.update(curves)
            view = ad.AnnData(obs=mdata.obs.copy())
            view.obsm[layout.LATENT_KEY] = joint
            mdata.obsm[layout.UMAP_KEY] = plots.compute_umap(
                view, use_rep=layout.LATENT_KEY, seed=cfg.seed
            )
            keys = [k for k in (model.shared_covariates.keys.library_key, labels_key) if k]
            measured = [layout.measured_column(m) for m in model.modality_names]
            keys += [k for k in measured if not view.obs[k].all()] or ([] if keys else measured[:1])
            written["umap"] = plots.plot_embedding(
                view, keys, fig_dir / "umap.png", title_prefix="regvi latent: "
            )
            written["attribution"] = plots.plot_attribution_scatter(
                view, fig_dir / "attribution.png"
            )
        figures = dict(written)
        written.update(self.save_model_and_history(model, run_dir))
        mdata.uns[layout.CONFIG_UNS_KEY] = OmegaConf.to_yaml(cfg)
        written["results"] = write_h5mu_atomic(mdata, run_dir / self.results_file, streamed)
        tracking.log_figures(logger, figures)
        log.info("outputs written to %s", os.fspath(run_dir))
        return written

    def load_model(self, model_dir: Path) -> Any:
        from regvi.model.multimodal import RegularizedMultimodalVI

        return RegularizedMultimodalVI.load(model_dir)

    def read_matched(self, model: Any, cfg: DictConfig) -> Any:
        import mudata

        from regvi.data.features import match_features
        from regvi.data.mudata_io import read_h5mu, shared_cells

        mdata = read_h5mu(cfg.data.path)
        absent = [m for m in model.modality_names if m not in mdata.mod]
        if absent:
            raise DataError(
                f"modality {', '.join(map(repr, absent))} of the model is not in "
                f"{cfg.data.path} (it has {', '.join(mdata.mod) or 'no modality'})"
            )
        cells = shared_cells(mdata, model.modality_names, model.setup_["missing_cells"])
        aligned = {
            m: match_features(mdata.mod[m], model.feature_names[m], f"{m!r} features").copy()
            for m in model.modality_names
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            matched = mudata.MuData(aligned)
        matched.obs = mdata.obs.reindex(matched.obs_names).copy()
        return _subset(matched, cells)

    def labels_key(self, model: Any, data: Any) -> str | None:
        key = model.setup_.get("labels_key")
        if not key:
            return None
        from regvi.data.mudata_io import shared_obs

        obs = shared_obs(data, model.modality_names, data.obs_names)
        return key if key in obs.columns else None

    def evaluation_data(self, run_dir: Path, metadata: dict[str, Any]) -> EvaluationData:
        import anndata as ad

        from regvi.data.mudata_io import modality_counts, read_h5mu, shared_obs

        results = run_dir / self.results_file
        mdata = read_h5mu(results)
        if layout.LATENT_KEY not in mdata.obsm:
            raise DataError(f"{results} has no obsm[{layout.LATENT_KEY!r}]")
        setup = metadata.get("setup", {})
        names = list(metadata.get("modality_names") or setup.get("modalities") or mdata.mod)
        cells = mdata.obs_names
        view = ad.AnnData(obs=shared_obs(mdata, names, cells))
        if layout.UMAP_KEY in mdata.obsm:
            view.obsm[layout.UMAP_KEY] = np.asarray(mdata.obsm[layout.UMAP_KEY])
        embeddings = {"regvi": np.asarray(mdata.obsm[layout.LATENT_KEY])}
        masks = {}
        for m in names:
            key = layout.modality_latent_key(m)
            if key in mdata.obsm:
                embeddings[f"regvi_{m}"] = np.asarray(mdata.obsm[key])
                measured = layout.measured_column(m)
                if measured in mdata.obs.columns:
                    masks[f"regvi_{m}"] = mdata.obs[measured].to_numpy(dtype=bool)
        # Marker genes and baselines use the RNA counts (else the first modality's).
        counted = "rna" if "rna" in names else names[0]
        layer = (setup.get("modalities") or {}).get(counted)
        counts = modality_counts(mdata, counted, layer, cells)
        return EvaluationData(
            view=view,
            embeddings=embeddings,
            counts=counts,
            covariate_keys=metadata["shared_covariates"]["keys"]
            if "shared_covariates" in metadata
            else None,
            var_names=list(map(str, mdata.mod[counted].var_names)),
            cell_masks=masks,
            info={
                "modalities": names,
                "counts_modality": counted,
                "modality_attribution": attribution_summary(mdata.obs, names),
            },
        )


def attribution_summary(obs: Any, names: list[str]) -> dict[str, Any]:
    """Mean over cells of each decoder's attribution share per latent block (each decoder's
    shares sum to 1), read from the ``regvi_attr_share_<decoder>_z_<block>`` obs columns,
    and per decoder the block it depends on most."""
    shares: dict[str, dict[str, float | None]] = {}
    for decoder in names:
        row = {}
        for block in names:
            col = f"{_SHARE_PREFIX}{decoder}_z_{block}"
            if col in obs.columns:
                value = float(np.nanmean(obs[col].to_numpy(dtype=float)))
                row[block] = value if np.isfinite(value) else None
        if row:
            shares[decoder] = row
    dominant = {
        d: max((b for b in row if row[b] is not None), key=lambda b: row[b], default=None)
        for d, row in shares.items()
    }
    return {"mean_share": shares, "dominant_block": dominant}
