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
distribution as dropout on the dense input, at a fraction of the random draws). On the CPU
the first layer then reads the stored entries directly (:func:`sparse_input_linear`); on
accelerators they are scattered into a dense matrix on the device for a GEMM. The encoders of
one modality (z and library size) share that dropped-out input, see
:meth:`~regvi.data.counts.SparseCounts.dropout`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from regvi import autograd, fastpath
from regvi.data.counts import SparseCounts
from regvi.nn.gemm import Linear

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """Return the activation module called ``name`` (relu, elu, gelu, silu, tanh)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


#: Below this many cells x features a minibatch's first layer is a dense GEMM on the CPU too:
#: the sparse path has a fixed cost per call (a CSC conversion, two kernel launches) that the
#: dense GEMM does not, so dense wins for narrow inputs and sparse for wide ones. The value
#: (batch 128 x 128 features) sits a little below the measured crossover, where the two paths
#: cost about the same; the measurements are in docs/performance.md.
SPARSE_INPUT_MIN_ELEMENTS = 128 * 128


def sparse_input_linear(
    counts: SparseCounts, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`h = XW + b` for a sparse ``(cells, features)`` matrix :math:`X` and a dense
    ``weight`` :math:`W` ``(features, out)``, reading only the stored entries of :math:`X`.

    Forward, each cell's row is :math:`h_n = \sum_{g: x_{ng} \neq 0} x_{ng} W_{g\cdot}`: a
    value-weighted sum of weight rows, which is ``embedding_bag``. Backward,
    :math:`\partial L/\partial W = X^\top G` is the same kernel over the feature-major (CSC)
    order of the entries (:meth:`SparseCounts.transpose`): each feature's row is the
    value-weighted sum of its cells' rows of :math:`G`; and, when asked for,
    :math:`\partial L/\partial x_{ng} = \langle G_{n\cdot}, W_{g\cdot}\rangle` on the stored
    entries. No dense ``cells x features`` buffer is made (82 MB at 1024 cells x 20000
    features).

    On the CPU this beats densifying and a dense GEMM at the densities of real data, where
    most entries are zero, and a sparse CSR matmul (MKL) for the weight gradient was slower
    than the embedding-bag form (measurements in docs/performance.md). On GPUs the dense
    GEMM is kept (:class:`FCLayers` chooses).
    """
    if torch.is_grad_enabled() and weight.requires_grad:
        # The backward's CSC order, made now while the entries are in cache: at the end of
        # the backward they have been evicted and the conversion runs slower (see
        # docs/performance.md).
        counts.transpose()
    return autograd.apply(_SparseInputLinear, counts.values, weight, bias, counts)


def _weighted_row_sums(
    table: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    r"""Row :math:`i` of the result is :math:`\sum_{k=o_i}^{o_{i+1}-1} w_k\,T_{j_k\cdot}` for
    CSR-style ``offsets`` :math:`o` (``(n + 1,)``), ``indices`` :math:`j` and ``weights``
    :math:`w`: a sparse matrix times ``table``, as one ``embedding_bag`` pass."""
    return F.embedding_bag(
        indices,
        table,
        offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
        include_last_offset=True,
    )


class _SparseInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(values, weight, bias, counts):
        out = _weighted_row_sums(weight, counts.columns, counts.offsets, values)
        return out if bias is None else out.add_(bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, weight, bias, counts = inputs
        ctx.save_for_backward(values, weight)
        ctx.counts = counts
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        values, weight = ctx.saved_tensors
        counts = ctx.counts
        need_values, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_values = grad_weight = grad_bias = None
        if need_weight:
            # X^T G: per feature, the value-weighted sum of its cells' rows of G, the same
            # kernel as the forward over the feature-major order
            feature_offsets, rows, values_by_feature = counts.transpose()
            grad_weight = _weighted_row_sums(grad, rows, feature_offsets, values_by_feature)
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias and ctx.has_bias:
            grad_bias = grad.sum(dim=0)
        if need_values:
            per_entry = grad.index_select(0, counts.rows) * weight.index_select(0, counts.columns)
            grad_values = per_entry.sum(dim=1).to(values.dtype)
        return grad_values, grad_weight, grad_bias, None


class InputLinear(nn.Module):
    r"""The first affine map of a block stack, :math:`h = xW + b`, reading dense or sparse
    input.

    :math:`W` is stored ``(in_features, out_features)``, the transpose of
    :class:`torch.nn.Linear`'s layout, so the weight rows a sparse input selects are
    contiguous (:func:`sparse_input_linear`). Initialised as ``nn.Linear``: weight and bias
    uniform on :math:`\pm 1/\sqrt{n_{in}}`.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, x: torch.Tensor | SparseCounts, trailing: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` dense ``(B, n)`` or sparse; ``trailing`` dense ``(B, in_features - n)``
        columns that follow ``x`` (continuous covariates), if any."""
        if isinstance(x, SparseCounts):
            n = x.n_features
            # no slice without trailing columns: its backward would copy the whole gradient
            weight = self.weight if n == self.in_features else self.weight[:n]
            out = sparse_input_linear(x, weight, self.bias)
            if trailing is not None:
                out = out + trailing @ self.weight[n:]
            return out
        if trailing is not None:
            x = torch.cat([x, trailing], dim=-1)
        return torch.addmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def insert_rows(module: nn.Module, name: str, position: int, rows: torch.Tensor) -> None:
    """Insert ``rows`` into the table ``module.<name>`` (a parameter or a buffer, rows along
    dimension 0) before its row ``position``: the table grows by ``len(rows)`` rows, every
    existing row keeps its values (bitwise) and moves down by that many when it sat at or
    after ``position``. A parameter is replaced by a new one (an optimiser holding the old
    one must be rebuilt)."""
    old = getattr(module, name)
    rows = rows.to(dtype=old.dtype, device=old.device)
    table = torch.cat([old.detach()[:position], rows, old.detach()[position:]])
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(table, requires_grad=old.requires_grad))
    else:
        setattr(module, name, table)


class CategoricalInjection(nn.Module):
    r"""Adds :math:`\sum_k W_k[c_k]` for categorical codes ``c`` (shape ``(B, n_keys)``).

    Codes are absolute indices into the concatenation of all keys' categories. Covariates
    with a single category carry no information (their one-hot is absorbed by the bias)
    and get no weights.
    """

    def __init__(self, n_categories: int, n_out: int, fan_in: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_categories, n_out)) if n_categories else None
        if self.weight is not None:
            # the columns a one-hot input would have in the layer's Linear: uniform on
            # ±1/sqrt(fan in) (fan in: the layer's input width plus the categories). A much
            # smaller start (N(0, 0.01²), as before) lets a batch-conditioned decoder ignore
            # the batch early on, so z learns it instead: see docs/integration.md.
            self.bound = 1.0 / math.sqrt(fan_in if fan_in else n_categories)
            nn.init.uniform_(self.weight, -self.bound, self.bound)

    def add_categories(self, position: int, n: int) -> None:
        """Insert the columns of ``n`` new categories before row ``position`` of the table,
        initialised as at construction (uniform on ±1/sqrt(fan in)); the existing ones are
        unchanged (scArches' surgery of a one-hot input layer, for query mapping)."""
        rows = torch.empty(n, self.weight.shape[1]).uniform_(-self.bound, self.bound)
        insert_rows(self, "weight", position, rows)

    def forward(self, codes: torch.Tensor | None) -> torch.Tensor | float:
        if self.weight is None or codes is None or codes.shape[-1] == 0:
            return 0.0
        return F.embedding(codes, self.weight).sum(dim=1)


def make_norm(name: str, n_hidden: int) -> nn.Module:
    """The normalisation layer called ``name``: ``"layer"`` (LayerNorm without affine, the
    default: a cell's representation never depends on its minibatch) or ``"batch"``
    (BatchNorm1d with scvi-tools' momentum 0.01 and eps 1e-3, for ablations)."""
    if name == "layer":
        return nn.LayerNorm(n_hidden, elementwise_affine=False)
    if name == "batch":
        return nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3)
    raise ValueError(f"unknown normalisation {name!r}; choose 'layer' or 'batch'")


class FCLayers(nn.Module):
    """``n_layers`` blocks of ``Dropout -> Linear -> LayerNorm -> activation``.

    Parameters
    ----------
    n_in, n_hidden
        Input width and width of every hidden layer (the output width is ``n_hidden``).
    n_layers
        Number of blocks (at least 1).
    dropout_rate
        Dropout probability on the input of the first block (the features).
    n_categories
        Total number of categories of the injected categorical covariates (0 for none).
    activation
        Name of the activation.
    dropout_after_activation
        ``True``: dropout on each block's *output* (``Linear -> norm -> activation ->
        Dropout``, scvi-tools' order) instead of its input.
    norm
        ``"layer"`` or ``"batch"`` (see :func:`make_norm`).
    hidden_dropout_rate
        Dropout probability on the input of every further block (hidden units);
        ``None``: ``dropout_rate``. With ``dropout_after_activation`` the first block's
        output gets ``dropout_rate`` and the others' ``hidden_dropout_rate``.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        n_categories: int = 0,
        activation: str = "relu",
        dropout_after_activation: bool = False,
        norm: str = "layer",
        hidden_dropout_rate: float | None = None,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be at least 1")
        self.dropout_after_activation = dropout_after_activation
        hidden = dropout_rate if hidden_dropout_rate is None else hidden_dropout_rate
        rates = [dropout_rate] + [hidden] * (n_layers - 1)
        self.dropouts = nn.ModuleList(nn.Dropout(r) if r > 0 else nn.Identity() for r in rates)
        self.linears = nn.ModuleList(
            [InputLinear(n_in, n_hidden)]
            + [Linear(n_hidden, n_hidden) for _ in range(n_layers - 1)]
        )
        self.injections = nn.ModuleList(
            CategoricalInjection(
                n_categories, n_hidden, (n_in if i == 0 else n_hidden) + n_categories
            )
            for i in range(n_layers)
        )
        self.norms = nn.ModuleList(make_norm(norm, n_hidden) for _ in range(n_layers))
        self.activations = nn.ModuleList(make_activation(activation) for _ in range(n_layers))

    def forward(
        self,
        x: torch.Tensor | SparseCounts,
        cat_codes: torch.Tensor | None = None,
        continuous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` dense ``(B, n_in)`` or sparse; ``continuous`` ``(B, C)`` columns, if given, are
        appended to ``x`` (so ``n_in`` counts them)."""
        after = self.dropout_after_activation
        h = self._first_linear(x, continuous)
        for i, (inject, norm, act) in enumerate(
            zip(self.injections, self.norms, self.activations, strict=True)
        ):
            if i > 0:
                h = self.linears[i](h if after else self.dropouts[i](h))
            h = act(norm(h + inject(cat_codes)))
            if after:
                h = self.dropouts[i](h)
        return h

    def _first_linear(
        self, x: torch.Tensor | SparseCounts, continuous: torch.Tensor | None
    ) -> torch.Tensor:
        """The first layer's affine map of its dropped-out input. Sparse counts stay sparse
        on the CPU (:func:`sparse_input_linear`) and are densified on accelerators, where a
        dense GEMM is the fast path, and for tiny minibatches (see
        :data:`SPARSE_INPUT_MIN_ELEMENTS`)."""
        dropout = nn.Identity() if self.dropout_after_activation else self.dropouts[0]
        trailing = dropout(continuous) if continuous is not None and continuous.shape[-1] else None
        if isinstance(x, SparseCounts):
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            x = x.dropout(p, self.training)
            if x.device.type != "cpu" or x.n_cells * x.n_features < SPARSE_INPUT_MIN_ELEMENTS:
                x = x.to_dense()
        else:
            x = dropout(x)
        return self.linears[0](x, trailing)


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
        **layer_options,
    ):
        super().__init__()
        self.layers = FCLayers(
            n_in, n_hidden, n_layers, dropout_rate, n_categories, activation, **layer_options
        )
        self.mean_head = Linear(n_hidden, n_out)
        self.var_head = Linear(n_hidden, n_out)
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
        scale_activation: str = "softplus",
        **layer_options,
    ):
        super().__init__()
        if scale_activation not in ("softplus", "softmax"):
            raise ValueError(
                f"unknown scale_activation {scale_activation!r}; choose 'softplus' or 'softmax'"
            )
        self.layers = FCLayers(
            n_in, n_hidden, n_layers, dropout_rate, n_categories, activation, **layer_options
        )
        self.head = Linear(n_hidden, n_out)
        self.scale_activation = scale_activation
        if scale_activation == "softmax":
            # e^{m̄}, the reference library ρ is expressed in (set by CountModality)
            self.register_buffer("reference_library", torch.ones(()))

    def forward(self, z: torch.Tensor, cat_codes: torch.Tensor | None = None) -> torch.Tensor:
        h = self.head(self.layers(z, cat_codes))
        if self.scale_activation == "softmax":
            # ablation only (scVI's decoder): fractions summing to one, in units of the
            # reference library (CountModality keeps the library centred on it)
            return torch.softmax(h, dim=-1) * self.reference_library
        return F.softplus(h)

    def weight_l2(self) -> torch.Tensor:
        """Sum of squared weights of every Linear layer, of the injected ``nn_conditioning``
        columns of every layer and of the head (biases excluded). The published decoder
        concatenates the covariates' one-hot to each layer's input, so its L2 covers their
        weight columns, which :class:`CategoricalInjection` stores apart."""
        injected = (inj.weight for inj in self.layers.injections if inj.weight is not None)
        linears = (linear.weight for linear in self.layers.linears)
        return sum_of_squares(self.head.weight, *linears, *injected)


def sum_of_squares(*tensors: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_i\lVert t_i\rVert^2` over the entries of every tensor, as one autograd node
    (see :class:`_SumOfSquares`); on the reference path (``REGVI_REFERENCE=1``, see
    :mod:`regvi.fastpath`) the plain ``sum(t.square().sum())`` through autograd."""
    if fastpath.reference():
        return sum(t.square().sum() for t in tensors)
    return _SumOfSquares.apply(*tensors)


class _SumOfSquares(torch.autograd.Function):
    r"""Forward: one dot product a tensor. Backward: :math:`2g\,t_i`, one pass a tensor, from
    the tensors themselves (parameters, so nothing new is kept); ``pow(2).sum()`` keeps a
    squared copy of each and takes three passes over it, and
    :func:`~regvi.distributions.closed_form_scalar` would keep a :math:`2t_i` copy of each."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        flat = [t.reshape(-1) for t in tensors]
        total = torch.dot(flat[0], flat[0])
        for f in flat[1:]:
            total = total + torch.dot(f, f)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = 2.0 * grad
        return tuple(t * scale for t in ctx.saved_tensors)
