"""Layers: covariate injection starts like the one-hot columns of a Linear layer; the
ablation switches (dropout position, BatchNorm, softmax head) behave as documented."""

from __future__ import annotations

import math

import pytest
import torch

from regvi.nn import Decoder, FCLayers


def test_injected_covariates_start_at_the_scale_of_the_layer_weights():
    """A one-hot covariate concatenated to the input would get a weight column initialised
    like every other column of the Linear, U(±1/sqrt(fan in)); the injection table stores
    those columns, so it must start at that scale too. At 1e-2 (the earlier init) a decoder
    conditioned on the batch started out ignoring it, and the encoder learnt to put the
    batch into z first: batch entropy 0.49 vs 0.65 with the columns' init on pbmc_3tech
    (docs/integration.md)."""
    torch.manual_seed(0)
    n_latent, n_hidden, n_categories = 10, 128, 3
    layers = FCLayers(n_latent, n_hidden, n_layers=2, dropout_rate=0.0, n_categories=3)
    for i, injection in enumerate(layers.injections):
        fan_in = (n_latent if i == 0 else n_hidden) + n_categories
        bound = 1.0 / math.sqrt(fan_in)
        weight = injection.weight.detach()
        assert weight.abs().max() <= bound
        # uniform on ±bound has sd bound/sqrt(3); 384 draws put the estimate within 10%
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # the effect of switching the covariate is as large as that of a latent dimension
    first = layers.linears[0].weight.detach()  # (n_in, n_hidden)
    injected = layers.injections[0].weight.detach()
    ratio = injected.norm(dim=1).mean() / first.norm(dim=1).mean()
    assert 0.8 < ratio.item() < 1.25


def test_dropout_after_activation_keeps_the_input_whole():
    """scVI's order (Linear -> norm -> activation -> Dropout): the input is not dropped, so
    with dropout the first pre-activation equals the deterministic one, and the output has
    exact zeros where units were dropped."""
    torch.manual_seed(0)
    x = torch.rand(64, 20) + 0.5
    after = FCLayers(20, 32, dropout_rate=0.5, dropout_after_activation=True, activation="elu")
    before = FCLayers(20, 32, dropout_rate=0.5, activation="elu")
    before.load_state_dict(after.state_dict())
    after.train()
    before.train()
    out_after = after(x)
    after.eval()
    reference = after(x)
    dropped = out_after == 0
    # ELU is never exactly zero: zeros are dropped units, the rest are scaled by 1/(1-p)
    assert 0.4 < dropped.float().mean() < 0.6
    torch.testing.assert_close(out_after[~dropped], 2.0 * reference[~dropped])
    # dropout on the input instead changes the kept units too
    assert (before(x) == 0).float().mean() < 0.01


def test_hidden_dropout_rate_drops_hidden_units_not_input_features():
    """``dropout_rate`` is the dropout on the input features, ``hidden_dropout_rate`` on the
    hidden units entering the second layer: measured as the fraction of inputs each dropout
    zeroes (forward hooks on the dropout modules), over 200,000 draws each."""
    torch.manual_seed(0)
    layers = FCLayers(50, 400, n_layers=2, dropout_rate=0.1, hidden_dropout_rate=0.4)
    zeroed: list[float] = []

    def record(module, inputs, output):
        kept = inputs[0] != 0
        zeroed.append(((output == 0) & kept).sum().item() / kept.sum().item())

    for dropout in layers.dropouts:
        dropout.register_forward_hook(record)
    layers.train()
    layers(torch.rand(4000, 50) + 0.5)
    assert zeroed[0] == pytest.approx(0.1, abs=0.005)
    assert zeroed[1] == pytest.approx(0.4, abs=0.005)
    # None: every layer's input gets dropout_rate (the behaviour before the option existed)
    same = FCLayers(50, 400, n_layers=3, dropout_rate=0.2)
    assert [d.p for d in same.dropouts] == [0.2, 0.2, 0.2]
    none = FCLayers(50, 400, n_layers=2, dropout_rate=0.1, hidden_dropout_rate=0.0)
    assert isinstance(none.dropouts[1], torch.nn.Identity)


def test_batch_norm_layers_normalise_over_the_minibatch():
    torch.manual_seed(0)
    layers = FCLayers(5, 16, dropout_rate=0.0, norm="batch", activation="tanh")
    layers.train()
    h = layers.linears[0](torch.randn(256, 5) * 3 + 1)
    normed = layers.norms[0](h)
    torch.testing.assert_close(normed.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="normalisation"):
        FCLayers(5, 16, norm="group")


def test_softmax_head_gives_fractions_of_the_reference_library():
    torch.manual_seed(0)
    decoder = Decoder(4, 50, n_hidden=8, scale_activation="softmax")
    decoder.reference_library.fill_(1000.0)
    rho = decoder(torch.randn(7, 4))
    torch.testing.assert_close(rho.sum(1), torch.full((7,), 1000.0))
    with pytest.raises(ValueError, match="scale_activation"):
        Decoder(4, 50, scale_activation="exp")
