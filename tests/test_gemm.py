"""The oneDNN route of the dense layers equals F.linear: values, gradients, forward mode."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from regvi.nn import gemm

pytestmark = pytest.mark.skipif(
    not gemm._onednn_linear_works(), reason="this torch build has no usable oneDNN linear"
)


def _inputs(batch: int, n_in: int, n_out: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=generator, requires_grad=True)
    weight = (torch.randn(n_out, n_in, generator=generator) / n_in**0.5).requires_grad_()
    bias = torch.randn(n_out, generator=generator, requires_grad=True)
    return x, weight, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_equals_f_linear_with_gradients(with_bias):
    x, weight, bias = _inputs(130, 128, 2000)
    bias = bias if with_bias else None
    got = gemm._OneDnnLinear.apply(x, weight, bias)
    want = F.linear(x, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    for g, w in zip(
        torch.autograd.grad(got, inputs, upstream),
        torch.autograd.grad(want, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_onednn_linear_forward_mode_equals_f_linear():
    x, weight, bias = (t.detach() for t in _inputs(64, 128, 300, seed=1))
    direction = torch.randn_like(x)
    _, got = torch.func.jvp(lambda v: gemm._OneDnnLinear.apply(v, weight, bias), (x,), (direction,))
    _, want = torch.func.jvp(lambda v: F.linear(v, weight, bias), (x,), (direction,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_routes_only_large_float32_cpu_products(monkeypatch):
    monkeypatch.setattr(gemm, "cpu_gemm_backend", lambda: "onednn")
    big = gemm.Linear(128, 2000)
    small = gemm.Linear(128, 10)
    x = torch.randn(1024, 128, requires_grad=True)
    assert type(big(x).grad_fn).__name__ == "_OneDnnLinearBackward"
    assert type(small(x).grad_fn).__name__ == "AddmmBackward0"
    assert type(big.double()(x.double()).grad_fn).__name__ == "AddmmBackward0"
    monkeypatch.setattr(gemm, "cpu_gemm_backend", lambda: "mkl")
    assert type(gemm.Linear(128, 2000)(x).grad_fn).__name__ == "AddmmBackward0"


def test_direct_apply_matches_function_apply_inside_and_outside_torch_func():
    from regvi import autograd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    weight = torch.randn(3, 4, generator=g, requires_grad=True)
    bias = torch.randn(3, generator=g, requires_grad=True)
    direct = autograd.apply(gemm._OneDnnLinear, x, weight, bias)
    plain = gemm._OneDnnLinear.apply(x, weight, bias)
    assert type(direct.grad_fn) is type(plain.grad_fn)
    torch.testing.assert_close(direct, plain)
    grads = torch.autograd.grad(direct.square().sum(), (x, weight, bias))
    want = torch.autograd.grad(plain.square().sum(), (x, weight, bias))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)
    # inside a torch.func transform it defers to Function.apply
    got = torch.func.grad(lambda w: autograd.apply(gemm._OneDnnLinear, x, w, bias).sum())(weight)
    torch.testing.assert_close(got, torch.func.grad(lambda w: F.linear(x, w, bias).sum())(weight))
