"""Matching the features of new data to a trained model's, by name: one rule for the genes of
the RNA model and the features of each modality of the multimodal model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

from regvi.errors import DataError

log = logging.getLogger("regvi")


def match_features(data: Any, feature_names: Sequence[str], what: str = "genes") -> Any:
    """``data`` (an AnnData) with the model's features ``feature_names`` in the model's
    order: columns reordered by name, extra features dropped (a view when anything changed).

    ``what`` names the features in messages (``"genes"``, ``"'atac' features"``). Missing
    features and duplicate names are a :class:`~regvi.errors.DataError` saying how many and
    which.
    """
    names = pd.Index(map(str, data.var_names))
    if list(names) == list(feature_names):
        return data
    missing = pd.Index(feature_names).difference(names)
    if len(missing):
        raise DataError(
            f"{len(missing)} of the model's {len(feature_names)} {what} are missing from the "
            f"data (e.g. {', '.join(map(repr, list(missing[:5])))}); the data must contain "
            f"every one of the {what} the model was trained on"
        )
    if not names.is_unique:
        raise DataError(f"duplicate names among the data's {what}; make var_names unique")
    extra = len(names) - len(feature_names)
    if extra:
        log.info("dropping %d %s the model was not trained on", extra, what)
    if not data.var_names.equals(names):
        data.var_names = names
    return data[:, list(feature_names)]
