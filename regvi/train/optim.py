"""The optimiser: torch's fused Adam, with its per-step bookkeeping done once."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from regvi import fastpath

# an Adam group's settings that the fast path does not handle (it defers to torch then)
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


class FusedAdam(torch.optim.Adam):
    r"""Adam (``torch.optim.Adam(..., fused=True)``): the same update, state, ``state_dict``
    and checkpoints, with less Python around each step.

    ``torch.optim.Adam.step`` rebuilds its lists of parameters, gradients and moment
    buffers and regroups them by device and dtype at every step before one fused kernel
    updates them all. Inside a training step that bookkeeping takes longer than the kernel
    itself (the parameters' Python objects are out of cache by then; figures in
    ``docs/performance.md``). Here the lists of parameters, moments and step
    counts are built once (after the first step has initialised the state, through torch's
    own ``step``), and each step gathers the gradients and calls the kernel,

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2)g^2,\quad
        \theta \leftarrow \theta - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)}+\epsilon}

    with :math:`g` the gradient plus ``weight_decay`` times :math:`\theta`. Anything the
    lists do not cover falls back to torch's ``step``: a parameter without a gradient, a
    sparse gradient, AMP's gradient scaling (``grad_scale``/``found_inf``), a group option
    other than the defaults, or several devices or dtypes in a group. Loading a state dict
    or adding a parameter group rebuilds the lists.

    The kernel is called through ``torch._fused_adam_``, a private API: only where
    :func:`regvi.fastpath.private_torch_apis` allows it (a tested torch version, not the
    reference path); otherwise every step is torch's own (public) fused ``step``. The
    reference path does not use this class at all (see :func:`make_adam`).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], **options: Any):
        options["fused"] = True
        super().__init__(params, **options)
        self._lists: list[tuple[dict, list, list, list, list]] | None = None
        self.register_load_state_dict_post_hook(FusedAdam._forget_lists)

    @staticmethod
    def _forget_lists(optimizer: FusedAdam) -> None:
        optimizer._lists = None
        # a state dict saved by the reference path's torch Adam carries fused=None
        for group in optimizer.param_groups:
            group["fused"] = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._lists = None

    def _build_lists(self) -> list[tuple[dict, list, list, list, list]] | None:
        """Per group: the group, its parameters and their moments and step counts; ``None``
        where the fast path does not apply."""
        lists = []
        for group in self.param_groups:
            params = list(group["params"])
            if not params or any(group.get(name) for name in _UNSUPPORTED):
                return None
            if len({(p.device, p.dtype) for p in params}) != 1:
                return None
            states = [self.state.get(p) for p in params]
            if any(not state or "exp_avg" not in state for state in states):
                return None  # not initialised yet: torch's step does it
            lists.append(
                (
                    group,
                    params,
                    [state["exp_avg"] for state in states],
                    [state["exp_avg_sq"] for state in states],
                    [state["step"] for state in states],
                )
            )
        return lists

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if (
            not fastpath.private_torch_apis()
            or getattr(self, "grad_scale", None) is not None
            or getattr(self, "found_inf", None) is not None
        ):
            return super().step(closure)
        if self._lists is None:
            self._lists = self._build_lists()
            if self._lists is None:
                return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads_per_group = []
        for _, params, _, _, _ in self._lists:
            grads = [p.grad for p in params]
            if any(g is None or g.is_sparse for g in grads):
                # torch's step skips parameters without gradients (and refuses sparse ones)
                super().step()
                return loss
            grads_per_group.append(grads)
        with torch.no_grad():
            for (group, params, exp_avgs, exp_avg_sqs, steps), grads in zip(
                self._lists, grads_per_group, strict=True
            ):
                beta1, beta2 = group["betas"]
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    amsgrad=False,
                    maximize=False,
                )
        return loss


def make_adam(params: Iterable[torch.nn.Parameter], **options: Any) -> torch.optim.Adam:
    """The training optimiser: :class:`FusedAdam`, or on the reference path
    (``REGVI_REFERENCE=1``, see :mod:`regvi.fastpath`) ``torch.optim.Adam`` with torch's
    default implementation. Both hold the same state and ``state_dict``."""
    if fastpath.reference():
        optimizer = torch.optim.Adam(params, **options)
        optimizer.register_load_state_dict_post_hook(_default_implementation)
        return optimizer
    return FusedAdam(params, **options)


def _default_implementation(optimizer: torch.optim.Adam) -> None:
    """After loading a state dict (a checkpoint of the fast path says ``fused=True``), keep
    torch's default implementation."""
    for group in optimizer.param_groups:
        group["fused"] = None
