"""regvi: Bayesian scVI-style models of single-cell RNA and RNA+ATAC multiome counts."""

from regvi.errors import ConfigError, DataError, RegviError
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
