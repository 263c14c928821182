"""User-facing model classes."""

from regvi.model.rna import AmbientRegularizedSCVI

__all__ = ["AmbientRegularizedSCVI"]
