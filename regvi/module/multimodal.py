"""RegularizedMultimodalVAE: one encoder per modality, a joint z, symmetric decoders (SPEC 3).

Every modality (RNA genes, ATAC peaks, ...) is one :class:`CountModality` (decoder, ambient,
feature scaling, hierarchical dispersion, learned library size: the very components of the RNA
model) plus its own Gaussian encoder. The joint latent is the concatenation of the modality
blocks in alphabetical order of the names (``[z_atac; z_rna]``) and every decoder sees all of
it. All modalities use the GammaPoisson observation model.

Missing data rule. A cell whose counts in modality ``m`` sum to zero is *not measured* in
``m`` (the MuData/MultiVI convention; a real measurement of a modality never has zero counts
over all its features). For such a cell:

* its likelihood of ``m``, KL of ``z_m`` and KL of the library ``l_m`` are removed (masked);
* its posterior block is the prior, :math:`q(z_m) = \\mathcal N(0, I)` — with no data the
  amortised posterior has nothing to update the prior with — so ``z_m`` is drawn from the
  prior in training, its mean is exactly 0 (``get_latent_representation``), and its KL is 0;
* the other decoders still see the full z (with the uninformative ``z_m``), so the cell keeps
  training them from the modalities it does have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regvi.distributions import kl_normal_standard
from regvi.module.base import LossOutput, Stochastic
from regvi.module.components import CountModality, LibraryPrior
from regvi.nn import Encoder

#: Per-modality covariate arrays in a minibatch are stored under ``"<modality>/<role>"``.
COVARIATE_ROLES = (
    "ambient",
    "feature_scaling",
    "dispersion",
    "library_size",
    "encoder",
    "nn_conditioning",
    "continuous",
)


@dataclass
class ModalitySpec:
    """Sizes and options of one modality. ``count_kwargs`` go to :class:`CountModality`
    (ambient / scaling / dispersion / library switches, category counts, priors, init)."""

    n_features: int
    library_prior: LibraryPrior
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    hidden_dropout_rate: float | None = None
    activation: str = "relu"
    n_continuous: int = 0
    n_encoder_categories: int = 0
    count_kwargs: dict[str, Any] = field(default_factory=dict)


def modality_view(batch: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The covariates of modality ``name`` under the role names CountModality reads."""
    prefix = f"{name}/"
    return {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}


class RegularizedMultimodalVAE(Stochastic):
    r"""Multimodal VAE with a concatenated latent and one CountModality per modality.

    Loss per minibatch of B cells (N the training-set size, :math:`o_{nm}` = 1 if cell n is
    measured in modality m, see the module docstring):

    .. math::
        \mathcal L = \frac1B\sum_n\sum_m o_{nm}\big[-\log p(x_{nm}\mid z_n,\ell_{nm})
            + \kappa\,\mathrm{KL}(q(z_{nm})\|\mathcal N(0,I))
            + \mathrm{KL}(q(\ell_{nm})\|p(\ell_{nm}))\big]
            + \frac1N\sum_m \text{penalties}_m
    """

    def __init__(self, specs: Mapping[str, ModalitySpec]):
        super().__init__()
        if not specs:
            raise ValueError("at least one modality is needed")
        self.modality_names = sorted(specs)
        self.latent_blocks: dict[str, slice] = {}
        start = 0
        for name in self.modality_names:
            self.latent_blocks[name] = slice(start, start + specs[name].n_latent)
            start += specs[name].n_latent
        self.n_latent = start
        self.encoders = nn.ModuleDict()
        self.modalities = nn.ModuleDict()
        for name in self.modality_names:
            spec = specs[name]
            encoder_width = spec.n_features + spec.n_continuous
            self.encoders[name] = Encoder(
                encoder_width,
                spec.n_latent,
                spec.n_hidden,
                spec.n_layers,
                spec.dropout_rate,
                spec.n_encoder_categories,
                spec.activation,
                dropout_after_activation=spec.count_kwargs.get("dropout_after_activation", False),
                norm=spec.count_kwargs.get("norm", "layer"),
                hidden_dropout_rate=spec.hidden_dropout_rate,
            )
            self.modalities[name] = CountModality(
                spec.n_features,
                self.n_latent,  # every decoder reads the joint z
                spec.library_prior,
                encoder_input_dim=encoder_width,
                n_hidden=spec.n_hidden,
                n_layers=spec.n_layers,
                activation=spec.activation,
                dropout_rate=spec.dropout_rate,
                n_encoder_categories=spec.n_encoder_categories,
                **spec.count_kwargs,
            )

    # ------------------------------------------------------------------ inference
    def _encode_modality(self, name: str, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        covs = modality_view(batch, name)
        part: CountModality = self.modalities[name]
        features, totals = part.encoder_input(batch[f"x_{name}"])
        measured = totals > 0
        continuous = covs["continuous"]
        loc, scale2 = self.encoders[name](features, covs["encoder"], continuous)
        # Not measured: the posterior of z_m is the prior N(0, I).
        keep = measured[:, None]
        loc = torch.where(keep, loc, torch.zeros_like(loc))
        scale2 = torch.where(keep, scale2, torch.ones_like(scale2))
        library = part.library(features, totals, covs["library_size"], covs["encoder"], continuous)
        return {"qz_mean": loc, "qz_var": scale2, "library": library, "measured": measured}

    def inference(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Per-modality posteriors (``per_modality[m]``) and the joint ``qz_mean``, ``qz_var``
        and ``z`` (a sample in training, the mean in eval), blocks in alphabetical order."""
        parts = {name: self._encode_modality(name, batch) for name in self.modality_names}
        loc = torch.cat([parts[m]["qz_mean"] for m in self.modality_names], dim=-1)
        scale2 = torch.cat([parts[m]["qz_var"] for m in self.modality_names], dim=-1)
        z = loc + torch.sqrt(scale2) * torch.randn_like(loc) if self.sampling else loc
        return {"qz_mean": loc, "qz_var": scale2, "z": z, "per_modality": parts}

    # ------------------------------------------------------------------ generative
    def decode(
        self,
        name: str,
        z: torch.Tensor,
        library: torch.Tensor,
        batch: Mapping[str, torch.Tensor],
        target: str = "rate",
    ) -> torch.Tensor:
        """Decoder output of modality ``name`` from the joint ``z``: ``"rho"`` (softplus
        decoder, reference-library units) or ``"rate"`` (:math:`\\mu = e^\\ell(\\rho+s)y`)."""
        covs = modality_view(batch, name)
        part: CountModality = self.modalities[name]
        rho = part.decoder(z, covs["nn_conditioning"])
        if target == "rho":
            return rho
        if target != "rate":
            raise ValueError(f"target must be 'rate' or 'rho' (got {target!r})")
        return part.rate(rho, library, covs)

    # ------------------------------------------------------------------ objective
    def loss(
        self, batch: Mapping[str, torch.Tensor], n_obs: int, kl_weight: float = 1.0
    ) -> LossOutput:
        """The objective for one minibatch; ``n_obs`` is the training-set size N."""
        inf = self.inference(batch)
        terms: dict[str, torch.Tensor] = {}
        penalties: dict[str, torch.Tensor] = {}
        local = {"reconstruction_loss": 0.0, "kl_z": 0.0, "kl_library": 0.0}
        for name in self.modality_names:
            part: CountModality = self.modalities[name]
            post = inf["per_modality"][name]
            lib = post["library"]
            rate = self.decode(name, inf["z"], lib["library"], batch)
            nll = part.reconstruction_loss(batch[f"x_{name}"], rate, modality_view(batch, name))
            kl_block = kl_normal_standard(post["qz_mean"], post["qz_var"]).sum(dim=-1)
            per_cell = {
                "reconstruction_loss": nll,
                "kl_z": kl_block,
                "kl_library": lib["kl"],
            }
            for term, values in per_cell.items():
                value = torch.where(post["measured"], values, torch.zeros_like(values)).mean()
                terms[f"{term}_{name}"] = value
                local[term] = local[term] + value
            terms[f"measured_fraction_{name}"] = post["measured"].float().mean()
            for term, value in part.penalties().items():
                penalties[f"{term}_{name}"] = value
        global_penalty = torch.stack(list(penalties.values())).sum() / n_obs
        reconstruction, kl_z, kl_library = (
            local["reconstruction_loss"],
            local["kl_z"],
            local["kl_library"],
        )
        loss = reconstruction + kl_weight * kl_z + kl_library + global_penalty
        elbo = reconstruction + kl_z + kl_library + global_penalty
        terms.update(local)
        terms["global_penalty"] = global_penalty
        terms.update({name: value.detach() / n_obs for name, value in penalties.items()})
        return LossOutput(loss=loss, elbo=elbo, terms=terms)
