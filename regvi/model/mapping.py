"""Mapping query cells from new libraries (and new studies) onto a trained reference
(scArches-style), written once for both models.

A reference model knows a fixed list of categories per covariate (libraries, datasets,
kits...). Cells with a value it never saw cannot be encoded with it: every category owns rows
of the technical tables its column indexes — ambient :math:`s_{b,g}`, feature scaling
:math:`y_{t,g}`, dispersion :math:`\\theta_{d,g}`, library-size prior :math:`p(\\ell \\mid p)`
— and, when the column conditions the decoder (``nn_conditioning_covariate_keys``, the
default with ``batch_key``) or the encoder (``encoder_covariate_keys``), columns of the
one-hot injections. Every one of those roles is a per-category table, so any categorical
covariate can take new values: :meth:`QueryMappingMixin.map_query` inserts one new row
(column) per new value into each table its column indexes, starts it as training does, and
learns only the new rows on the query cells:

.. math::
    \\min_{\\phi_{new}}\\; \\frac1B\\sum_{n\\in\\text{query}}\\big[-\\log p(x_n\\mid z_n,\\ell_n;
        \\phi_{ref}, \\phi_{new}) + \\mathrm{KL}(q(z_n)\\|p(z)) + \\mathrm{KL}(q(\\ell_n)\\|
        p(\\ell_n))\\big] + \\frac1{N_q}\\,\\text{penalties}(\\phi_{new})

with every reference parameter :math:`\\phi_{ref}` (encoders, decoders, the pooled dispersion
centre and spread, the rows of known categories) frozen.
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
        r"""A new model over the query cells ``data``, from libraries (and studies, kits...)
        the reference may never have seen, in the reference's latent space (scArches-style
        reference mapping). This model is left untouched.

        * **The reference network stays frozen**: encoders and decoders, the pooled
          dispersion centre and spread, the library encoder's residual weight, and every
          existing row of every table. The latent of any cell of known categories is
          therefore bitwise that of the reference model (on the same device).
        * **New values of any categorical covariate** — new libraries (``batch_key`` /
          ``library_key``), a new study (``dataset_key``), a new kit
          (``technical_covariate_keys``), or any key of the model roles — get new rows of
          every table their column indexes, started as at training, from the query data
          with the same code: ambient :math:`\beta_{b,g} = \log(f\,
          \overline{x^{norm}}_{g,b})` (:func:`~regvi.module.init.data_dependent_init`),
          feature scaling :math:`y = 0.99` (the prior mean), dispersion at the learned
          per-gene centre (offset 0, pooled) or at θ ≈ 9 (independent groups), and a
          library-size prior from the group's observed log library sizes
          (:func:`~regvi.module.init.library_prior_stats`, centred on the reference's
          :math:`\bar m`). Only those rows are learned, on the query cells alone, with
          the objective of training (global terms divided by the number of query
          training cells, no KL warm-up, no weight decay). A column that indexes no table
          (a dataset key when the feature-scaling keys are given explicitly) just records
          its new values.
        * **No network surgery is needed by default**: the encoder is batch-free (SPEC
          section 1), so a query cell's latent does not depend on its covariates at all and
          the new rows only explain its counts. When a column with new values conditions the
          decoder (``nn_conditioning_covariate_keys``, the default with ``batch_key``) or
          the encoder (``encoder_covariate_keys``), each injected layer gets one new
          one-hot column per new value (scArches' surgery), started as at training; only
          those columns get gradients.
        * **Known categories** in the query keep their trained parameters.
        * A :class:`~regvi.errors.DataError`: missing features or covariate columns, and a
          new dataset on cells of a library the reference knows (each library belongs to
          exactly one dataset; its rows were learned in its reference dataset).

        The returned model is an ordinary model (categories: the reference's, then the new
        ones of each column; ``save``/``load`` work, and it encodes reference cells too); its
        ``history`` is the mapping's. ``max_epochs`` defaults to scvi-tools' heuristic for
        the query size; ``batch_size`` is capped at the number of query training cells;
        other keyword arguments go to :meth:`train` (``accelerator``, ``precision``,
        ``logger``, ``enable_progress_bar``, ``split_seed``, ``early_stopping`` with
        ``train_size < 1``, ...). Without new values nothing is learned.
        """
        fixed = sorted(set(train_kwargs) & set(_FIXED_TRAIN_ARGUMENTS))
        if fixed:
            raise ConfigError(f"map_query sets {', '.join(fixed)} itself; do not pass it")
        devices = train_kwargs.pop("devices", 1)
        if str(devices) not in ("1", "auto"):
            raise ConfigError(f"map_query trains in one process (got devices={devices!r})")
        columns = list(
            dict.fromkeys(
                c for e in self._covariate_encoders() for c in e.keys.categorical_columns()
            )
        )
        if not columns:
            raise ConfigError(
                "query mapping needs a model set up with a library key (batch_key or "
                "library_key) or another categorical covariate: new values of those are what "
                "it learns parameters for"
            )
        mapped = self._copy(data)
        obs = mapped._obs(data)
        added: dict[str, list[str]] = {}
        for column in columns:
            for encoder in mapped._covariate_encoders():
                if column in encoder.categories:
                    new = encoder.add_categories(obs, column)
                    added.setdefault(column, new)
        added = {column: new for column, new in added.items() if new}
        for encoder in mapped._covariate_encoders():
            _check_new_datasets(encoder, obs, added)
            encoder._check_library_dataset(obs)
        mapped._dataset()  # encodes the query: missing features fail here
        log.info(
            "query: %d cells; new covariate values: %s",
            len(obs),
            "; ".join(
                f"{column}: {', '.join(new[:5])}{', ...' if len(new) > 5 else ''}"
                for column, new in added.items()
            )
            or "none",
        )
        if not added:
            return mapped
        # a small query trains in smaller minibatches rather than failing
        n_train = stratified_split(
            mapped._strata(), train_size, seed=train_kwargs.get("split_seed", 0)
        )[0].size
        batch_size = min(batch_size, n_train)
        before = {k: v.detach().clone() for k, v in mapped.module.state_dict().items()}
        grown = mapped._add_category_rows(added)
        handles = _freeze_except(mapped.module, grown)
        if not handles:
            log.info("the new values index no learnable table: nothing to learn")
            for parameter in mapped.module.parameters():
                parameter.requires_grad_(True)
            return mapped
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

    def _add_category_rows(self, added: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """Insert the rows (one-hot columns) of the new categories ``added`` (``{column: new
        values}``, already appended to the covariate encoders' categories) into every table
        their columns index, in every count modality, each row started as at training.
        Returns ``{state-dict name: boolean mask of its new rows}`` of the grown tensors."""
        events: list[tuple[nn.Module, str, int, int, int]] = []

        def grow(component: nn.Module, position: int, n_new: int, add: Any) -> None:
            shapes = {
                name: t.shape
                for name, t in [*component._parameters.items(), *component._buffers.items()]
            }
            add()
            for name, t in [*component._parameters.items(), *component._buffers.items()]:
                if t is not None and t.shape != shapes.get(name):
                    events.append((component, name, position, n_new, shapes[name][0]))

        for spec in self._mapping_parts():
            part, cov = spec.part, spec.covariates
            totals = cell_totals(spec.counts)
            log_ambient = None
            for role in (*LIST_ROLES, *SINGLE_ROLES):
                keys = cov.keys.role_keys(role)
                short = ROLE_NAMES[role]
                # last key first: the tables still hold the reference's rows of the keys
                # before it, so its insertion point counts their old rows only
                for j in reversed(range(len(keys))):
                    key = keys[j]
                    n_new = len(added.get(key, ()))
                    if not n_new:
                        continue
                    n_old = len(cov.categories[key]) - n_new
                    position = n_old + sum(
                        len(cov.categories[k]) - len(added.get(k, ())) for k in keys[:j]
                    )
                    if short == "ambient" and part.ambient is not None:
                        if log_ambient is None:  # every new row of every key, final layout
                            _, log_ambient = data_dependent_init(
                                spec.counts,
                                totals,
                                float(part.library.global_log_mean),
                                spec.codes["ambient"],
                                sum(cov.n_categories("ambient_covariate_keys")),
                                spec.ambient_fraction,
                                float(part.library.log_sensitivity),
                            )
                        first = n_old + sum(len(cov.categories[k]) for k in keys[:j])
                        rows = log_ambient[first : first + n_new]
                        grow(
                            part.ambient,
                            position,
                            n_new,
                            lambda a=part.ambient, r=rows, p=position: a.add_categories(p, r),
                        )
                    elif short == "feature_scaling" and part.feature_scaling is not None:
                        scaling = part.feature_scaling
                        grow(
                            scaling,
                            position,
                            n_new,
                            lambda s=scaling, p=position, n=n_new: s.add_categories(p, n),
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
                                    n_new,
                                    lambda i=injection, p=position, n=n_new: i.add_categories(p, n),
                                )
                    elif short == "dispersion":
                        grow(
                            part.dispersion,
                            position,
                            n_new,
                            lambda d=part.dispersion, n=n_new: d.add_groups(n),
                        )
                        if not part.dispersion.pooled:
                            # one reference group (or pooling off): the groups stay
                            # independent, and the saved arguments say so (a rebuilt module
                            # would pool them)
                            self._set_option("dispersion_pooling", spec.name, False)
                    elif short == "library_size":
                        prior = library_prior_stats(
                            totals, spec.codes["library_size"] - n_old, n_new
                        )
                        grow(
                            part.library,
                            position,
                            n_new,
                            lambda lib=part.library, q=prior: lib.add_groups(q),
                        )
        masks: dict[tuple[int, str], torch.Tensor] = {}
        owners: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        for owner, attr, position, n_new, rows_before in events:
            key = (id(owner), attr)
            mask = masks.get(key, torch.zeros(rows_before, dtype=torch.bool))
            masks[key] = torch.cat(
                [mask[:position], torch.ones(n_new, dtype=torch.bool), mask[position:]]
            )
            owners[key] = (owner, attr)
        names = {id(t): name for name, t in self.module.state_dict(keep_vars=True).items()}
        return {
            names[id(getattr(owner, attr))]: masks[key] for key, (owner, attr) in owners.items()
        }


def _check_new_datasets(encoder: CovariateEncoder, obs: Any, added: dict[str, list[str]]) -> None:
    """A new study (new value of the dataset key) brings new libraries: a library the
    reference knows belongs to the dataset it was trained in, so it cannot move to a new one
    (its rows were learned there); that is a :class:`~regvi.errors.DataError`."""
    lib, ds = encoder.keys.library_key, encoder.keys.dataset_key
    if not lib or not ds or ds not in added:
        return
    new_libraries = set(added.get(lib, ()))
    dataset = obs[ds].astype(str)
    library = obs[lib].astype(str)
    moved = sorted(set(library[dataset.isin(added[ds]) & ~library.isin(new_libraries)]))
    if moved:
        shown = ", ".join(repr(m) for m in moved[:5])
        raise DataError(
            f"obs column {ds!r} (the dataset key) has new value(s) "
            f"{', '.join(repr(v) for v in added[ds][:5])} on cells of librar"
            f"{'y' if len(moved) == 1 else 'ies'} {shown} that the reference knows in another "
            f"dataset; each library belongs to exactly one dataset: give those cells their "
            f"reference dataset, or new library names if they are new libraries"
        )


def _freeze_except(
    module: nn.Module, grown: dict[str, torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze every parameter of ``module`` but the new rows of the grown tables (``grown``:
    name -> boolean mask of its new rows): the others stop requiring gradients, and a hook
    zeroes the gradient of a grown table's old rows (so Adam, without weight decay, leaves
    them bitwise unchanged). Returns the hooks' handles (none: nothing to learn)."""
    handles = []
    for name, parameter in module.named_parameters():
        if name not in grown:
            parameter.requires_grad_(False)
            continue
        parameter.requires_grad_(True)

        def keep_new_rows(grad: torch.Tensor, mask: torch.Tensor = grown[name]) -> torch.Tensor:
            keep = mask.to(grad.device).view(-1, *([1] * (grad.dim() - 1)))
            return grad.masked_fill(~keep, 0.0)

        handles.append(parameter.register_hook(keep_new_rows))
    return handles


@torch.no_grad()
def _restore_reference_rows(
    module: nn.Module, reference: dict[str, torch.Tensor], grown: dict[str, torch.Tensor]
) -> None:
    """Copy the reference's values back into every tensor of ``module`` outside the new rows
    (a no-op after frozen training; it also undoes any running statistics a ``norm="batch"``
    ablation updated)."""
    for name, tensor in module.state_dict(keep_vars=True).items():
        old = reference[name].to(tensor.device)
        if name in grown:
            tensor.data[~grown[name].to(tensor.device)] = old
        else:
            tensor.data.copy_(old)
