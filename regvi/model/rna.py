"""AmbientRegularizedSCVI: the user-facing RNA model (scvi-tools-style API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from regvi.data.covariates import CovariateEncoder, CovariateKeys
from regvi.data.features import match_features
from regvi.data.io import count_matrix
from regvi.data.loader import CsrMinibatchDataset
from regvi.errors import ConfigError, DataError, RegviError
from regvi.model.base import BaseModel
from regvi.model.defaults import RNA_DEFAULTS, resolve_hidden_dropout
from regvi.model.mapping import MappingPart
from regvi.model.posterior import ModalityDecode
from regvi.module.components import LibraryPrior
from regvi.module.init import cell_totals, data_dependent_init, library_prior_stats
from regvi.module.rna import RegularizedVAE

SETUP_KEY = "regvi_setup"

#: Constructor defaults: the single source in :mod:`regvi.model.defaults`.
DEFAULTS = RNA_DEFAULTS


class AmbientRegularizedSCVI(BaseModel):
    """scVI-style model of RNA counts with ambient RNA, feature scaling, hierarchical
    dispersion and learned library size (SPEC section 2).

    Usage::

        AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
        model = AmbientRegularizedSCVI(adata)
        model.train(max_epochs=100)
        adata.obsm["X_regvi"] = model.get_latent_representation()

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent, n_hidden, n_layers, dropout_rate, activation
        Architecture of the encoders and decoder. Defaults 30 latent dimensions and two
        hidden layers of 128 units (scVI: 10 and one), chosen by the integration benchmark:
        the batch enters every decoder layer, and with two of them batch effects that differ
        by cell type are modelled there instead of in z (``docs/integration.md``).
        ``dropout_rate`` (0.1) is the dropout on the encoders' input features; the decoder
        has none.
    hidden_dropout_rate
        Dropout on the z encoder's hidden units, the input of its second and later layers.
        Default ``None``: chosen from the data when the model is built and kept in
        ``init_params`` as that number (:func:`~regvi.model.defaults.hidden_dropout_for`):
        with 128 hidden units 0.1 while there are no more genes than cells, rising to 0.3 at
        four genes per cell, 0.5 at eight and 0.7 from sixteen, and each doubling of
        ``n_hidden`` counts as a doubling of the genes. Many input weights per cell let the
        encoder memorise batch-specific genes; 0.3 to 0.7 then mixed better with a better
        held-out likelihood, while on sets with fewer genes than cells 0.3 cost fine-type
        structure (``docs/integration.md``).
    use_ambient, regularise_ambient, ambient_prior_alpha, ambient_prior_beta
        Additive ambient RNA per ambient category, and its optional Gamma prior.
    ambient_init_gene_fraction
        Ambient initialised at this fraction of each category's mean normalised expression
        (divided by the number of ambient keys, so a cell's summed background starts at
        this fraction).
    use_feature_scaling, feature_scaling_prior_alpha, feature_scaling_prior_beta
        Per-category multiplicative gene scaling and its Gamma prior.
    regularise_dispersion, dispersion_hyper_prior_mean, dispersion_hyper_prior_alpha
        Hierarchical dispersion prior (Exp on θ^-1/2, Gamma hyperprior).
    dispersion_prior_jacobian
        True (default): the dispersion penalty is the proper KL, with the log-Jacobian of
        θ^-1/2; it pulls weakly informed θ towards λ²≈9 from both sides (near-Poisson genes
        towards over-dispersion). False: the published objective without it, which pushes θ
        up, towards Poisson (not a KL: the ELBO is then not a bound).
    dispersion_pooling
        True (default): with several dispersion groups (e.g. one per library), each gene's
        log θ per group is drawn around a per-gene centre with a learned spread, so small
        groups borrow strength from the others; False: independent groups.
    library_n_hidden, library_log_vars_weight, residual_library_encoder, library_w_prior_rate
        Learned library size: encoder width, prior variance scaling, residual on the observed
        library (a LogNormal weight with an Exp prior; without it, a learned point
        coefficient on the observed log library), and the Exp prior rate of the residual
        weight.
    decoder_weight_l2
        L2 penalty on decoder weights, covariate (nn_conditioning) columns included (a
        global term, divided by N).
    """

    SETUP_KEY = SETUP_KEY
    SETUP_METHOD = "setup_anndata"
    DATA_ATTRIBUTE = "adata"

    def __init__(self, adata: ad.AnnData, **kwargs: Any):
        super().__init__()
        unknown = set(kwargs) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown model argument(s): {', '.join(sorted(unknown))}")
        self.init_params = {**DEFAULTS, **kwargs}
        setup = self._read_setup(adata)
        self.adata = adata
        self.setup_ = setup
        self.covariates = CovariateEncoder(CovariateKeys.resolve(**setup["covariates"]))
        # An AnnData opened with backed="r" stays on disk: minibatches are read per step.
        X = count_matrix(adata, setup["layer"], keep_backed=adata.isbacked)
        self.covariates.fit(adata.obs)
        codes = self.covariates.transform(adata.obs)
        self.gene_names = list(map(str, adata.var_names))
        self._data_cache = (X, codes)
        n_cells, n_genes = X.shape
        self.init_params["hidden_dropout_rate"] = resolve_hidden_dropout(
            self.init_params["hidden_dropout_rate"], self.init_params["n_hidden"], n_genes, n_cells
        )

        totals = cell_totals(X)
        n_lib = self.covariates.n_groups("library_size_key")
        prior = library_prior_stats(totals, codes["library_size"], n_lib)
        reference = float(np.mean(prior.log_means))
        n_ambient = sum(self.covariates.n_categories("ambient_covariate_keys"))
        use_ambient = self.init_params["use_ambient"] and n_ambient > 0
        bias, init_ambient = data_dependent_init(
            X,
            totals,
            reference,
            codes["ambient"] if use_ambient else None,
            n_ambient,
            self.init_params["ambient_init_gene_fraction"],
        )
        self.module = self._build_module(prior, bias, init_ambient)

    # ---------------------------------------------------------------- set-up
    @staticmethod
    def setup_anndata(
        adata: ad.AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        library_key: str | None = None,
        dataset_key: str | None = None,
        technical_covariate_keys: list[str] | None = None,
        ambient_covariate_keys: list[str] | None = None,
        nn_conditioning_covariate_keys: list[str] | None = None,
        feature_scaling_covariate_keys: list[str] | None = None,
        dispersion_key: str | None = None,
        library_size_key: str | None = None,
        encoder_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Register which layer holds counts and which obs columns play which role.

        ``batch_key`` (or ``library_key``) fans out to ambient, dispersion and library-size
        groups; ``dataset_key`` / ``technical_covariate_keys`` default to the feature-scaling
        covariates. See :mod:`regvi.data.covariates` for the rules. Keys are checked against
        ``adata.obs`` here so a typo fails before any model is built.
        """
        covariates = {
            "batch_key": batch_key,
            "library_key": library_key,
            "dataset_key": dataset_key,
            "technical_covariate_keys": technical_covariate_keys,
            "ambient_covariate_keys": ambient_covariate_keys,
            "nn_conditioning_covariate_keys": nn_conditioning_covariate_keys,
            "feature_scaling_covariate_keys": feature_scaling_covariate_keys,
            "dispersion_key": dispersion_key,
            "library_size_key": library_size_key,
            "encoder_covariate_keys": encoder_covariate_keys,
            "continuous_covariate_keys": continuous_covariate_keys,
        }
        covariates = {
            k: (list(v) if isinstance(v, list | tuple) else v) for k, v in covariates.items()
        }
        keys = CovariateKeys.resolve(**covariates)
        CovariateEncoder(keys)._check_columns(adata.obs)
        if labels_key is not None and labels_key not in adata.obs.columns:
            raise DataError(f"labels column {labels_key!r} not found in obs")
        if layer is not None and layer not in adata.layers:
            available = ", ".join(adata.layers.keys()) or "(none)"
            raise DataError(f"layer {layer!r} not found in the data; available layers: {available}")
        adata.uns[SETUP_KEY] = json.dumps(
            {"layer": layer, "labels_key": labels_key, "covariates": covariates}
        )

    # ---------------------------------------------------------------- module
    def _build_module(
        self,
        prior: LibraryPrior,
        init_decoder_bias: np.ndarray | None = None,
        init_log_ambient: np.ndarray | None = None,
    ) -> RegularizedVAE:
        p, cov = self.init_params, self.covariates
        return RegularizedVAE(
            n_genes=len(self.gene_names),
            library_prior=prior,
            n_latent=p["n_latent"],
            n_hidden=p["n_hidden"],
            n_layers=p["n_layers"],
            dropout_rate=p["dropout_rate"],
            hidden_dropout_rate=p["hidden_dropout_rate"],
            activation=p["activation"],
            n_continuous=len(cov.keys.continuous_covariate_keys),
            n_encoder_categories=sum(cov.n_categories("encoder_covariate_keys")),
            n_nn_conditioning_categories=sum(cov.n_categories("nn_conditioning_covariate_keys")),
            use_ambient=p["use_ambient"],
            n_ambient_categories=sum(cov.n_categories("ambient_covariate_keys")),
            regularise_ambient=p["regularise_ambient"],
            ambient_prior_alpha=p["ambient_prior_alpha"],
            ambient_prior_beta=p["ambient_prior_beta"],
            use_feature_scaling=p["use_feature_scaling"],
            n_feature_scaling_categories=sum(cov.n_categories("feature_scaling_covariate_keys")),
            feature_scaling_prior_alpha=p["feature_scaling_prior_alpha"],
            feature_scaling_prior_beta=p["feature_scaling_prior_beta"],
            n_dispersion_groups=cov.n_groups("dispersion_key"),
            regularise_dispersion=p["regularise_dispersion"],
            dispersion_hyper_prior_mean=p["dispersion_hyper_prior_mean"],
            dispersion_hyper_prior_alpha=p["dispersion_hyper_prior_alpha"],
            dispersion_prior_jacobian=p["dispersion_prior_jacobian"],
            dispersion_pooling=p["dispersion_pooling"],
            library_n_hidden=p["library_n_hidden"],
            library_log_vars_weight=p["library_log_vars_weight"],
            residual_library_encoder=p["residual_library_encoder"],
            library_w_prior_rate=p["library_w_prior_rate"],
            decoder_weight_l2=p["decoder_weight_l2"],
            init_decoder_bias=init_decoder_bias,
            init_log_ambient=init_log_ambient,
            scale_activation=p["scale_activation"],
            use_observed_library=p["use_observed_library"],
            encoder_input=p["encoder_input"],
            dropout_after_activation=p["dropout_after_activation"],
            norm=p["norm"],
            decoder_norm=p["decoder_norm"],
        )

    @property
    def n_features(self) -> int:
        return len(self.gene_names)

    # ---------------------------------------------------------------- data
    def _dataset(self, adata: ad.AnnData | None = None) -> CsrMinibatchDataset:
        if adata is None or adata is self.adata:
            if getattr(self, "_data_cache", None) is None:
                if self.adata is None:
                    raise RegviError("this model was loaded without data: pass adata=")
                self._data_cache = self._encode(self.adata)
            X, codes = self._data_cache
        else:
            X, codes = self._encode(adata)
        return CsrMinibatchDataset(X, codes)

    def _encode(self, adata: ad.AnnData) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
        """Counts (genes reordered to the model's order) and covariate codes of ``adata``."""
        adata = match_features(adata, self.gene_names, "genes")
        layer = self.setup_["layer"]
        return count_matrix(adata, layer), self.covariates.transform(adata.obs)

    def _strata(self) -> np.ndarray:
        X, codes = self._data_cache
        return codes["library_size"]

    # ---------------------------------------------------------------- outputs
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: np.ndarray | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        progress: str | None = None,
    ) -> np.ndarray:
        """Posterior mean of z (or one sample with ``give_mean=False``), ``(cells, n_latent)``,
        computed in batches (``progress`` names a progress bar)."""
        out = []
        for batch in self._iterate(adata, indices, batch_size, progress):
            inf = self.module.inference(batch)
            z = inf["qz_mean"]
            if not give_mean:
                z = z + torch.sqrt(inf["qz_var"]) * torch.randn_like(z)
            out.append(z.cpu().numpy())
        return np.concatenate(out, axis=0)

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        indices: np.ndarray | None = None,
        gene_list: list[str] | None = None,
        library_size: float | str = 1e4,
        include_ambient: bool = False,
        batch_size: int | None = None,
        out: Any = None,
        progress: str | None = None,
    ) -> Any:
        r"""Denoised expression from the posterior mean of z, computed in batches.

        * ``library_size=<float>``: :math:`\rho_{ng} / \sum_{g'} \rho_{ng'} \times`
          ``library_size`` — the decoder's biological expression (ambient RNA and technical
          feature scaling removed) as counts per ``library_size`` (CP10k by default). With
          ``include_ambient=True`` the ambient profile is added to ρ before normalising.
        * ``library_size="latent"``: the full mean :math:`\mu = e^\ell(\rho+s)y` at each cell's
          own inferred library.

        ``gene_list`` restricts the returned columns (normalisation still uses all genes);
        ``out`` may be any preallocated float32 array-like supporting ``out[i:j] = values``
        (a NumPy memmap, an open HDF5 dataset) to fill batch by batch, so the full matrix is
        never held in memory; it is returned filled.
        """
        cols = None
        if gene_list is not None:
            lookup = {g: i for i, g in enumerate(self.gene_names)}
            missing = [g for g in gene_list if g not in lookup]
            if missing:
                raise DataError(f"genes not in the model: {', '.join(map(repr, missing[:5]))}")
            cols = torch.as_tensor([lookup[g] for g in gene_list])
        chunks, row = [], 0
        n_genes = len(self.gene_names)
        for batch in self._iterate(adata, indices, batch_size, progress, n_genes):
            inf = self.module.inference(batch)
            gen = self.module.generative(inf["z"], inf["library"]["library"], batch)
            if library_size == "latent":
                values = gen["mu"]
            else:
                rho = gen["rho"]
                if include_ambient and self.module.rna.ambient is not None:
                    rho = rho + self.module.rna.ambient.per_cell(batch["ambient"])
                values = rho / rho.sum(dim=-1, keepdim=True) * float(library_size)
            if cols is not None:
                values = values[:, cols.to(values.device)]
            values = values.cpu().numpy().astype(np.float32, copy=False)
            if out is not None:
                out[row : row + values.shape[0]] = values
                row += values.shape[0]
            else:
                chunks.append(values)
        return out if out is not None else np.concatenate(chunks, axis=0)

    def get_reconstruction_error(
        self,
        adata: ad.AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        sample: bool = True,
        per_feature: bool = False,
    ) -> float | pd.Series:
        r"""Mean per-cell negative log-likelihood of the counts (summed over genes): a held-out
        fit measure. ``sample=True`` (default): a single-sample Monte-Carlo estimate of
        :math:`E_q[-\log p(x\mid z,\ell,\theta)]`, z, ℓ, w and θ drawn from their posteriors
        as in the ELBO (scvi-tools' ``get_reconstruction_error`` samples z too), without
        dropout; random from call to call. ``sample=False``: at the posterior means of z,
        ℓ and w and the posterior-median θ (deterministic, and optimistic).

        ``per_feature=True``: a Series over genes of the mean over cells of each gene's
        negative log-likelihood (they sum to the scalar); genes the model fits badly stand
        out. See :meth:`~regvi.model.posterior.PosteriorMixin._reconstruction_error`."""
        value = self._reconstruction_error(adata, indices, batch_size, ["rna"], sample, per_feature)
        return value["rna"] if per_feature else value

    def posterior_predictive_sample(
        self,
        adata: ad.AnnData | None = None,
        n_samples: int = 1,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        r"""Counts drawn from the posterior predictive distribution: per sample, z, ℓ, w and θ
        drawn from their posteriors and the counts from the GammaPoisson likelihood with mean
        :math:`\mu = e^\ell(\rho + s)y`. float32 ``(cells, genes)`` for ``n_samples=1``,
        else ``(cells, genes, n_samples)`` (scvi-tools' axes, dense). See
        :meth:`~regvi.model.posterior.PosteriorMixin._posterior_predictive_sample`."""
        return self._posterior_predictive_sample(adata, n_samples, indices, batch_size, "rna")

    def get_latent_library_size(
        self,
        adata: ad.AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        r"""Posterior mean of each cell's library :math:`e^{\ell}` in count units
        (comparable to its total counts), ``(cells,)``. See
        :meth:`~regvi.model.posterior.PosteriorMixin._latent_library_size`."""
        return self._latent_library_size(adata, indices, batch_size, ["rna"])["rna"]

    def get_latent_kl(
        self,
        adata: ad.AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        per_dimension: bool = True,
    ) -> np.ndarray:
        """KL(q(z|x) || N(0, I)): per latent dimension, the mean over cells
        (``(n_latent,)``; a dimension near 0 is unused), or with ``per_dimension=False`` the
        per-cell total (``(cells,)``). See
        :meth:`~regvi.model.posterior.PosteriorMixin._latent_kl`."""
        return self._latent_kl(adata, indices, batch_size, per_dimension)

    def differential_expression(
        self,
        adata: ad.AnnData | None = None,
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
    ) -> pd.DataFrame:
        r"""Differential expression between the groups of ``obs[groupby]``, as scvi-tools'
        ``differential_expression(mode="change")`` with its column names, on the
        batch-free expression with ambient RNA and feature scaling removed.

        ``group1=None``: every group against the rest (one-vs-rest); ``group2=None``: against
        every other cell. ``n_samples`` posterior samples per group (memory: two
        ``n_samples x genes`` float32 arrays); ``delta``: the log2 fold-change threshold;
        ``fdr_target``: the posterior expected FDR of the ``is_de_fdr_<fdr_target>`` calls.
        The math: ``DifferentialExpressionMixin._differential_expression`` in
        :mod:`regvi.model.posterior`. Raises :class:`~regvi.errors.DataError` for an unknown
        column or group."""
        if groupby is None:
            raise DataError("differential_expression needs groupby=<obs column>")
        return self._differential_expression(
            adata,
            groupby,
            group1,
            group2,
            ["rna"],
            mode,
            delta,
            fdr_target,
            n_samples,
            batch_size,
            pseudocounts,
            seed,
        )

    def get_ambient_profiles(self) -> pd.DataFrame:
        """Learned ambient :math:`s_{b,g}` as a (category x gene) table (empty without ambient)."""
        amb = self.module.rna.ambient
        if amb is None:
            return pd.DataFrame(columns=self.gene_names)
        index = [
            f"{key}={cat}"
            for key in self.covariates.keys.ambient_covariate_keys
            for cat in self.covariates.categories[key]
        ]
        values = torch.exp(amb.log_ambient).detach().cpu().numpy()
        return pd.DataFrame(values, index=index, columns=self.gene_names)

    def get_dispersion(self) -> pd.DataFrame:
        """Posterior median θ per (dispersion group x gene)."""
        keys = self.covariates.keys.role_keys("dispersion_key")
        index = self.covariates.categories[keys[0]] if keys else ["all"]
        return pd.DataFrame(
            self.module.dispersion_per_group(), index=index, columns=self.gene_names
        )

    # ---------------------------------------------------------------- posterior hooks
    def _count_modalities(self) -> list[str]:
        return ["rna"]

    def _features(self, modality: str) -> list[str]:
        return self.gene_names

    def _decode(self, batch: dict[str, Any], inf: dict[str, Any], modality: str) -> ModalityDecode:
        part = self.module.rna
        rho = part.decoder(inf["z"], batch["nn_conditioning"])
        measured = torch.ones(rho.shape[0], dtype=torch.bool, device=rho.device)
        return ModalityDecode(part, batch["x"], batch, rho, inf["library"], measured)

    def _obs(self, data: ad.AnnData | None = None) -> pd.DataFrame:
        adata = self.adata if data is None else data
        if adata is None:
            raise RegviError("this model was loaded without data: pass adata=")
        return adata.obs

    def _library_key(self) -> str | None:
        return self.covariates.keys.library_key

    # ---------------------------------------------------------------- mapping hooks
    def _covariate_encoders(self) -> list[CovariateEncoder]:
        return [self.covariates]

    def _set_option(self, key: str, modality: str, value: Any) -> None:
        self.init_params[key] = value

    def _mapping_parts(self) -> list[MappingPart]:
        self._dataset()  # fills the cache
        X, codes = self._data_cache
        return [
            MappingPart(
                "rna",
                self.module.rna,
                self.covariates,
                [self.module.z_encoder],
                self.init_params["ambient_init_gene_fraction"],
                X,
                codes,
            )
        ]

    # ---------------------------------------------------------------- persistence
    def _metadata(self) -> dict[str, Any]:
        return {
            "setup": self.setup_,
            "covariates": self.covariates.to_dict(),
            "gene_names": self.gene_names,
        }

    def _restore(self, metadata: dict[str, Any]) -> None:
        self.covariates = CovariateEncoder.from_dict(metadata["covariates"])
        self.gene_names = metadata["gene_names"]

    def _module_for_loading(self) -> RegularizedVAE:
        n_lib = self.covariates.n_groups("library_size_key")
        return self._build_module(LibraryPrior(np.zeros(n_lib), np.ones(n_lib)))

    @classmethod
    def load(cls, dir_path: str | Path, adata: ad.AnnData | None = None) -> AmbientRegularizedSCVI:
        """Rebuild a saved model; ``adata`` (optional) becomes its default data.

        New data is validated against the saved gene names (reordered by name; missing genes
        are an error) and category maps (an unseen category is an error).
        """
        return cls._load(dir_path, adata)
