"""RegularizedMultimodalVI: the user-facing multimodal model (SPEC sections 3 and 4)."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from regvi.attribution import attribution_table, block_jacobian_norms
from regvi.data.covariates import LIST_ROLES, SINGLE_ROLES, CovariateEncoder, CovariateKeys
from regvi.data.mudata_io import (
    MultiModalDataset,
    feature_aligned,
    modality_counts,
    resolve_modalities,
    shared_cells,
    shared_obs,
)
from regvi.errors import ConfigError, DataError, RegviError
from regvi.model.base import BaseModel
from regvi.model.defaults import (
    MULTIMODAL_DEFAULTS,
    MULTIMODAL_FALLBACKS,
    resolve_hidden_dropout,
)
from regvi.model.mapping import MappingPart
from regvi.model.posterior import ModalityDecode
from regvi.module.components import LibraryPrior
from regvi.module.init import (
    cell_totals,
    data_dependent_init,
    library_prior_stats,
)
from regvi.module.multimodal import ModalitySpec, RegularizedMultimodalVAE, modality_view

SETUP_KEY = "regvi_multimodal_setup"
#: Covariate roles a modality may set for itself (replacing the shared, resolved keys).
MODALITY_COVARIATE_ROLES = (*LIST_ROLES, *SINGLE_ROLES, "continuous_covariate_keys")

#: Every option may be one value for all modalities or a dict {modality: value}; modalities
#: missing from a dict get the fallback (e.g. n_latent 10 for a modality other than rna).
FALLBACKS = MULTIMODAL_FALLBACKS
DEFAULTS = MULTIMODAL_DEFAULTS


class RegularizedMultimodalVI(BaseModel):
    """Multimodal (e.g. RNA + ATAC) VAE on a MuData (SPEC section 3).

    One encoder per modality; the joint latent is the concatenation of the modality blocks in
    alphabetical order of names (``[z_atac; z_rna]``); every decoder reads the full z. Each
    modality is a :class:`~regvi.module.components.CountModality` (the RNA model's components)
    with GammaPoisson counts, its own ambient, feature scaling, hierarchical dispersion and
    learned library size, each switchable per modality.

    Usage::

        RegularizedMultimodalVI.setup_mudata(mdata, batch_key="batch")
        model = RegularizedMultimodalVI(mdata, n_latent={"rna": 20, "atac": 10})
        model.train(max_epochs=100)
        mdata.obsm["X_regvi"] = model.get_latent_representation()
        scores = model.get_modality_attribution()

    Parameters
    ----------
    mdata
        MuData registered with :meth:`setup_mudata`.
    **kwargs
        The options of :class:`~regvi.model.AmbientRegularizedSCVI` (``n_latent``,
        ``n_hidden``, ``n_layers``, ``dropout_rate``, ``hidden_dropout_rate``, ``activation``, ``use_ambient``,
        ``use_feature_scaling``, ``regularise_dispersion``, ``residual_library_encoder``,
        priors...) plus ``library_sensitivity`` (library prior centre multiplier). Each is a
        single value for every modality or a dict ``{modality: value}``. Defaults:
        n_latent 20 (rna) / 10 (others), one hidden layer of 128 units, ambient background on
        RNA only.

    Missing data: a cell whose counts in a modality sum to zero is "not measured" there; see
    :mod:`regvi.module.multimodal` (its terms are masked and its block is the prior).
    """

    SETUP_KEY = SETUP_KEY
    SETUP_METHOD = "setup_mudata"
    DATA_ATTRIBUTE = "mdata"

    def __init__(self, mdata: Any, **kwargs: Any):
        super().__init__()
        unknown = set(kwargs) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown model argument(s): {', '.join(sorted(unknown))}")
        setup = self._read_setup(mdata)
        self.setup_ = setup
        self.modality_names = list(resolve_modalities(mdata, setup["modalities"]))
        for key, value in kwargs.items():
            if isinstance(value, Mapping):
                stray = sorted(set(value) - set(self.modality_names))
                if stray:
                    raise ConfigError(
                        f"model option {key} names modality {', '.join(map(repr, stray))}, "
                        f"which is not among {', '.join(self.modality_names)}"
                    )
        self.init_params = {**DEFAULTS, **kwargs}
        self.mdata = mdata
        cells = shared_cells(mdata, self.modality_names, setup["missing_cells"])
        obs = shared_obs(mdata, self.modality_names, cells)
        self.shared_covariates = CovariateEncoder(CovariateKeys.resolve(**setup["covariates"]))
        self.shared_covariates.fit(obs)
        self.covariates = {
            m: CovariateEncoder(self._modality_keys(m)).fit(obs) for m in self.modality_names
        }
        self.feature_names = {
            m: list(map(str, mdata.mod[m].var_names)) for m in self.modality_names
        }
        self._data_cache = self._prepare(mdata)
        self.init_params["hidden_dropout_rate"] = {
            m: resolve_hidden_dropout(
                self.option("hidden_dropout_rate", m),
                int(self.option("n_hidden", m)),
                len(self.feature_names[m]),
                len(cells),
            )
            for m in self.modality_names
        }
        self.module = self._build_module(self._data_driven_init(*self._data_cache[:2]))

    # ---------------------------------------------------------------- set-up
    @staticmethod
    def setup_mudata(
        mdata: Any,
        modalities: list[str] | Mapping[str, str | None] | None = None,
        labels_key: str | None = None,
        missing_cells: str = "error",
        modality_covariates: Mapping[str, Mapping[str, Any]] | None = None,
        **covariates: Any,
    ) -> None:
        """Register modalities, count layers and covariate roles.

        Parameters
        ----------
        modalities
            Names (counts in ``X``), a mapping name -> count layer, or ``None`` for every
            modality of ``mdata``. The order given does not matter: blocks are alphabetical.
        labels_key
            obs column with cell labels (figures only).
        missing_cells
            ``"error"`` (default): every cell must be in every modality; ``"mask"``: a cell
            absent from a modality is treated as not measured there.
        modality_covariates
            Per-modality covariate roles replacing the shared ones after the fan-out, e.g.
            ``{"atac": {"ambient_covariate_keys": [], "dispersion_key": "batch"}}``.
        **covariates
            The covariate keys of :meth:`AmbientRegularizedSCVI.setup_anndata`
            (``batch_key``, ``library_key``, ``ambient_covariate_keys``, ...), shared by
            every modality.
        """
        layers = resolve_modalities(mdata, modalities)
        cells = shared_cells(mdata, list(layers), missing_cells)
        obs = shared_obs(mdata, list(layers), cells)
        covariates = {
            k: list(v) if isinstance(v, list | tuple) else v for k, v in covariates.items()
        }
        try:
            keys = CovariateKeys.resolve(**covariates)
        except TypeError as exc:
            raise ConfigError(f"unknown covariate argument: {exc}") from None
        per_modality = {str(m): dict(v) for m, v in (modality_covariates or {}).items()}
        for m, roles in per_modality.items():
            if m not in layers:
                raise ConfigError(f"modality_covariates names modality {m!r}, which is not used")
            bad = sorted(set(roles) - set(MODALITY_COVARIATE_ROLES))
            if bad:
                raise ConfigError(f"modality {m!r}: unknown covariate role(s) {', '.join(bad)}")
            roles.update({k: list(v) for k, v in roles.items() if isinstance(v, list | tuple)})
            CovariateEncoder(_override(keys, roles))._check_columns(obs)
        CovariateEncoder(keys)._check_columns(obs)
        if labels_key is not None and labels_key not in obs.columns:
            raise DataError(f"labels column {labels_key!r} not found in obs")
        mdata.uns[SETUP_KEY] = json.dumps(
            {
                "modalities": layers,
                "labels_key": labels_key,
                "missing_cells": missing_cells,
                "covariates": covariates,
                "modality_covariates": per_modality,
            }
        )

    def _modality_keys(self, name: str) -> CovariateKeys:
        shared = CovariateKeys.resolve(**self.setup_["covariates"])
        return _override(shared, self.setup_["modality_covariates"].get(name, {}))

    def option(self, key: str, modality: str) -> Any:
        """The value of model option ``key`` for ``modality``."""
        value = self.init_params[key]
        if isinstance(value, Mapping):
            return value.get(modality, FALLBACKS[key])
        return value

    @property
    def latent_blocks(self) -> dict[str, slice]:
        """Columns of each modality's block in the joint latent (alphabetical order)."""
        return dict(self.module.latent_blocks)

    # ---------------------------------------------------------------- data
    def _prepare(
        self, mdata: Any
    ) -> tuple[dict[str, sp.csr_matrix], dict[str, np.ndarray], pd.Index]:
        """Counts per modality (features in the model's order), covariate codes (keyed
        ``<modality>/<role>``, plus ``strata``) and the cell names of ``mdata``."""
        setup = self.setup_
        layers = {m: setup["modalities"][m] for m in self.modality_names}
        missing = [m for m in layers if m not in mdata.mod]
        if missing:
            raise DataError(f"modality {', '.join(map(repr, missing))} is not in the data")
        cells = shared_cells(mdata, self.modality_names, setup["missing_cells"])
        obs = shared_obs(mdata, self.modality_names, cells)
        codes = {"strata": self.shared_covariates.transform(obs)["library_size"]}
        matrices = {}
        for m, layer in layers.items():
            view = feature_aligned(mdata.mod[m], self.feature_names[m], m)
            proxy = _ModalityProxy(mdata, m, view)
            matrices[m] = modality_counts(proxy, m, layer, cells)
            codes.update({f"{m}/{r}": v for r, v in self.covariates[m].transform(obs).items()})
        return matrices, codes, cells

    def _dataset(self, mdata: Any = None) -> MultiModalDataset:
        if mdata is None or mdata is self.mdata:
            if self._data_cache is None:
                if self.mdata is None:
                    raise RegviError("this model was loaded without data: pass mdata=")
                self._data_cache = self._prepare(self.mdata)
            matrices, codes, _ = self._data_cache
        else:
            matrices, codes, _ = self._prepare(mdata)
        return MultiModalDataset(matrices, codes)

    def _cells(self, mdata: Any) -> pd.Index:
        if mdata is None or mdata is self.mdata:
            if self._data_cache is not None:
                return self._data_cache[2]
            if self.mdata is None:
                raise RegviError("this model was loaded without data: pass mdata=")
            mdata = self.mdata
        return shared_cells(mdata, self.modality_names, self.setup_["missing_cells"])

    def _strata(self) -> np.ndarray:
        return self._data_cache[1]["strata"]

    @property
    def n_features(self) -> int:
        return sum(len(v) for v in self.feature_names.values())

    # ---------------------------------------------------------------- module
    def _data_driven_init(
        self, matrices: Mapping[str, sp.csr_matrix], codes: Mapping[str, np.ndarray]
    ) -> dict[str, dict[str, Any]]:
        """Library priors, decoder bias and ambient from the *measured* cells of each modality."""
        init = {}
        for m, X in matrices.items():
            totals = cell_totals(X)
            measured = totals > 0
            n_lib = self.covariates[m].n_groups("library_size_key")
            lib_codes = codes[f"{m}/library_size"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # unmeasured cells are expected
                prior = library_prior_stats(totals[measured], lib_codes[measured], n_lib)
            n_ambient = sum(self.covariates[m].n_categories("ambient_covariate_keys"))
            use_ambient = bool(self.option("use_ambient", m)) and n_ambient > 0
            bias, ambient = data_dependent_init(
                X[measured],
                totals[measured],
                float(prior.log_means.mean()),
                codes[f"{m}/ambient"][measured] if use_ambient else None,
                n_ambient,
                self.option("ambient_init_gene_fraction", m),
                float(np.log(self.option("library_sensitivity", m))),
            )
            init[m] = {"prior": prior, "bias": bias, "ambient": ambient}
        return init

    def _build_module(self, init: Mapping[str, Mapping[str, Any]]) -> RegularizedMultimodalVAE:
        specs = {}
        for m in self.modality_names:
            opt = {key: self.option(key, m) for key in FALLBACKS}
            cov = self.covariates[m]
            count_kwargs = {
                key: opt[key]
                for key in FALLBACKS
                if key
                not in {
                    "n_latent",
                    "n_hidden",
                    "n_layers",
                    "dropout_rate",
                    "hidden_dropout_rate",
                    "activation",
                    "ambient_init_gene_fraction",
                    "library_sensitivity",
                }
            }
            count_kwargs.update(
                n_nn_conditioning_categories=sum(
                    cov.n_categories("nn_conditioning_covariate_keys")
                ),
                n_ambient_categories=sum(cov.n_categories("ambient_covariate_keys")),
                n_feature_scaling_categories=sum(
                    cov.n_categories("feature_scaling_covariate_keys")
                ),
                n_dispersion_groups=cov.n_groups("dispersion_key"),
                library_log_sensitivity=float(np.log(opt["library_sensitivity"])),
                init_decoder_bias=init[m].get("bias"),
                init_log_ambient=init[m].get("ambient"),
            )
            specs[m] = ModalitySpec(
                n_features=len(self.feature_names[m]),
                library_prior=init[m]["prior"],
                n_latent=int(opt["n_latent"]),
                n_hidden=int(opt["n_hidden"]),
                n_layers=int(opt["n_layers"]),
                dropout_rate=float(opt["dropout_rate"]),
                hidden_dropout_rate=float(opt["hidden_dropout_rate"]),
                activation=opt["activation"],
                n_continuous=len(cov.keys.continuous_covariate_keys),
                n_encoder_categories=sum(cov.n_categories("encoder_covariate_keys")),
                count_kwargs=count_kwargs,
            )
        return RegularizedMultimodalVAE(specs)

    # ---------------------------------------------------------------- outputs
    @torch.no_grad()
    def get_latent_representation(
        self,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        modality: str | None = None,
        progress: str | None = None,
    ) -> np.ndarray:
        """Joint posterior mean of z (``[z_atac; z_rna]``), or one sample with
        ``give_mean=False``; ``modality`` returns only that block. Cells not measured in a
        modality have a block mean of exactly 0 (the prior). ``progress`` names a progress
        bar over the batches."""
        cols = slice(None) if modality is None else self._block(modality)
        parts = []
        for batch in self._iterate(mdata, indices, batch_size, progress):
            inf = self.module.inference(batch)
            posterior = torch.distributions.Normal(inf["qz_mean"], inf["qz_var"].sqrt())
            parts.append(
                (posterior.mean if give_mean else posterior.sample())[:, cols].cpu().numpy()
            )
        return np.concatenate(parts, axis=0)

    def get_modality_latents(self, mdata: Any = None, batch_size: int | None = None) -> dict:
        """``{modality: block}`` plus ``"__joint__"`` (posterior means)."""
        joint = self.get_latent_representation(mdata, batch_size=batch_size)
        return {m: joint[:, s] for m, s in self.latent_blocks.items()} | {"__joint__": joint}

    def _block(self, modality: str) -> slice:
        if modality not in self.latent_blocks:
            raise DataError(
                f"unknown modality {modality!r} (the model has {', '.join(self.modality_names)})"
            )
        return self.latent_blocks[modality]

    @torch.no_grad()
    def get_normalized_expression(
        self,
        modality: str,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        library_size: float | str = 1e4,
        include_ambient: bool = False,
        batch_size: int | None = None,
        out: np.ndarray | None = None,
        progress: str | None = None,
    ) -> np.ndarray:
        r"""Denoised values of one modality from the posterior mean of z, in batches:
        :math:`\rho/\sum\rho \times` ``library_size`` (ambient optional, feature scaling
        excluded), or the full rate :math:`\mu` at the inferred library with
        ``library_size="latent"``. ``out`` may be a preallocated float32 array to fill;
        ``progress`` names a progress bar over the batches."""
        self._block(modality)
        part = self.module.modalities[modality]
        filled, pieces = 0, []
        width = len(self.feature_names[modality])
        for batch in self._iterate(mdata, indices, batch_size, progress, width):
            inf = self.module.inference(batch)
            lib = inf["per_modality"][modality]["library"]["library"]
            if library_size == "latent":
                values = self.module.decode(modality, inf["z"], lib, batch, "rate")
            else:
                values = self.module.decode(modality, inf["z"], lib, batch, "rho")
                if include_ambient and part.ambient is not None:
                    values = values + part.ambient.per_cell(batch[f"{modality}/ambient"])
                values = values * (float(library_size) / values.sum(dim=-1, keepdim=True))
            block = values.cpu().numpy().astype(np.float32, copy=False)
            if out is None:
                pieces.append(block)
            else:
                out[filled : filled + len(block)] = block
            filled += len(block)
        return out if out is not None else np.concatenate(pieces, axis=0)

    def get_reconstruction_error(
        self,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        modality: str | None = None,
        sample: bool = True,
        per_feature: bool = False,
    ) -> float | pd.Series | dict[str, pd.Series]:
        """Mean per-cell negative log-likelihood of the counts, summed over the features of
        every modality a cell is measured in (the ``reconstruction_loss`` of the objective),
        or of ``modality`` alone (cells not measured in it counting 0, as in the objective's
        ``reconstruction_loss_<modality>``): a held-out fit measure. ``sample=True`` (default): a
        single-sample Monte-Carlo estimate, z, ℓ, w and θ drawn from their posteriors as in
        the ELBO, without dropout; random from call to call. ``sample=False``: at the
        posterior means and the posterior-median θ (deterministic, and optimistic).

        ``per_feature=True``: per feature, the mean over cells of its negative
        log-likelihood (the per-feature terms sum to the scalar): a Series for
        ``modality``, else ``{modality: Series}``. See
        :meth:`~regvi.model.posterior.PosteriorMixin._reconstruction_error`."""
        names = self._modalities(modality)
        value = self._reconstruction_error(mdata, indices, batch_size, names, sample, per_feature)
        if per_feature and modality is not None:
            return value[modality]
        return value

    def posterior_predictive_sample(
        self,
        mdata: Any = None,
        n_samples: int = 1,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        modality: str | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        r"""Counts drawn from the posterior predictive distribution of ``modality`` (every
        modality, as ``{modality: array}``, when None): per sample, z, ℓ, w and θ drawn from
        their posteriors and the counts from the GammaPoisson likelihood with mean
        :math:`\mu = e^\ell(\rho + s)y`. float32 ``(cells, features)`` for ``n_samples=1``,
        else ``(cells, features, n_samples)``. A cell not measured in a modality gets the
        model's prediction for it. See
        :meth:`~regvi.model.posterior.PosteriorMixin._posterior_predictive_sample`."""
        out = {
            m: self._posterior_predictive_sample(mdata, n_samples, indices, batch_size, m)
            for m in self._modalities(modality)
        }
        return out[modality] if modality is not None else out

    def get_latent_library_size(
        self,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        modality: str | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        r"""Posterior mean of each cell's library :math:`e^{\ell}` of ``modality`` in count
        units (comparable to its total counts), ``(cells,)``; ``{modality: array}`` when
        None. See :meth:`~regvi.model.posterior.PosteriorMixin._latent_library_size`."""
        out = self._latent_library_size(mdata, indices, batch_size, self._modalities(modality))
        return out[modality] if modality is not None else out

    def get_latent_kl(
        self,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        per_dimension: bool = True,
    ) -> np.ndarray:
        """KL(q(z|x) || N(0, I)) of the joint latent: per dimension, the mean over the cells
        measured in the block's modality (``(n_latent,)``, blocks as in
        :attr:`latent_blocks`), or with ``per_dimension=False`` the per-cell total
        (``(cells,)``). See :meth:`~regvi.model.posterior.PosteriorMixin._latent_kl`."""
        return self._latent_kl(mdata, indices, batch_size, per_dimension)

    def differential_expression(
        self,
        mdata: Any = None,
        groupby: str | None = None,
        group1: str | list[str] | None = None,
        group2: str | None = None,
        mode: str = "change",
        delta: float = 0.25,
        fdr_target: float = 0.05,
        n_samples: int = 5000,
        batch_size: int | None = None,
        pseudocounts: float | None = None,
        seed: int = 0,
        modality: str | None = None,
    ) -> pd.DataFrame:
        r"""Differential expression between the groups of ``obs[groupby]``, as scvi-tools'
        ``differential_expression(mode="change")`` with its column names, on the
        batch-free expression with ambient RNA and feature scaling removed.

        ``group1=None``: every group against the rest (one-vs-rest); ``group2=None``: against
        every other cell. ``n_samples`` posterior samples per group (memory: two
        ``n_samples x features`` float32 arrays); ``delta``: the log2 fold-change threshold;
        ``fdr_target``: the posterior expected FDR of the ``is_de_fdr_<fdr_target>`` calls
        (made per modality). ``modality``: one modality's features; None: every modality's,
        with a ``modality`` column.
        The math: ``DifferentialExpressionMixin._differential_expression`` in
        :mod:`regvi.model.posterior`. Raises :class:`~regvi.errors.DataError` for an unknown
        column or group."""
        if groupby is None:
            raise DataError("differential_expression needs groupby=<obs column>")
        return self._differential_expression(
            mdata,
            groupby,
            group1,
            group2,
            self._modalities(modality),
            mode,
            delta,
            fdr_target,
            n_samples,
            batch_size,
            pseudocounts,
            seed,
        )

    def get_modality_attribution(
        self,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        method: str = "jvp",
        eps: float = 1e-5,
        target: str = "rate",
        progress: str | None = None,
    ) -> pd.DataFrame:
        r"""Per cell, for each decoder, the Frobenius norm of the Jacobian of its output with
        respect to each modality's latent block (see :mod:`regvi.attribution`).

        The Jacobian is taken at the posterior mean of z. ``target="rate"`` (default)
        differentiates the expected counts :math:`\mu_m = e^{\ell_m}(\rho_m + s_m)y_m` at the
        cell's posterior-mean library (the published choice); ``"rho"`` the decoder output
        alone. ``method="jvp"`` (default) is exact: one forward-mode JVP per latent column,
        memory :math:`O(\text{batch\_size}\times F_m)` whatever the latent size;
        ``"finite_difference"`` uses central differences with step ``eps`` on a float64 copy
        of the module (float32 differences of large rates lose digits, and a step much above
        1e-5 straddles ReLU kinks of some cells: eps=1e-3 gives errors of a few percent).

        Returns a DataFrame, rows = cells, columns = MultiIndex ``(decoder, block)``.
        ``progress`` names a progress bar over the batches.
        """
        module = self.module
        if method == "finite_difference":  # float64: differences of large rates lose digits
            module = copy.deepcopy(self.module).double()
        scores: dict[tuple[str, str], list[np.ndarray]] = {
            (d, b): [] for d in self.modality_names for b in self.modality_names
        }
        widest = max(len(names) for names in self.feature_names.values())
        for batch in self._iterate(mdata, indices, batch_size, progress, widest, most=256):
            with torch.no_grad():
                inf = self.module.inference(batch)
            dtype = next(module.parameters()).dtype
            for d in self.modality_names:
                lib = inf["per_modality"][d]["library"]["library"].detach().to(dtype)

                def decoder_output(z, name=d, library=lib, cells=batch):
                    return module.decode(name, z, library, cells, target)

                z_mean = inf["qz_mean"].to(dtype)
                norms = block_jacobian_norms(
                    decoder_output, z_mean, self.latent_blocks, method, eps
                )
                for b, values in norms.items():
                    scores[(d, b)].append(values.cpu().numpy())
        cells = self._cells(mdata)
        if indices is not None:
            cells = cells[np.asarray(indices)]
        return attribution_table({k: np.concatenate(v) for k, v in scores.items()}, cells)

    # ---------------------------------------------------------------- posterior hooks
    def _count_modalities(self) -> list[str]:
        return list(self.module.modality_names)

    def _features(self, modality: str) -> list[str]:
        return self.feature_names[modality]

    def _decode(self, batch: dict[str, Any], inf: dict[str, Any], modality: str) -> ModalityDecode:
        post = inf["per_modality"][modality]
        covariates = modality_view(batch, modality)
        part = self.module.modalities[modality]
        rho = part.decoder(inf["z"], covariates["nn_conditioning"])
        return ModalityDecode(
            part, batch[f"x_{modality}"], covariates, rho, post["library"], post["measured"]
        )

    def _obs(self, data: Any = None) -> pd.DataFrame:
        mdata = self.mdata if data is None else data
        if mdata is None:
            raise RegviError("this model was loaded without data: pass mdata=")
        return shared_obs(mdata, self.modality_names, self._cells(data))

    def _library_key(self) -> str | None:
        return self.shared_covariates.keys.library_key

    def _latent_measured(self, inf: dict[str, Any]) -> torch.Tensor:
        blocks = []
        for m in self.module.modality_names:
            width = self.module.latent_blocks[m].stop - self.module.latent_blocks[m].start
            blocks.append(inf["per_modality"][m]["measured"][:, None].expand(-1, width))
        return torch.cat(blocks, dim=1)

    # ---------------------------------------------------------------- mapping hooks
    def _covariate_encoders(self) -> list[CovariateEncoder]:
        return [self.shared_covariates, *self.covariates.values()]

    def _set_option(self, key: str, modality: str, value: Any) -> None:
        current = self.init_params[key]
        per_modality = (
            dict(current)
            if isinstance(current, Mapping)
            else {m: current for m in self.modality_names}
        )
        self.init_params[key] = {**per_modality, modality: value}

    def _mapping_parts(self) -> list[MappingPart]:
        """Per modality, its cells measured in it (as :meth:`_data_driven_init` uses)."""
        self._dataset()  # fills the cache
        matrices, codes, _ = self._data_cache
        parts = []
        for m in self.modality_names:
            X = matrices[m]
            measured = cell_totals(X) > 0
            prefix = f"{m}/"
            role_codes = {
                k[len(prefix) :]: v[measured] for k, v in codes.items() if k.startswith(prefix)
            }
            parts.append(
                MappingPart(
                    m,
                    self.module.modalities[m],
                    self.covariates[m],
                    [self.module.encoders[m]],
                    self.option("ambient_init_gene_fraction", m),
                    X[measured],
                    role_codes,
                )
            )
        return parts

    # ---------------------------------------------------------------- persistence
    def _metadata(self) -> dict[str, Any]:
        return {
            "setup": self.setup_,
            "modality_names": self.modality_names,
            "feature_names": self.feature_names,
            "shared_covariates": self.shared_covariates.to_dict(),
            "covariates": {m: enc.to_dict() for m, enc in self.covariates.items()},
        }

    def _restore(self, metadata: dict[str, Any]) -> None:
        self.modality_names = metadata["modality_names"]
        self.feature_names = metadata["feature_names"]
        self.shared_covariates = CovariateEncoder.from_dict(metadata["shared_covariates"])
        self.covariates = {
            m: CovariateEncoder.from_dict(c) for m, c in metadata["covariates"].items()
        }

    def _module_for_loading(self) -> RegularizedMultimodalVAE:
        blank = {}
        for m in self.modality_names:
            groups = self.covariates[m].n_groups("library_size_key")
            blank[m] = {"prior": LibraryPrior(np.zeros(groups), np.ones(groups))}
        return self._build_module(blank)

    @classmethod
    def load(cls, dir_path: str | Path, mdata: Any = None) -> RegularizedMultimodalVI:
        """Rebuild a saved model; ``mdata`` (optional) becomes its default data, validated
        against the saved modalities, feature names and category maps."""
        return cls._load(dir_path, mdata)


class _ModalityProxy:
    """Looks like a MuData to :func:`modality_counts`, with one modality replaced by a
    feature-aligned view."""

    def __init__(self, mdata: Any, name: str, view: Any):
        self.mod = {**dict(mdata.mod), name: view}


def _override(keys: CovariateKeys, roles: Mapping[str, Any]) -> CovariateKeys:
    """``keys`` with some roles replaced (lists normalised; falsy single keys -> None)."""
    changes = {
        role: (list(value or []) if role not in SINGLE_ROLES else (value or None))
        for role, value in roles.items()
    }
    return replace(keys, **changes)
