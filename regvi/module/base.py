"""What a module's ``loss`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
