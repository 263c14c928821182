"""What a module's ``loss`` returns, and the switch that samples latents outside training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    """The objective and every term of it, each a scalar tensor.

    ``loss`` is what is optimised: local terms meaned over cells (with the KL warm-up weight
    on KL(z)), plus the global penalties divided by N. ``elbo`` is the per-cell negative
    ELBO without warm-up (the number to compare across runs and to early-stop on).
    ``terms`` holds every component for logging.
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Stochastic(nn.Module):
    """A module that draws latents from their posterior (z, the library ℓ and its weight w,
    the dispersion θ): in training, and in eval mode under :func:`monte_carlo`; otherwise
    it uses their posterior means (θ: the median).

    The switch is separate from ``training``, which also turns dropout on: evaluation of
    the objective (the validation ELBO, the held-out NLL) wants the sampled latents of the
    training objective without dropout, and posterior-mean outputs want neither.
    """

    sample_in_eval: bool = False

    @property
    def sampling(self) -> bool:
        """Whether latents are drawn (training, or :func:`monte_carlo`) or taken at their
        posterior means."""
        return self.training or self.sample_in_eval


@contextmanager
def monte_carlo(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block every :class:`Stochastic` part of ``module`` samples its latents
    whatever the mode, so a ``loss`` in eval mode (dropout off) is a single-sample
    Monte-Carlo estimate of the objective, with the same global terms as in training. A
    no-op for a module without such parts, or with ``enabled=False``."""
    parts = [m for m in module.modules() if isinstance(m, Stochastic)] if enabled else []
    before = [m.sample_in_eval for m in parts]
    for part in parts:
        part.sample_in_eval = True
    try:
        yield module
    finally:
        for part, value in zip(parts, before, strict=True):
            part.sample_in_eval = value
