"""regvi: Bayesian scVI-style models of single-cell RNA and RNA+ATAC multiome counts.

The model classes are loaded on first use (module ``__getattr__``), so ``import regvi`` and
the quick CLI commands do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from regvi.errors import ConfigError, DataError, RegviError

if TYPE_CHECKING:
    from regvi.model import AmbientRegularizedSCVI, RegularizedMultimodalVI

__version__ = "0.1.0"

__all__ = [
    "AmbientRegularizedSCVI",
    "ConfigError",
    "DataError",
    "RegularizedMultimodalVI",
    "RegviError",
    "__version__",
]

_MODELS = ("AmbientRegularizedSCVI", "RegularizedMultimodalVI")


def __getattr__(name: str) -> Any:
    if name in _MODELS:
        import regvi.model

        return getattr(regvi.model, name)
    raise AttributeError(f"module 'regvi' has no attribute {name!r}")
