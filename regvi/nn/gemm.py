"""Dense affine maps whose large CPU matrix products run on oneDNN where that is faster.

PyTorch's CPU builds multiply float32 matrices with MKL. On AMD CPUs MKL takes its AVX2 code
path even where the CPU has AVX-512, while oneDNN (also part of every x86 PyTorch build)
chooses its kernels by instruction set, so on such CPUs oneDNN computes the decoder's
output layer faster than MKL in all three of its products (forward, input and weight
gradients), in IEEE float32 like MKL (measurements in ``docs/performance.md``).

:func:`linear` is ``F.linear`` with that routing: a product with at least
:data:`ONEDNN_MIN_MACS` multiply-adds, on float32 CPU tensors, outside autocast, goes through
``torch.ops.mkldnn._linear_pointwise`` (forward, input gradient, and the weight gradient as
the transpose of :math:`x^\\top g`, the operand order oneDNN is fast at); everything else is
``F.linear``. Which backend is used is decided once per process (:func:`cpu_gemm_backend`):
oneDNN on AMD CPUs with AVX-512 (where it was measured), MKL elsewhere; the environment
variable ``REGVI_CPU_GEMM=onednn|mkl`` overrides it. The op is checked against ``F.linear``
before first use, and a build without it falls back to ``F.linear``. The op is private
(``_linear_pointwise``), so it is used only where :func:`regvi.fastpath.private_torch_apis`
allows (a tested torch version); the reference path (``REGVI_REFERENCE=1``) is always
``F.linear``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from regvi import autograd, fastpath

#: products smaller than this many multiply-adds stay on MKL. oneDNN generates a kernel per
#: operand shape and holds ~8 MB of its own (measured as peak memory on the 1000-cell multiome
#: benchmark), and it has a fixed cost per call that small products do not repay. The value
#: (batch 128 x 128 hidden x 1000 features) sits well above the break-even size, so the
#: products routed to oneDNN gain clearly and the small ones neither pay the fixed cost nor
#: add kernels; the numbers are in docs/performance.md.
ONEDNN_MIN_MACS = 2**24


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_gemm_backend() -> str:
    """``"onednn"`` or ``"mkl"``: who multiplies large float32 matrices on the CPU (see the
    module notes)."""
    choice = os.environ.get("REGVI_CPU_GEMM", "").strip().lower()
    if choice not in ("onednn", "mkl"):
        capability = torch.backends.cpu.get_cpu_capability()
        amd_avx512 = capability.startswith("AVX512") and _cpu_vendor() == "AuthenticAMD"
        choice = "onednn" if amd_avx512 else "mkl"
    return "onednn" if choice == "onednn" and _onednn_linear_works() else "mkl"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this build has the oneDNN op and it computes ``F.linear`` for the operand
    layouts :class:`_OneDnnLinear` passes (contiguous and transposed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, g = torch.randn(6, 5, generator=generator), torch.randn(6, 4, generator=generator)
    weight, bias = torch.randn(4, 5, generator=generator), torch.randn(4, generator=generator)
    try:
        checks = (
            (_onednn_linear(x, weight, bias), F.linear(x, weight, bias)),
            (_onednn_linear(g, weight.t(), None), g @ weight),
            (_onednn_linear(x.t(), g.t(), None).t(), g.t() @ x),
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return all(torch.allclose(got, want, rtol=1e-5, atol=1e-5) for got, want in checks)


class _OneDnnLinear(torch.autograd.Function):
    r""":math:`y = xW^\top + b` with the three products on oneDNN:
    :math:`y`, :math:`\partial x = gW` and :math:`\partial W = (x^\top g)^\top`."""

    @staticmethod
    def forward(x, weight, bias):
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_x = _onednn_linear(grad, weight.t(), None) if need_x else None
        grad_weight = _onednn_linear(x.t(), grad.t(), None).t() if need_weight else None
        grad_bias = grad.sum(dim=0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, tangent_x, tangent_weight, tangent_bias):
        # forward mode (torch.func.jvp, used for attribution): plain F.linear terms
        x, weight = ctx.saved_tensors
        tangent = None
        if tangent_x is not None:
            tangent = F.linear(tangent_x, weight)
        if tangent_weight is not None:
            term = F.linear(x, tangent_weight)
            tangent = term if tangent is None else tangent + term
        if tangent_bias is not None:
            tangent = (
                tangent_bias.expand(x.shape[0], -1) if tangent is None else tangent + tangent_bias
            )
        if tangent is None:
            tangent = x.new_zeros(x.shape[0], weight.shape[0])
        return tangent


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; large float32 products on the CPU go to oneDNN where
    that is the faster backend (see the module notes), except on the reference path."""
    if (
        x.dim() == 2
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.shape[0] * weight.shape[0] * weight.shape[1] >= ONEDNN_MIN_MACS
        and not torch.is_autocast_enabled("cpu")
        and fastpath.private_torch_apis()
        and cpu_gemm_backend() == "onednn"
    ):
        return autograd.apply(_OneDnnLinear, x.contiguous(), weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` computed by :func:`linear` (same parameters and state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
