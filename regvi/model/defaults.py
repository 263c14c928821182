"""Every model option and its default, in one place (no torch here, so the config schema and
the CLI can read it).

:data:`RNA_DEFAULTS` are the constructor arguments of
:class:`~regvi.model.AmbientRegularizedSCVI`; :data:`MULTIMODAL_DEFAULTS` those of
:class:`~regvi.model.RegularizedMultimodalVI`, where a value may also be a dict
``{modality: value}`` (modalities missing from it get :data:`MULTIMODAL_FALLBACKS`).
The config schema's ``model`` section (:class:`regvi.config.ModelConfig`) is built from
:data:`RNA_DEFAULTS`, and ``conf/model/*.yaml`` are checked against both by the tests.
"""

from __future__ import annotations

import math
from typing import Any

#: Constructor arguments of :class:`~regvi.model.AmbientRegularizedSCVI` and their defaults
#: (REFERENCE.md section 2.12 unless noted).
RNA_DEFAULTS: dict[str, Any] = {
    # 30 latent dimensions and two hidden layers (scVI and the published code: 10 and 1): with
    # the batch injected into every decoder layer, the second layer lets the decoder express
    # batch effects that differ by cell type, and the deeper encoder (which does not see the
    # batch) strip them, so they stay out of z; batch mixing rose on every benchmark set,
    # biology moved by about a seed's sd, and the held-out NLL rose by a few nats per cell
    # (still below scVI's on every set) (docs/integration.md)
    "n_latent": 30,
    "n_hidden": 128,
    "n_layers": 2,
    "dropout_rate": 0.1,
    # dropout on the z encoder's hidden units (the input of its second and later layers;
    # dropout_rate is on its input features); None: chosen from the encoder's input weights
    # per cell when the model is built (hidden_dropout_for), and stored as that number
    "hidden_dropout_rate": None,
    "activation": "relu",
    "use_ambient": True,
    "regularise_ambient": False,
    "ambient_prior_alpha": 1.0,
    "ambient_prior_beta": 100.0,
    "ambient_init_gene_fraction": 0.2,
    "use_feature_scaling": True,
    "feature_scaling_prior_alpha": 200.0,
    "feature_scaling_prior_beta": 200.0,
    "regularise_dispersion": True,
    "dispersion_hyper_prior_mean": 1.0 / 3.0,
    "dispersion_hyper_prior_alpha": 9.0,
    # True: the proper KL (log-Jacobian included; current behaviour); False: the published
    # objective. To be settled by a benchmark.
    "dispersion_prior_jacobian": True,
    # dispersion groups share a per-gene centre (HierarchicalDispersion; docs/integration.md)
    "dispersion_pooling": True,
    "library_n_hidden": 16,
    "library_log_vars_weight": 0.5,
    "residual_library_encoder": True,
    "library_w_prior_rate": 1.0,
    "decoder_weight_l2": 0.1,
    # architecture switches for ablations against scVI (docs/integration.md)
    "scale_activation": "softplus",
    "use_observed_library": False,
    "encoder_input": "normalized",
    "dropout_after_activation": False,
    "norm": "layer",
    # the decoder's normalisation layers; None: ``norm``. "batch" keeps small populations
    # that are confounded with batches apart in z on simulate_de, but then calls null genes
    # DE and costs held-out likelihood on every benchmark set (docs/integration.md, stop 32)
    "decoder_norm": None,
}

#: The multimodal model's options, each one value for every modality: the RNA model's plus
#: the library prior centre multiplier.
MULTIMODAL_FALLBACKS: dict[str, Any] = {
    **RNA_DEFAULTS,
    "n_latent": 10,  # per modality: the joint latent is the blocks' sum (rna 20 + atac 10)
    # one hidden layer: the RNA model's second layer is for batch effects (there is no
    # multi-batch multiome set here to measure that on), and on the single-batch muon
    # multiome file two layers gave a worse held-out NLL (docs/integration.md)
    "n_layers": 1,
    "library_sensitivity": 1.0,
}
#: The multimodal model's defaults: where a dict, per modality (others get the fallback).
MULTIMODAL_DEFAULTS: dict[str, Any] = {
    **MULTIMODAL_FALLBACKS,
    "n_latent": {"rna": 20, "atac": 10},
    "use_ambient": {"atac": False},  # background RNA only, as published
}


def hidden_dropout_for(n_hidden: int, n_features: int, n_cells: int) -> float:
    r"""The default dropout rate on the z encoder's hidden units: it rises with the encoder's
    input weights per cell,

    .. math::

        p = \min\Bigl(0.7,\ \max\bigl(0.1,\ 0.1 + 0.1 \log_2 r
            + 0.1 \max(0, \log_2 r - 2)\bigr)\Bigr), \qquad
        r = \frac{n_\text{hidden}}{128}\,\frac{n_\text{features}}{n_\text{cells}},

    linear in :math:`\log_2 r` through (1, 0.1), (4, 0.3) and (16, 0.7) and flat outside:
    with 128 hidden units it is 0.1 while there are no more features (genes) than cells, 0.2
    at two features per cell, 0.3 at four, 0.5 at eight and 0.7 from sixteen on; each
    doubling of the width counts as a doubling of the features. An encoder with many input
    weights per training cell can memorise the batch-specific features of those cells, which
    is what stronger dropout on its hidden units stops. Measured (``docs/integration.md``,
    stops 27-32, three seeds a configuration): where r is about 1 or below (the labelled sets
    of ~2,000 genes at 128 units: 1.3 and 0.3; the 7,200-cell atlas at 512 units: 1.1) 0.3
    gave a lower scIB total than 0.1, and at r = 0.05 (a planted-DE simulation with a 64-unit
    encoder) it erased planted DE genes; where r is 5 or more (the 9,000- and 12,000-gene sets
    of ~1,800 cells at 128 units, every small set at 512 units) 0.3 gave better mixing, marker
    correlation and held-out likelihood than 0.1 (on a labelled simulation at r = 5.6 the
    same total and biology). Where r is 20-30 (the two small many-gene sets and the labelled
    simulation at 512 units) 0.5 was better than 0.3 and 0.7 better than 0.5 on mixing and
    held-out likelihood, with the marker correlation higher and the labelled simulation's
    total and biology level; 0.7 is the highest rate measured. ``n_cells`` is every cell the
    model is given, validation cells included.
    """
    if min(n_hidden, n_features, n_cells) < 1:
        raise ValueError(
            f"n_hidden, n_features and n_cells must be at least 1 "
            f"(got {n_hidden}, {n_features}, {n_cells})"
        )
    octaves = math.log2((n_hidden / 128) * (n_features / n_cells))
    return float(min(0.7, max(0.1, 0.1 + 0.1 * octaves + 0.1 * max(0.0, octaves - 2.0))))


def resolve_hidden_dropout(
    rate: float | None, n_hidden: int, n_features: int, n_cells: int
) -> float:
    """``hidden_dropout_rate`` as the encoder uses it: the given rate, or
    :func:`hidden_dropout_for` if None."""
    return hidden_dropout_for(n_hidden, n_features, n_cells) if rate is None else float(rate)


def saved_options(init_params: dict[str, Any]) -> dict[str, Any]:
    """The options of a saved model, with those added to regvi after it was saved filled in
    with the value that rebuilds it as it was trained: ``hidden_dropout_rate`` was
    ``dropout_rate`` before it became an option of its own."""
    params = dict(init_params)
    params.setdefault(
        "hidden_dropout_rate", params.get("dropout_rate", RNA_DEFAULTS["dropout_rate"])
    )
    params.setdefault("decoder_norm", None)
    return params
