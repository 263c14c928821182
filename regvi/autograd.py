"""Calling custom autograd functions without ``Function.apply``'s per-call signature binding."""

from __future__ import annotations

from typing import Any

import torch

from regvi import fastpath

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
    signature with ``inspect.signature`` on every call, to fill in defaults, which costs
    more than the rest of the call (see ``docs/performance.md``). With every argument given
    there is nothing to fill in, so outside ``torch.func`` transforms this goes straight to
    the autograd machinery that ``Function.apply`` itself ends in (``torch._C``'s
    ``_FunctionBase.apply``, a private API).

    That shortcut is taken only where :func:`regvi.fastpath.private_torch_apis` allows it (a
    tested torch version, not the reference path ``REGVI_REFERENCE=1``) and the private
    names imported; otherwise, and inside ``torch.func`` transforms (``torch.func.jvp``),
    this is ``Function.apply``.
    """
    if (
        _are_functorch_transforms_active is None
        or not fastpath.private_torch_apis()
        or _are_functorch_transforms_active()
    ):
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*unwrap_dead_wrappers(args))
