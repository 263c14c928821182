"""The fast paths against the plain reference path (``REGVI_REFERENCE=1``), and the public
fallbacks of the private-API fast paths on an untested torch version."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from regvi import AmbientRegularizedSCVI, autograd, fastpath
from regvi.datasets import simulate
from regvi.nn import gemm
from regvi.train.optim import FusedAdam


@pytest.fixture
def untested_torch(monkeypatch):
    """As on a torch version outside ``fastpath.TESTED_TORCH``; the private APIs raise if
    called, so a test passes only if the public fallbacks ran (``torch._fused_adam_`` is
    torch's own fused step too: see the optimiser test)."""
    monkeypatch.setattr(fastpath, "_torch_tested", False)

    def refuse(*args, **kwargs):
        raise AssertionError("a private torch API was called")

    monkeypatch.setattr(autograd, "unwrap_dead_wrappers", refuse)
    monkeypatch.setattr(gemm, "_onednn_linear", refuse)


def test_tested_versions():
    assert fastpath.torch_is_tested("2.13.0+cpu")
    assert fastpath.torch_is_tested("2.4.1")
    assert not fastpath.torch_is_tested("2.14.0")
    assert not fastpath.torch_is_tested("2.3.1")
    assert not fastpath.torch_is_tested("3.0.0")


def test_reference_switch_is_read_from_the_environment():
    code = "from regvi import fastpath; print(fastpath.reference(), fastpath.private_torch_apis())"
    for value, want in (("1", "True False"), ("0", f"False {fastpath._torch_tested}")):
        env = {**os.environ, fastpath.ENV_REFERENCE: value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == want


def test_autograd_apply_falls_back_to_function_apply(untested_torch):
    from regvi.module.components import _ExpectedCounts, expected_counts

    g = torch.Generator().manual_seed(0)
    rho = torch.rand(5, 4, generator=g, requires_grad=True)
    log_library = torch.randn(5, generator=g, requires_grad=True)
    got = expected_counts(rho, log_library)  # through autograd.apply
    want = _ExpectedCounts.apply(rho, log_library, None, None, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream = torch.randn(5, 4, generator=g)
    for a, b in zip(
        torch.autograd.grad(got, (rho, log_library), upstream),
        torch.autograd.grad(want, (rho, log_library), upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gemm_dispatch_falls_back_to_f_linear(untested_torch):
    x = torch.randn(1024, 128, requires_grad=True)
    weight = torch.randn(256, 128, requires_grad=True)  # above gemm.ONEDNN_MIN_MACS
    got = torch.autograd.grad(gemm.linear(x, weight).square().sum(), (x, weight))
    want = torch.autograd.grad(F.linear(x, weight).square().sum(), (x, weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_adam_falls_back_to_torchs_fused_step(untested_torch):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    ours_model, torch_model = model(), model()
    ours = FusedAdam(ours_model.parameters(), lr=1e-2, eps=0.01)
    reference = torch.optim.Adam(torch_model.parameters(), lr=1e-2, eps=0.01, fused=True)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ours.step()
        reference.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ours._lists is None  # its own lists (and direct kernel calls) never came in


def _train(reference: bool) -> tuple[np.ndarray, dict[str, torch.Tensor], type, torch.Tensor]:
    # 1000 genes, 128 hidden units and batch 128: the decoder's output layer is large enough
    # for the oneDNN dispatch (gemm.ONEDNN_MIN_MACS) where that backend is chosen
    adata, _ = simulate(
        n_cells=384, n_genes=1000, n_cell_types=3, n_batches=2, seed=3, return_rho=False
    )
    with fastpath.reference_path(reference):
        torch.manual_seed(0)
        AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
        model = AmbientRegularizedSCVI(adata, n_latent=5, n_hidden=128)
        start = model.module.rna.decoder.head.bias.detach().clone()
        model.train(
            max_epochs=3,
            batch_size=128,
            train_size=1.0,
            accelerator="cpu",
            enable_progress_bar=False,
        )
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    optimizer = type(model.trainer_.optimizers[0])
    return model.history["loss_train"].to_numpy(), state, optimizer, start


def test_fast_and_reference_paths_train_alike():
    """Nine optimiser steps each way from the same seed and data: the same random draws and
    the same model, so only rounding differs (hand-derived against autograd gradients,
    oneDNN against MKL products, one fused kernel against torch's per-tensor Adam), of the
    order of float32's 1e-7 relative. Adam divides each update by sqrt(v) + eps with eps =
    0.01 (the default), so a gradient's rounding moves a parameter by at most lr / eps =
    0.1 times that rounding a step: the parameters agree to 1e-5 (observed: ~3e-7) and
    the epoch losses to 1e-5 relative (observed: <1e-7). A wrong gradient in a fast path
    moves them by far more (one step of Adam moves a parameter by up to lr = 1e-3)."""
    fast_losses, fast_state, fast_optimizer, start = _train(reference=False)
    ref_losses, ref_state, ref_optimizer, _ = _train(reference=True)
    assert fast_optimizer is FusedAdam and ref_optimizer is torch.optim.Adam
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-5)
    assert fast_state.keys() == ref_state.keys()
    for name, value in fast_state.items():
        torch.testing.assert_close(value, ref_state[name], rtol=0, atol=1e-5, msg=name)
    # while training moved the parameters far beyond that tolerance
    assert (fast_state["rna.decoder.head.bias"] - start).abs().max() > 1e-3


def test_checkpoints_move_between_the_paths_keeping_each_paths_optimiser():
    from regvi.train.optim import make_adam

    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.ones(3)
    fast = make_adam(params, lr=1e-3)
    fast.step()
    with fastpath.reference_path():
        plain = make_adam(params, lr=1e-3)
    plain.load_state_dict(fast.state_dict())
    assert type(plain) is torch.optim.Adam and not plain.param_groups[0]["fused"]
    fast.load_state_dict(plain.state_dict())
    assert fast.param_groups[0]["fused"] is True
