"""Calling custom autograd functions without ``Function.apply``'s per-call signature binding."""

from __future__ import annotations

from typing import Any

import torch

try:  # private torch API (present since 2.0); without it, plain Function.apply is used
    from torch._C import _are_functorch_transforms_active
    from torch._functorch.utils import unwrap_dead_wrappers
except ImportError:  # pragma: no cover - depends on the torch build
    _are_functorch_transforms_active = None


def apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    r"""``function.apply(*args)`` for a Function called with every argument of its
    ``forward`` (none left to a default).

    For a Function with a separate ``setup_context`` (the style that forward-mode AD, used by
    attribution, requires), ``Function.apply`` binds the arguments to ``forward``'s
    signature with ``inspect.signature`` on every call, to fill in defaults: 14 us a call on
    the 2-core benchmark CPU, against 11 us for the whole of the rest of the call, with four
    such calls in a training step. With every argument given there is nothing to fill in,
    so outside ``torch.func`` transforms this goes straight to the autograd machinery that
    ``Function.apply`` itself ends in; inside them (``torch.func.jvp``) it is
    ``Function.apply``.
    """
    if _are_functorch_transforms_active is None or _are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*unwrap_dead_wrappers(args))
