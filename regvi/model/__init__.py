"""User-facing model classes (loaded on first use: :mod:`regvi.model.defaults` is readable
without torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regvi.model.multimodal import RegularizedMultimodalVI
    from regvi.model.rna import AmbientRegularizedSCVI

__all__ = ["AmbientRegularizedSCVI", "RegularizedMultimodalVI"]

_WHERE = {
    "AmbientRegularizedSCVI": "regvi.model.rna",
    "RegularizedMultimodalVI": "regvi.model.multimodal",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'regvi.model' has no attribute {name!r}")
