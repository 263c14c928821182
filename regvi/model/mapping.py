"""Mapping query cells from new libraries onto a trained reference (scArches-style), written
once for both models.

A reference model knows a fixed list of libraries (the categories of its library key). Cells
from a library it never saw cannot be encoded with it: every library owns rows of the
technical tables — ambient :math:`s_{b,g}`, feature scaling :math:`y_{t,g}`, dispersion
:math:`\\theta_{d,g}`, library-size prior :math:`p(\\ell \\mid p)` — and, when the library key
conditions the decoder (``nn_conditioning_covariate_keys``, the default with ``batch_key``)
or the encoder (``encoder_covariate_keys``), columns of the one-hot injections.
:meth:`QueryMappingMixin.map_query` appends one new row (column) per new library to each of
those tables, starts it as training does, and learns only the new rows on the query cells:

.. math::
    \\min_{\\phi_{new}}\\; \\frac1B\\sum_{n\\in\\text{query}}\\big[-\\log p(x_n\\mid z_n,\\ell_n;
        \\phi_{ref}, \\phi_{new}) + \\mathrm{KL}(q(z_n)\\|p(z)) + \\mathrm{KL}(q(\\ell_n)\\|
        p(\\ell_n))\\big] + \\frac1{N_q}\\,\\text{penalties}(\\phi_{new})

with every reference parameter :math:`\\phi_{ref}` (encoders, decoders, the pooled dispersion
centre and spread, the rows of known libraries) frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from regvi.data.covariates import LIST_ROLES, ROLE_NAMES, SINGLE_ROLES, CovariateEncoder
from regvi.data.loader import stratified_split
from regvi.errors import ConfigError, DataError
from regvi.module.components import CountModality
from regvi.module.init import cell_totals, data_dependent_init, library_prior_stats

log = logging.getLogger("regvi")

#: ``train()`` arguments that query mapping sets itself.
_FIXED_TRAIN_ARGUMENTS = ("weight_decay", "kl_warmup_fraction", "strategy", "resume_from")


@dataclass
class MappingPart:
    """One count modality of a model, as query mapping extends it.

    ``part``: its :class:`~regvi.module.components.CountModality`; ``covariates``: the
    covariate encoder of its codes; ``encoders``: the z encoder(s) reading its ``encoder``
    codes (the library-size encoder is ``part.library``); ``ambient_fraction``: its
    ``ambient_init_gene_fraction``; ``counts`` / ``codes``: the query cells' counts and
    covariate codes by role, restricted as the model's data-driven initialisation is (the
    multimodal model: cells measured in the modality).
    """

    name: str
    part: CountModality
    covariates: CovariateEncoder
    encoders: list[nn.Module]
    ambient_fraction: float
    counts: Any = None
    codes: dict[str, np.ndarray] = field(default_factory=dict)


class QueryMappingMixin:
    """``map_query`` for both models. A model class provides :meth:`_mapping_parts` (its
    count modalities, with the query's counts and codes) and :meth:`_covariate_encoders`;
    :class:`~regvi.model.base.BaseModel` provides ``_copy`` and ``train``."""

    module: nn.Module

    # ---------------------------------------------------------------- hooks
    def _mapping_parts(self) -> list[MappingPart]:  # pragma: no cover
        """Every count modality, with the model's data (the query) encoded."""
        raise NotImplementedError

    def _covariate_encoders(self) -> list[CovariateEncoder]:  # pragma: no cover
        """Every covariate encoder of the model (shared and per modality)."""
        raise NotImplementedError

    def _set_option(self, key: str, modality: str, value: Any) -> None:  # pragma: no cover
        """Set model option ``key`` of ``modality`` in ``init_params``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- mapping
    def map_query(
        self,
        data: Any,
        max_epochs: int | None = None,
        batch_size: int = 128,
        train_size: float = 1.0,
        lr: float = 1e-3,
        **train_kwargs: Any,
    ) -> Any:
        r"""A new model over the query cells ``data``, from libraries the reference may never
        have seen, in the reference's latent space (scArches-style reference mapping). This
        model is left untouched.

        * **The reference network stays frozen**: encoders and decoders, the pooled
          dispersion centre and spread, the library encoder's residual weight, and every
          existing row of every table. The latent of any cell of a known library is
          therefore bitwise that of the reference model (on the same device).
        * **New libraries** (new values of the library key, ``batch_key`` / ``library_key``)
          get new rows of every table the library key indexes, started as at training, from
          the query data with the same code: ambient :math:`\beta_{b,g} = \log(f\,
          \overline{x^{norm}}_{g,b})` (:func:`~regvi.module.init.data_dependent_init`),
          feature scaling :math:`y = 0.99` (the prior mean), dispersion at the learned
          per-gene centre (offset 0, pooled) or at θ ≈ 9 (independent groups), and a
          library-size prior from the library's observed log library sizes
          (:func:`~regvi.module.init.library_prior_stats`, centred on the reference's
          :math:`\bar m`). Only those rows are learned, on the query cells alone, with
          the objective of training (global terms divided by the number of query
          training cells, no KL warm-up, no weight decay).
        * **No network surgery is needed by default**: the encoder is batch-free (SPEC
          section 1), so a query cell's latent does not depend on its library at all and
          the new rows only explain its counts. When the library key conditions the
          decoder (``nn_conditioning_covariate_keys``, the default with ``batch_key``) or
          the encoder (``encoder_covariate_keys``), each injected layer gets one new
          one-hot column per new library (scArches' surgery), started as at training; only
          those columns get gradients.
        * **Known libraries** in the query keep their trained parameters.
        * Any other covariate (dataset, technical, conditioning keys) must take values the
          reference saw; an unseen one is a :class:`~regvi.errors.DataError`, as are
          missing features.

        The returned model is an ordinary model (categories: the reference's libraries, then
        the new ones; ``save``/``load`` work, and it encodes reference cells too); its
        ``history`` is the mapping's. ``max_epochs`` defaults to scvi-tools' heuristic for
        the query size; ``batch_size`` is capped at the number of query training cells;
        other keyword arguments go to :meth:`train` (``accelerator``, ``precision``,
        ``logger``, ``enable_progress_bar``, ``split_seed``, ``early_stopping`` with
        ``train_size < 1``, ...). Without new libraries nothing is
        learned.
        """
        fixed = sorted(set(train_kwargs) & set(_FIXED_TRAIN_ARGUMENTS))
        if fixed:
            raise ConfigError(f"map_query sets {', '.join(fixed)} itself; do not pass it")
        devices = train_kwargs.pop("devices", 1)
        if str(devices) not in ("1", "auto"):
            raise ConfigError(f"map_query trains in one process (got devices={devices!r})")
        key = self._library_key()
        if key is None:
            raise ConfigError(
                "query mapping needs a model set up with a library key (batch_key or "
                "library_key): new libraries are what it learns parameters for"
            )
        mapped = self._copy(data)
        obs = mapped._obs(data)
        added: list[str] | None = None
        for encoder in mapped._covariate_encoders():
            if key in encoder.categories:
                new = encoder.add_categories(obs, key)
                added = new if added is None else added
            encoder._check_library_dataset(obs)
        added = added or []
        mapped._dataset()  # encodes the query: missing features or unseen categories fail here
        n_known = len(obs) - int(obs[key].astype(str).isin(added).sum())
        log.info(
            "query: %d cells; %d new librar%s (%s), %d cells of known libraries",
            len(obs),
            len(added),
            "y" if len(added) == 1 else "ies",
            ", ".join(added[:5]) + (", ..." if len(added) > 5 else ""),
            n_known,
        )
        if not added:
            return mapped
        # a small query trains in smaller minibatches rather than failing
        n_train = stratified_split(
            mapped._strata(), train_size, seed=train_kwargs.get("split_seed", 0)
        )[0].size
        batch_size = min(batch_size, n_train)
        before = {k: v.detach().clone() for k, v in mapped.module.state_dict().items()}
        grown = mapped._add_library_rows(key, len(added))
        handles = _freeze_except(mapped.module, grown)
        try:
            mapped.train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                train_size=train_size,
                lr=lr,
                weight_decay=0.0,
                kl_warmup_fraction=0.0,
                devices=1,
                **train_kwargs,
            )
        finally:
            for handle in handles:
                handle.remove()
            for parameter in mapped.module.parameters():
                parameter.requires_grad_(True)
        _restore_reference_rows(mapped.module, before, grown)
        return mapped

    def _add_library_rows(self, key: str, n_new: int) -> dict[str, tuple[int, int]]:
        """Append the rows (columns) of ``n_new`` new categories of ``key`` to every table it
        indexes, in every count modality; the covariate encoders already list them last.
        Returns ``{state-dict name: (first new row, number of new rows)}`` of the grown
        tensors."""
        owners: list[tuple[nn.Module, int, int]] = []

        def grow(component: nn.Module, position: int, add: Any) -> None:
            before = {
                name: t.shape
                for name, t in [*component._parameters.items(), *component._buffers.items()]
            }
            add()
            for name, t in [*component._parameters.items(), *component._buffers.items()]:
                if t is not None and t.shape != before.get(name):
                    owners.append((component, name, position))

        for spec in self._mapping_parts():
            part, cov = spec.part, spec.covariates
            totals = cell_totals(spec.counts)
            for role in (*LIST_ROLES, *SINGLE_ROLES):
                keys = cov.keys.role_keys(role)
                if key not in keys:
                    continue
                before_key = sum(len(cov.categories[k]) for k in keys[: keys.index(key)])
                position = before_key + len(cov.categories[key]) - n_new
                short = ROLE_NAMES[role]
                if short == "ambient" and part.ambient is not None:
                    n_ambient = sum(cov.n_categories("ambient_covariate_keys"))
                    _, log_ambient = data_dependent_init(
                        spec.counts,
                        totals,
                        float(part.library.global_log_mean),
                        spec.codes["ambient"],
                        n_ambient,
                        spec.ambient_fraction,
                        float(part.library.log_sensitivity),
                    )
                    rows = log_ambient[position : position + n_new]
                    grow(
                        part.ambient,
                        position,
                        lambda a=part.ambient, r=rows, p=position: a.add_categories(p, r),
                    )
                elif short == "feature_scaling" and part.feature_scaling is not None:
                    scaling = part.feature_scaling
                    grow(
                        scaling, position, lambda s=scaling, p=position: s.add_categories(p, n_new)
                    )
                elif short in ("nn_conditioning", "encoder"):
                    stacks = (
                        [part.decoder.layers]
                        if short == "nn_conditioning"
                        else [e.layers for e in spec.encoders] + [part.library.encoder.layers]
                    )
                    for stack in stacks:
                        for injection in stack.injections:
                            grow(
                                injection,
                                position,
                                lambda i=injection, p=position: i.add_categories(p, n_new),
                            )
                elif short == "dispersion":
                    grow(part.dispersion, position, lambda d=part.dispersion: d.add_groups(n_new))
                    if not part.dispersion.pooled:
                        # one reference group (or pooling off): the groups stay independent,
                        # and the saved arguments say so (a rebuilt module would pool them)
                        self._set_option("dispersion_pooling", spec.name, False)
                elif short == "library_size":
                    prior = library_prior_stats(
                        totals, spec.codes["library_size"] - position, n_new
                    )
                    grow(
                        part.library, position, lambda lib=part.library, q=prior: lib.add_groups(q)
                    )
        names = {id(t): name for name, t in self.module.state_dict(keep_vars=True).items()}
        return {
            names[id(getattr(owner, attr))]: (position, n_new) for owner, attr, position in owners
        }


def _freeze_except(
    module: nn.Module, grown: dict[str, tuple[int, int]]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze every parameter of ``module`` but the new rows of the grown tables: the others
    stop requiring gradients, and a hook zeroes the gradient of a grown table's old rows (so
    Adam, without weight decay, leaves them bitwise unchanged). Returns the hooks' handles."""
    handles = []
    for name, parameter in module.named_parameters():
        if name not in grown:
            parameter.requires_grad_(False)
            continue
        start, n = grown[name]
        parameter.requires_grad_(True)

        def keep_new_rows(grad: torch.Tensor, start: int = start, stop: int = start + n):
            masked = torch.zeros_like(grad)
            masked[start:stop] = grad[start:stop]
            return masked

        handles.append(parameter.register_hook(keep_new_rows))
    if not handles:
        raise DataError("the new libraries index no learnable table of the model")
    return handles


@torch.no_grad()
def _restore_reference_rows(
    module: nn.Module, reference: dict[str, torch.Tensor], grown: dict[str, tuple[int, int]]
) -> None:
    """Copy the reference's values back into every tensor of ``module`` outside the new rows
    (a no-op after frozen training; it also undoes any running statistics a ``norm="batch"``
    ablation updated)."""
    for name, tensor in module.state_dict(keep_vars=True).items():
        old = reference[name].to(tensor.device)
        if name in grown:
            start, n = grown[name]
            tensor.data[:start].copy_(old[:start])
            tensor.data[start + n :].copy_(old[start:])
        else:
            tensor.data.copy_(old)
