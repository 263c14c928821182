"""Fully connected layers, encoders and the softplus decoder.

Each hidden block is ``Dropout -> Linear -> LayerNorm (no affine) -> activation``: dropout sits
on the *input* of every layer (SPEC section 2) and LayerNorm replaces BatchNorm, so a cell's
representation never depends on the other cells of its minibatch.

Categorical covariates are injected at every layer. Concatenating a one-hot vector to a
layer's input and multiplying by the weight matrix is the same as adding one weight column per
active category, so we store those columns as an embedding table and add a lookup: identical
math, no dense one-hot tensor.

The first layer of an encoder reads counts as :class:`~regvi.data.counts.SparseCounts`:
dropout maps zero to zero, so it is applied to the stored entries only (the same
distribution as dropout on the dense input, at a fraction of the random draws), and the
result is scattered into a dense matrix on the device for the matmul (on CPU a dense GEMM
beats sparse-dense products above a few percent density, which count matrices have). The
encoders of one modality (z and library size) share that dropped-out input, see
:meth:`~regvi.data.counts.SparseCounts.dropout_to_dense`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from regvi.data.counts import SparseCounts

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """Return the activation module called ``name`` (relu, elu, gelu, silu, tanh)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


class CategoricalInjection(nn.Module):
    r"""Adds :math:`\sum_k W_k[c_k]` for categorical codes ``c`` (shape ``(B, n_keys)``).

    Codes are absolute indices into the concatenation of all keys' categories. Covariates
    with a single category carry no information (their one-hot is absorbed by the bias)
    and get no weights.
    """

    def __init__(self, n_categories: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_categories, n_out)) if n_categories else None
        if self.weight is not None:
            nn.init.normal_(self.weight, std=0.01)

    def forward(self, codes: torch.Tensor | None) -> torch.Tensor | float:
        if self.weight is None or codes is None or codes.shape[-1] == 0:
            return 0.0
        return F.embedding(codes, self.weight).sum(dim=1)


class FCLayers(nn.Module):
    """``n_layers`` blocks of ``Dropout -> Linear -> LayerNorm -> activation``.

    Parameters
    ----------
    n_in, n_hidden
        Input width and width of every hidden layer (the output width is ``n_hidden``).
    n_layers
        Number of blocks (at least 1).
    dropout_rate
        Dropout probability applied to the input of each block.
    n_categories
        Total number of categories of the injected categorical covariates (0 for none).
    activation
        Name of the activation.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        n_categories: int = 0,
        activation: str = "relu",
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be at least 1")
        widths = [n_in] + [n_hidden] * n_layers
        self.dropouts = nn.ModuleList(
            nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity() for _ in range(n_layers)
        )
        self.linears = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.injections = nn.ModuleList(
            CategoricalInjection(n_categories, n_hidden) for _ in range(n_layers)
        )
        self.norms = nn.ModuleList(
            nn.LayerNorm(n_hidden, elementwise_affine=False) for _ in range(n_layers)
        )
        self.activations = nn.ModuleList(make_activation(activation) for _ in range(n_layers))

    def forward(
        self,
        x: torch.Tensor | SparseCounts,
        cat_codes: torch.Tensor | None = None,
        continuous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` dense ``(B, n_in)`` or sparse; ``continuous`` ``(B, C)`` columns, if given, are
        appended to ``x`` (so ``n_in`` counts them)."""
        h = self._first_input(x, continuous)
        for i, (linear, inject, norm, act) in enumerate(
            zip(self.linears, self.injections, self.norms, self.activations, strict=True)
        ):
            if i > 0:
                h = self.dropouts[i](h)
            h = act(norm(linear(h) + inject(cat_codes)))
        return h

    def _first_input(
        self, x: torch.Tensor | SparseCounts, continuous: torch.Tensor | None
    ) -> torch.Tensor:
        """The first layer's input after its dropout, dense on ``x``'s device."""
        dropout = self.dropouts[0]
        if isinstance(x, SparseCounts):
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            x = x.dropout_to_dense(p, self.training)
        else:
            x = dropout(x)
        if continuous is not None and continuous.shape[-1]:
            x = torch.cat([x, dropout(continuous)], dim=-1)
        return x


class Encoder(nn.Module):
    r"""Gaussian encoder :math:`q(z\mid x)=\mathcal N(\mu(x), \sigma^2(x))`.

    The variance head is :math:`\sigma^2 = \exp(h) + 10^{-4}` (``h`` clamped at 15 so a bad
    step cannot overflow to inf). Returns ``(mean, var)``.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        n_categories: int = 0,
        activation: str = "relu",
        var_eps: float = 1e-4,
    ):
        super().__init__()
        self.layers = FCLayers(n_in, n_hidden, n_layers, dropout_rate, n_categories, activation)
        self.mean_head = nn.Linear(n_hidden, n_out)
        self.var_head = nn.Linear(n_hidden, n_out)
        self.var_eps = var_eps

    def forward(
        self,
        x: torch.Tensor | SparseCounts,
        cat_codes: torch.Tensor | None = None,
        continuous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers(x, cat_codes, continuous)
        mean = self.mean_head(h)
        var = torch.exp(torch.clamp(self.var_head(h), max=15.0)) + self.var_eps
        return mean, var


class Decoder(nn.Module):
    r"""Batch-free decoder :math:`\rho = \mathrm{softplus}(W h(z) + b)`, :math:`\rho \ge 0`.

    Softplus (not softmax): :math:`\rho` is in count units relative to the reference library,
    so it does not sum to one. Categorical ``nn_conditioning`` covariates, if any, are
    injected at every hidden layer. No dropout by default (as in scVI's decoders).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.0,
        n_categories: int = 0,
        activation: str = "relu",
    ):
        super().__init__()
        self.layers = FCLayers(n_in, n_hidden, n_layers, dropout_rate, n_categories, activation)
        self.head = nn.Linear(n_hidden, n_out)

    def forward(self, z: torch.Tensor, cat_codes: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(self.head(self.layers(z, cat_codes)))

    def weight_l2(self) -> torch.Tensor:
        """Sum of squared weights of every Linear layer and the head (biases excluded)."""
        total = self.head.weight.pow(2).sum()
        for linear in self.layers.linears:
            total = total + linear.weight.pow(2).sum()
        return total
