"""Data layer: reading and validating counts, covariate encoding, minibatch loading."""

from regvi.data.covariates import CovariateEncoder, CovariateKeys
from regvi.data.io import count_matrix, read_h5ad
from regvi.data.loader import CsrMinibatchDataset, make_dataloader, stratified_split

__all__ = [
    "CovariateEncoder",
    "CovariateKeys",
    "CsrMinibatchDataset",
    "count_matrix",
    "make_dataloader",
    "read_h5ad",
    "stratified_split",
]
