"""The fast paths of a training step, and the one switch that turns them all off.

A training step has a plain formulation (torch ops differentiated by autograd, torch's
``Adam``, ``F.linear``) and, by default, faster equivalents of some of its parts (see
``docs/performance.md`` for what each buys):

* **priors as one autograd node**: the global prior terms carry hand-derived gradients
  (:func:`regvi.distributions.closed_form_scalar`, :func:`regvi.nn.layers.sum_of_squares`)
  instead of autograd graphs of a dozen small ops each;
* **direct autograd calls** (:func:`regvi.autograd.apply`): custom autograd Functions
  called without ``Function.apply``'s per-call signature binding, through torch's private
  C++ ``apply`` (private API: only on :data:`TESTED_TORCH` versions);
* **the optimiser** (:class:`regvi.train.optim.FusedAdam`): torch's fused Adam kernel
  called directly with lists built once (``torch._fused_adam_``, private API: only on
  :data:`TESTED_TORCH` versions; elsewhere torch's own fused step);
* **the CPU GEMM dispatch** (:func:`regvi.nn.gemm.linear`): large float32 products on
  oneDNN (``torch.ops.mkldnn._linear_pointwise``) where that backend is faster.

Setting the environment variable ``REGVI_REFERENCE=1`` (read here, once, at import) runs
the plain reference path instead: the priors through autograd, ``Function.apply``,
``torch.optim.Adam`` (default implementation) and ``F.linear``. The model, its loss and
its random draws are the same; only rounding differs. Use it to rule the fast paths out
when a result looks wrong, or to compare against them (``tests/test_fastpath.py``).
:func:`reference_path` switches it within a process (tests); spawned data-parallel
processes read the environment variable afresh.

The custom autograd Functions of the likelihood, the expected counts, the antithetic
dispersion draws and the sparse first layer are part of the model's formulation (public
``torch.autograd.Function`` API, gradients checked against autograd by the tests) and are
used on both paths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: the environment variable that selects the plain reference path
ENV_REFERENCE = "REGVI_REFERENCE"

#: torch versions ``[low, high)`` (major, minor) on which the private-API fast paths are
#: used: the project's supported range (pyproject), exercised by the test suite on 2.13.
#: Outside it the public fallbacks run.
TESTED_TORCH = ((2, 4), (2, 14))


def _env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


_reference = _env_flag(os.environ.get(ENV_REFERENCE))


def reference() -> bool:
    """Whether the plain reference path is selected (``REGVI_REFERENCE=1``)."""
    return _reference


@contextmanager
def reference_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, the reference path is on (``enabled``) or off, whatever the
    environment says; the previous choice is restored on exit."""
    global _reference
    previous, _reference = _reference, bool(enabled)
    try:
        yield
    finally:
        _reference = previous


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def torch_is_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed torch) lies in :data:`TESTED_TORCH`."""
    low, high = TESTED_TORCH
    return low <= _version(version or torch.__version__) < high


_torch_tested = torch_is_tested()


def private_torch_apis() -> bool:
    """Whether the fast paths that call private torch APIs may run: not on the reference
    path, and only on a :data:`TESTED_TORCH` version."""
    return _torch_tested and not _reference


__all__ = [
    "ENV_REFERENCE",
    "TESTED_TORCH",
    "private_torch_apis",
    "reference",
    "reference_path",
    "torch_is_tested",
]
