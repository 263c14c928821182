r"""Modality attribution: how much each decoder's output depends on each latent block (SPEC 4).

For a cell n with joint latent :math:`z_n` (posterior mean) and a decoder output
:math:`f_m(z) \in \mathbb R^{F_m}`, the score of latent block b is the Frobenius norm of the
Jacobian restricted to that block's columns,

.. math::
    A_{n,m,b} = \big\|\partial f_m(z_n) / \partial z_{n,b}\big\|_F
              = \Big(\sum_{k \in b}\sum_f (\partial f_{m,f} / \partial z_k)^2\Big)^{1/2}.

Column k of every cell's Jacobian is one forward-mode JVP with tangent :math:`e_k` (cells are
independent: no batch statistics in the networks), so a minibatch costs one decoder pass per
latent column and memory :math:`O(B\cdot F_m)`, independent of the latent size. The finite
difference option uses central differences :math:`(f(z+\epsilon e_k)-f(z-\epsilon e_k))/2\epsilon`.

Squared norms add over blocks, so the *share* of block b in decoder m,
:math:`A_{n,m,b}^2/\sum_{b'}A_{n,m,b'}^2`, is the fraction of the decoder's local sensitivity
that comes from block b.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch

METHODS = ("jvp", "finite_difference")
SCORE_PREFIX = "regvi_attr_"
SHARE_PREFIX = "regvi_attr_share_"


def block_jacobian_norms(
    f: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    blocks: Mapping[str, slice],
    method: str = "jvp",
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Per cell, the Frobenius norm of :math:`\\partial f(z)/\\partial z` over each block.

    ``f`` maps ``(B, K)`` to ``(B, F)`` row by row. Returns ``{block: (B,) tensor}``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    z = z.detach()
    out = {}
    for name, cols in blocks.items():
        energy = z.new_zeros(z.shape[0])
        for k in range(cols.start, cols.stop):
            direction = torch.zeros_like(z)
            direction[:, k] = 1.0
            if method == "jvp":
                _, column = torch.func.jvp(f, (z,), (direction,))
            else:
                column = (f(z + eps * direction) - f(z - eps * direction)) / (2.0 * eps)
            energy += column.detach().pow(2).sum(dim=-1)
        out[name] = energy.sqrt()
    return out


def attribution_table(
    scores: Mapping[tuple[str, str], np.ndarray], index: pd.Index
) -> pd.DataFrame:
    """Cells x (decoder, block) table of scores; columns a MultiIndex named
    ``("decoder", "block")``."""
    columns = pd.MultiIndex.from_tuples(list(scores), names=["decoder", "block"])
    return pd.DataFrame(np.column_stack(list(scores.values())), index=index, columns=columns)


def attribution_obs_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Flat obs columns from an attribution table: ``regvi_attr_<decoder>_z_<block>`` (norms)
    and ``regvi_attr_share_<decoder>_z_<block>`` (each block's share of the decoder's squared
    Frobenius norm; NaN where the decoder's Jacobian is zero)."""
    cols = {}
    for decoder in table.columns.get_level_values("decoder").unique():
        norms = table[decoder]
        energy = (norms**2).sum(axis=1).replace(0.0, np.nan)
        for block in norms.columns:
            cols[f"{SCORE_PREFIX}{decoder}_z_{block}"] = norms[block].to_numpy()
            cols[f"{SHARE_PREFIX}{decoder}_z_{block}"] = (norms[block] ** 2 / energy).to_numpy()
    return pd.DataFrame(cols, index=table.index)
