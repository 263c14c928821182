"""RegularizedVAE: the RNA torch module (SPEC section 2)."""

from __future__ import annotations

import numpy as np
import torch

from regvi.distributions import kl_normal_standard
from regvi.module.base import LossOutput, Stochastic
from regvi.module.components import CountModality, LibraryPrior
from regvi.nn import Encoder


class RegularizedVAE(Stochastic):
    r"""Ambient-regularised VAE for RNA counts.

    Inference: :math:`q(z\mid x) = \mathcal N(\mu(x'), \sigma^2(x'))` with
    :math:`x' = \log(1 + x\,e^{\bar m}/L)` (continuous covariates concatenated, encoder
    categoricals injected if configured), and the learned library :math:`q(\ell\mid x)`.
    Generative model and priors: see :class:`regvi.module.components.CountModality`.

    Loss per minibatch of B cells, with N the training-set size:

    .. math::
        \mathcal L = \frac1B\sum_n\big[-\log p(x_n\mid z_n,\ell_n)
            + \kappa\,\mathrm{KL}(q(z_n)\|\mathcal N(0,I)) + \mathrm{KL}(q(\ell_n)\|p(\ell_n))\big]
            + \frac1N\big[\text{dispersion KL} + \text{hyperprior} + \text{scaling prior}
            + \text{ambient prior} + \mathrm{KL}_w + \lambda_{L2}\textstyle\sum W_{dec}^2\big]
    """

    def __init__(
        self,
        n_genes: int,
        library_prior: LibraryPrior,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        activation: str = "relu",
        n_continuous: int = 0,
        n_encoder_categories: int = 0,
        hidden_dropout_rate: float | None = None,
        **modality_kwargs,
    ):
        super().__init__()
        n_in = n_genes + n_continuous
        self.n_latent = n_latent
        self.z_encoder = Encoder(
            n_in,
            n_latent,
            n_hidden,
            n_layers,
            dropout_rate,
            n_encoder_categories,
            activation,
            dropout_after_activation=modality_kwargs.get("dropout_after_activation", False),
            norm=modality_kwargs.get("norm", "layer"),
            hidden_dropout_rate=hidden_dropout_rate,
        )
        self.rna = CountModality(
            n_genes,
            n_latent,
            library_prior,
            encoder_input_dim=n_in,
            n_hidden=n_hidden,
            n_layers=n_layers,
            activation=activation,
            dropout_rate=dropout_rate,
            n_encoder_categories=n_encoder_categories,
            **modality_kwargs,
        )

    def inference(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features, observed_library = self.rna.encoder_input(batch["x"])
        continuous = batch["continuous"]
        qz_mean, qz_var = self.z_encoder(features, batch["encoder"], continuous)
        z = qz_mean + torch.sqrt(qz_var) * torch.randn_like(qz_mean) if self.sampling else qz_mean
        lib = self.rna.library(
            features, observed_library, batch["library_size"], batch["encoder"], continuous
        )
        return {"qz_mean": qz_mean, "qz_var": qz_var, "z": z, "library": lib}

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        rho = self.rna.decoder(z, batch["nn_conditioning"])
        return {"rho": rho, "mu": self.rna.rate(rho, library, batch)}

    def loss(
        self, batch: dict[str, torch.Tensor], n_obs: int, kl_weight: float = 1.0
    ) -> LossOutput:
        """The objective for one minibatch; ``n_obs`` is the training-set size N."""
        inf = self.inference(batch)
        # only μ: ρ is not kept alive through the likelihood (one cells x genes buffer)
        mu = self.generative(inf["z"], inf["library"]["library"], batch)["mu"]
        reconstruction = self.rna.reconstruction_loss(batch["x"], mu, batch).mean()
        kl_z = kl_normal_standard(inf["qz_mean"], inf["qz_var"]).sum(dim=-1).mean()
        kl_library = inf["library"]["kl"].mean()
        penalties = self.rna.penalties()
        global_penalty = torch.stack(list(penalties.values())).sum() / n_obs
        loss = reconstruction + kl_weight * kl_z + kl_library + global_penalty
        elbo = reconstruction + kl_z + kl_library + global_penalty
        terms = {
            "reconstruction_loss": reconstruction,
            "kl_z": kl_z,
            "kl_library": kl_library,
            "global_penalty": global_penalty,
            **{name: value.detach() / n_obs for name, value in penalties.items()},
        }
        return LossOutput(loss=loss, elbo=elbo, terms=terms)

    @torch.no_grad()
    def dispersion_per_group(self) -> np.ndarray:
        """Posterior median θ per (dispersion group, gene)."""
        return torch.exp(self.rna.dispersion.median_log_theta()).cpu().numpy()
