"""Torch modules (no Lightning, no AnnData): the models' math."""

from regvi.module.base import LossOutput
from regvi.module.components import (
    AmbientBackground,
    CountModality,
    FeatureScaling,
    HierarchicalDispersion,
    LearnedLibrarySize,
    LibraryPrior,
)
from regvi.module.multimodal import ModalitySpec, RegularizedMultimodalVAE
from regvi.module.rna import RegularizedVAE

__all__ = [
    "AmbientBackground",
    "CountModality",
    "FeatureScaling",
    "HierarchicalDispersion",
    "LearnedLibrarySize",
    "LibraryPrior",
    "LossOutput",
    "ModalitySpec",
    "RegularizedMultimodalVAE",
    "RegularizedVAE",
]
