"""User-facing model classes."""

from regvi.model.multimodal import RegularizedMultimodalVI
from regvi.model.rna import AmbientRegularizedSCVI

__all__ = ["AmbientRegularizedSCVI", "RegularizedMultimodalVI"]
