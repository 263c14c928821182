"""Figures saved as PNG files: training curves and 2-D embeddings.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas directly,
so pyplot's global state (current figure, backend) is never touched; the functions are safe
to call from notebooks and threads. Every file is written atomically: the PNG goes to a hidden
temporary file in the target directory first, which is then renamed onto the final name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from regvi import metrics
from regvi.errors import DataError
from regvi.outputs import atomic_write

__all__ = [
    "plot_loss_curves",
    "compute_umap",
    "plot_embedding",
    "plot_attribution_scatter",
    "plot_posterior_predictive_check",
    "plot_volcano",
    "plot_marker_dots",
    "log_pearson",
]

_SPLITS = ("train", "validation")
_MAX_LEGEND_CATEGORIES = 30
_MAX_INTEGER_CATEGORIES = 30  # integer obs columns with at most this many values are categorical
_DPI = 120
_MISSING_COLOR = "#d3d3d3"


def _save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (see :func:`regvi.outputs.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    return atomic_write(
        path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    )


def _grid(n_panels: int, max_cols: int) -> tuple[int, int]:
    n_cols = max(1, min(max_cols, n_panels))
    return math.ceil(n_panels / n_cols), n_cols


def _history_terms(history: pd.DataFrame) -> list[tuple[str, dict[str, str]]]:
    """Group the columns of a history table into terms: ``[(term, {label: column})]``."""
    terms: dict[str, dict[str, str]] = {}
    for column in history.columns:
        name = str(column)
        if name == "epoch" or not pd.api.types.is_numeric_dtype(history[column]):
            continue
        if pd.api.types.is_bool_dtype(history[column]):
            continue
        for split in _SPLITS:
            suffix = "_" + split
            if name.endswith(suffix) and len(name) > len(suffix):
                terms.setdefault(name[: -len(suffix)], {})[split] = column
                break
        else:
            terms.setdefault(name, {})[name] = column
    ordered = sorted(terms.items(), key=lambda item: item[0] != "loss")  # stable: loss first
    return ordered


def plot_loss_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Plot training curves, one panel per term, and save them as a PNG.

    Parameters
    ----------
    history
        One row per epoch: a column ``epoch`` (the row position is used if it is absent) and
        numeric columns named ``<term>_train`` / ``<term>_validation`` (e.g. ``loss_train``,
        ``kl_z_validation``); columns without either suffix (e.g. ``kl_weight``) get a panel of
        their own. Missing columns and NaN values (e.g. epochs without validation) are allowed;
        terms with no finite value are left out.
    path
        Output PNG file; its directory is created if needed.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if not isinstance(history, pd.DataFrame):
        raise TypeError(f"history must be a pandas DataFrame, got {type(history).__name__}")
    if "epoch" in history.columns:
        epoch = pd.to_numeric(history["epoch"], errors="coerce").to_numpy(dtype=float)
    else:
        epoch = np.arange(len(history), dtype=float)

    panels = []
    for term, columns in _history_terms(history):
        lines = []
        for label, column in columns.items():
            values = history[column].to_numpy(dtype=float)
            keep = np.isfinite(values) & np.isfinite(epoch)
            if keep.any():
                lines.append((label, epoch[keep], values[keep]))
        if lines:
            panels.append((term, lines))

    if not panels:
        fig = Figure(figsize=(4.0, 3.0), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no finite training history", ha="center", va="center")
        ax.set_axis_off()
        return _save_figure(fig, path)

    n_rows, n_cols = _grid(len(panels), 3)
    fig = Figure(figsize=(4.0 * n_cols, 3.0 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    styles = {"train": {"color": "C0"}, "validation": {"color": "C1"}}
    for ax, (term, lines) in zip(axes, panels, strict=False):
        for label, x, y in lines:
            style = styles.get(label, {"color": "C2"})
            marker = "o" if x.size <= 30 else None
            ax.plot(x, y, label=label, marker=marker, markersize=3, linewidth=1.2, **style)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    return _save_figure(fig, path)


def compute_umap(
    adata: anndata.AnnData,
    use_rep: str = "X_regvi",
    n_neighbors: int = 15,
    seed: int = 0,
    key_added: str = "X_umap",
) -> np.ndarray:
    """Compute a 2-D UMAP of ``adata.obsm[use_rep]`` and store it in ``adata.obsm[key_added]``.

    The neighbour graph is built (with scanpy) on a private copy that holds only the
    representation, so ``adata`` gains nothing but ``obsm[key_added]``: its ``X``, ``obsp`` and
    ``uns`` are left unchanged.

    Parameters
    ----------
    adata
        Data with the representation in ``obsm``.
    use_rep
        Key of the representation in ``adata.obsm``.
    n_neighbors
        Number of neighbours of the kNN graph (reduced to ``n_obs - 1`` for tiny data).
    seed
        Random state of the UMAP optimisation (results are reproducible for a seed).
    key_added
        Key under which the embedding is stored in ``adata.obsm``.

    Returns
    -------
    numpy.ndarray
        The embedding, float32, shape ``(n_obs, 2)``.
    """
    import scanpy as sc  # imported lazily: it is slow to import

    if use_rep not in adata.obsm:
        available = ", ".join(map(str, adata.obsm.keys())) or "none"
        raise DataError(
            f"compute_umap: obsm has no representation {use_rep!r} (available: {available})"
        )
    rep = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if rep.ndim != 2 or rep.shape[0] != adata.n_obs:
        raise DataError(f"compute_umap: obsm[{use_rep!r}] must be 2-D, got shape {rep.shape}")
    if not np.isfinite(rep).all():
        raise DataError(f"compute_umap: obsm[{use_rep!r}] contains NaN or infinite values")
    if adata.n_obs < 3:
        raise DataError(f"compute_umap: needs at least 3 cells, got {adata.n_obs}")
    if (
        isinstance(n_neighbors, bool)
        or not isinstance(n_neighbors, numbers.Integral)
        or n_neighbors < 2
    ):
        raise DataError(f"compute_umap: n_neighbors must be an integer >= 2, got {n_neighbors!r}")

    # scanpy's n_neighbors counts the cell itself; the graph is built here (exact kNN up to
    # metrics.APPROX_KNN_ABOVE cells) rather than by sc.pp.neighbors, whose umap-learn
    # kernels are numba-compiled again in every process (see umap_connectivities)
    n_neighbors = int(min(n_neighbors, adata.n_obs - 1))
    graph = metrics.knn_graph(rep, n_neighbors - 1, seed=seed)
    work = anndata.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str)))
    work.obsm["rep"] = rep
    work.obsp["connectivities"] = metrics.umap_connectivities(graph)
    work.uns["neighbors"] = {
        "connectivities_key": "connectivities",
        "params": {
            "n_neighbors": n_neighbors,
            "method": "umap",
            "metric": "euclidean",
            "use_rep": "rep",
            "random_state": seed,
        },
    }
    sc.tl.umap(work, random_state=seed)
    embedding = np.asarray(work.obsm["X_umap"], dtype=np.float32)
    adata.obsm[key_added] = embedding
    return embedding


def _is_categorical(values: pd.Series) -> bool:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return True
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return True
    if pd.api.types.is_integer_dtype(values):
        return values.nunique(dropna=True) <= _MAX_INTEGER_CATEGORIES
    return False


def _category_colors(adata: anndata.AnnData, key: str, n: int) -> list:
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) == n:
        try:
            return [to_rgba(c) for c in stored]
        except ValueError:
            pass
    return _palette(n)


def _palette(n: int) -> list:
    """``n`` distinct colours (tab10 / tab20 / tab20b-c, then a rainbow)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    pool = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    if n <= len(pool):
        return pool[:n]
    return [colormaps["gist_rainbow"](i / n) for i in range(n)]


def _legend_handle(color: str, label: str) -> Line2D:
    return Line2D([], [], marker="o", linestyle="", color=color, markersize=6, label=label)


def plot_embedding(
    adata: anndata.AnnData,
    color_keys: Sequence[str],
    path: str | Path,
    basis: str = "X_umap",
    title_prefix: str = "",
) -> Path:
    """Scatter-plot a 2-D embedding coloured by ``obs`` columns, one panel per key.

    Categorical keys (categorical, string or boolean columns, and integer columns with at most
    30 distinct values) get discrete colours (``uns["<key>_colors"]`` when present) and a legend
    outside the axes for up to 30 categories; numeric keys get a colormap and a colorbar.
    Missing values are drawn in light grey. Points are drawn in a fixed random order so no
    category systematically hides another.

    Parameters
    ----------
    adata
        Data with the embedding in ``obsm[basis]`` (first two columns are used).
    color_keys
        ``obs`` columns to colour by; a single string is accepted as one key.
    path
        Output PNG file; its directory is created if needed.
    basis
        Key of the embedding in ``adata.obsm``.
    title_prefix
        Text put in front of each panel title.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if basis not in adata.obsm:
        available = ", ".join(map(str, adata.obsm.keys())) or "none"
        raise DataError(f"plot_embedding: obsm has no embedding {basis!r} (available: {available})")
    coords = np.asarray(adata.obsm[basis], dtype=float)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise DataError(
            f"plot_embedding: obsm[{basis!r}] must have at least 2 columns, got shape "
            f"{coords.shape}"
        )
    keys = [color_keys] if isinstance(color_keys, str) else list(color_keys)
    if not keys:
        raise DataError("plot_embedding: color_keys is empty")
    missing = [k for k in keys if k not in adata.obs.columns]
    if missing:
        raise DataError(
            f"plot_embedding: obs has no column(s) {', '.join(map(repr, missing))} "
            f"(available: {', '.join(map(str, adata.obs.columns)) or 'none'})"
        )

    n_obs = adata.n_obs
    x, y = coords[:, 0], coords[:, 1]
    size = float(np.clip(30_000 / max(n_obs, 1), 0.3, 20.0))
    order = np.random.default_rng(0).permutation(n_obs)
    label = basis.removeprefix("X_").upper()

    n_rows, n_cols = _grid(len(keys), 2)
    fig = Figure(figsize=(6.0 * n_cols, 4.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        values = adata.obs[key]
        title = f"{title_prefix}{key}"
        if _is_categorical(values):
            cat = values.astype("category")
            categories = list(cat.cat.categories)
            codes = cat.cat.codes.to_numpy()
            colors = np.array(
                _category_colors(adata, key, len(categories)) + [to_rgba(_MISSING_COLOR)]
            )
            point_colors = colors[np.where(codes < 0, len(categories), codes)]
            ax.scatter(x[order], y[order], c=point_colors[order], s=size, linewidths=0)
            if len(categories) <= _MAX_LEGEND_CATEGORIES:
                handles = [
                    _legend_handle(to_hex(colors[i]), str(c)) for i, c in enumerate(categories)
                ]
                if (codes < 0).any():
                    handles.append(_legend_handle(_MISSING_COLOR, "NA"))
                ax.legend(
                    handles=handles,
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    frameon=False,
                    fontsize=8,
                    ncol=1 if len(handles) <= 15 else 2,
                )
            else:
                title += f" ({len(categories)} categories)"
        else:
            numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            finite = np.isfinite(numeric)
            if (~finite).any():
                ax.scatter(x[~finite], y[~finite], c=_MISSING_COLOR, s=size, linewidths=0)
            keep = order[finite[order]]
            points = ax.scatter(
                x[keep], y[keep], c=numeric[keep], cmap="viridis", s=size, linewidths=0
            )
            if keep.size:
                fig.colorbar(points, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{label}1", fontsize=8)
        ax.set_ylabel(f"{label}2", fontsize=8)
    for ax in axes[len(keys) :]:
        ax.set_axis_off()
    return _save_figure(fig, path)


def plot_attribution_scatter(
    adata: anndata.AnnData,
    path: str | Path,
    basis: str = "X_umap",
    block: str | None = None,
    prefix: str = "regvi_attr_share_",
) -> Path:
    """Scatter-plot an embedding coloured by each decoder's attribution share of one block.

    One panel per decoder ``d``, coloured by ``obs[f"{prefix}{d}_z_{block}"]`` — the share of
    the decoder's squared Jacobian norm coming from latent block ``block`` (see
    :mod:`regvi.attribution`): with RNA and ATAC, red = the decoder follows z_rna, blue =
    z_atac. ``block`` defaults to ``"rna"`` when present, else the first block found.
    """
    if basis not in adata.obsm:
        available = ", ".join(map(str, adata.obsm.keys())) or "none"
        raise DataError(
            f"plot_attribution_scatter: obsm has no embedding {basis!r} (available: {available})"
        )
    columns = [str(c) for c in adata.obs.columns if str(c).startswith(prefix)]
    pairs = [c[len(prefix) :].split("_z_", 1) for c in columns if "_z_" in c]
    blocks = sorted({b for _, b in pairs})
    if not blocks:
        raise DataError(f"plot_attribution_scatter: obs has no {prefix}<decoder>_z_<block> column")
    if block is None:
        block = "rna" if "rna" in blocks else blocks[0]
    decoders = sorted({d for d, b in pairs if b == block})
    if not decoders:
        raise DataError(f"plot_attribution_scatter: no attribution column for block {block!r}")
    coords = np.asarray(adata.obsm[basis], dtype=float)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    size = float(np.clip(30_000 / max(adata.n_obs, 1), 0.3, 20.0))
    n_rows, n_cols = _grid(len(decoders), 3)
    fig = Figure(figsize=(5.2 * n_cols, 4.4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, decoder in zip(axes, decoders, strict=False):
        share = adata.obs[f"{prefix}{decoder}_z_{block}"].to_numpy(dtype=float)[order]
        points = ax.scatter(
            coords[order, 0],
            coords[order, 1],
            c=np.nan_to_num(share, nan=0.5),
            cmap="RdBu_r",
            vmin=0.0,
            vmax=1.0,
            s=size,
            linewidths=0,
        )
        fig.colorbar(points, ax=ax, shrink=0.8, label=f"share of z_{block}")
        ax.set_title(f"{decoder} decoder: attribution to z_{block}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(decoders) :]:
        ax.set_axis_off()
    return _save_figure(fig, path)


#: At most this many points per panel of the posterior predictive check (a random subset).
_PPC_MAX_POINTS = 50_000


def log_pearson(observed: np.ndarray, predicted: np.ndarray, offset: float = 1e-3) -> float:
    """Pearson correlation of :math:`\\log(a + c)` and :math:`\\log(b + c)` (NaN when either
    side is constant)."""
    a = np.log(np.asarray(observed, dtype=float) + offset)
    b = np.log(np.asarray(predicted, dtype=float) + offset)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def plot_posterior_predictive_check(table: pd.DataFrame, path: str | Path) -> Path:
    """Observed against posterior-predictive per-feature statistics, one row of panels per
    modality (mean, variance, zero fraction), one point per (library, feature) coloured by
    library, with the identity line; each panel's title gives the Pearson correlation (log
    scale for mean and variance). ``table`` is
    :meth:`~regvi.model.posterior.PosteriorMixin.posterior_predictive_check`'s.
    """
    required = {"modality", "library", "statistic", "observed", "predicted"}
    missing = sorted(required - set(table.columns))
    if missing:
        raise DataError(f"plot_posterior_predictive_check: table lacks {', '.join(missing)}")
    modalities = list(dict.fromkeys(table["modality"]))
    statistics = ("mean", "variance", "zero_fraction")
    libraries = list(dict.fromkeys(table["library"].astype(str)))
    colors = dict(zip(libraries, _palette(len(libraries)), strict=True))
    fig = Figure(figsize=(4.2 * 3 + 1.6, 3.8 * max(len(modalities), 1)), layout="constrained")
    axes = fig.subplots(max(len(modalities), 1), 3, squeeze=False)
    rng = np.random.default_rng(0)
    for row, modality in zip(axes, modalities, strict=False):
        for ax, stat in zip(row, statistics, strict=True):
            part = table[(table["modality"] == modality) & (table["statistic"] == stat)]
            if len(part) > _PPC_MAX_POINTS:
                part = part.iloc[rng.choice(len(part), _PPC_MAX_POINTS, replace=False)]
            obs = part["observed"].to_numpy(dtype=float)
            pred = part["predicted"].to_numpy(dtype=float)
            logged = stat != "zero_fraction"
            shown_obs, shown_pred = (obs + 1e-3, pred + 1e-3) if logged else (obs, pred)
            order = rng.permutation(len(part))
            ax.scatter(
                shown_obs[order],
                shown_pred[order],
                c=[colors[str(v)] for v in part["library"].to_numpy()[order]],
                s=4,
                alpha=0.6,
                linewidths=0,
            )
            if len(part):
                lo = min(shown_obs.min(), shown_pred.min())
                hi = max(shown_obs.max(), shown_pred.max())
                ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--")
            if logged:
                ax.set_xscale("log")
                ax.set_yscale("log")
                r = log_pearson(obs, pred)
            else:
                r = float(np.corrcoef(obs, pred)[0, 1]) if len(part) > 1 else float("nan")
            label = stat.replace("_", " ")
            ax.set_title(
                f"{modality}: {label} (r{' log' if logged else ''} = {r:.3f})", fontsize=10
            )
            ax.set_xlabel(f"observed {label}", fontsize=8)
            ax.set_ylabel(f"predicted {label}", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(True, alpha=0.3)
    if 1 < len(libraries) <= _MAX_LEGEND_CATEGORIES:
        handles = [_legend_handle(to_hex(colors[lib]), lib) for lib in libraries]
        axes[0, -1].legend(
            handles=handles, title="library", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1)
        )
    return _save_figure(fig, path)


def plot_volcano(
    table: pd.DataFrame, path: str | Path, fdr_column: str, max_panels: int = 24
) -> Path:
    """Volcano plots of a differential-expression table: mean log2 fold change against
    ``proba_de``, one panel per (modality, group) (at most ``max_panels``), features called
    DE at the target FDR (``fdr_column``) in red, the five most probable labelled."""
    keys = ["modality", "group"] if "modality" in table.columns else ["group"]
    panels = list(table.groupby(keys, sort=False, observed=True))[:max_panels]
    n_rows, n_cols = _grid(max(len(panels), 1), 4)
    fig = Figure(figsize=(4.0 * n_cols, 3.4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (key, part) in zip(axes, panels, strict=False):
        called = part[fdr_column].to_numpy(dtype=bool)
        lfc = part["lfc_mean"].to_numpy(dtype=float)
        proba = part["proba_de"].to_numpy(dtype=float)
        ax.scatter(lfc[~called], proba[~called], s=5, color="#7f7f7f", linewidths=0)
        ax.scatter(lfc[called], proba[called], s=7, color="#d62728", linewidths=0)
        for name, row in part.nlargest(5, "proba_de").iterrows():
            ax.annotate(str(name), (row["lfc_mean"], row["proba_de"]), fontsize=6)
        title = " / ".join(map(str, key if isinstance(key, tuple) else (key,)))
        ax.set_title(f"{title} vs {part['group2'].iloc[0]} ({int(called.sum())} DE)", fontsize=9)
        ax.set_xlabel("mean log2 fold change", fontsize=8)
        ax.set_ylabel("proba_de", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    return _save_figure(fig, path)


def plot_marker_dots(table: pd.DataFrame, path: str | Path, n_top: int = 5) -> Path:
    """Dot plot of each group's top markers from a one-vs-rest differential-expression table:
    the ``n_top`` features with the highest ``proba_de`` among those up in the group
    (``lfc_mean > 0``) per group; columns are features, rows groups; dot size = the fraction
    of the group's cells with a non-zero count (``non_zeros_proportion1``), colour = the
    group's mean expression fraction (``scale1``) scaled to [0, 1] per feature."""
    groups = list(dict.fromkeys(table["group"].astype(str)))
    table = table.rename_axis(None).assign(
        group=table["group"].astype(str), feature=table.index.astype(str)
    )
    if "modality" in table.columns:
        table = table.assign(feature=table["modality"].astype(str) + ":" + table["feature"])
    features: list[str] = []
    for g in groups:
        up = table[(table["group"] == g) & (table["lfc_mean"] > 0)]
        top = up.sort_values(["proba_de", "lfc_mean"], ascending=False).head(n_top)
        features += [f for f in top["feature"] if f not in features]
    fig = Figure(
        figsize=(max(4.0, 0.35 * len(features) + 2.5), max(2.5, 0.35 * len(groups) + 1.8)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    if not features:
        ax.text(0.5, 0.5, "no feature up in any group", ha="center", va="center")
        ax.set_axis_off()
        return _save_figure(fig, path)
    wide = table[table["feature"].isin(features)]
    scale = wide.pivot_table(index="group", columns="feature", values="scale1").reindex(
        index=groups, columns=features
    )
    frac = wide.pivot_table(
        index="group", columns="feature", values="non_zeros_proportion1"
    ).reindex(index=groups, columns=features)
    values = scale.to_numpy(dtype=float)
    lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    yy, xx = np.meshgrid(np.arange(len(groups)), np.arange(len(features)), indexing="ij")
    points = ax.scatter(
        xx.ravel(),
        yy.ravel(),
        s=20 + 180 * np.nan_to_num(frac.to_numpy(dtype=float)).ravel(),
        c=np.nan_to_num(scaled).ravel(),
        cmap="Reds",
        vmin=0,
        vmax=1,
        edgecolors="#555555",
        linewidths=0.3,
    )
    fig.colorbar(points, ax=ax, shrink=0.6, label="mean expression (scaled)")
    ax.set_xticks(np.arange(len(features)), features, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(groups)), groups, fontsize=8)
    ax.set_xlim(-0.7, len(features) - 0.3)
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set_title(
        f"top {n_top} markers per group (dot size: fraction of cells detected)", fontsize=9
    )
    return _save_figure(fig, path)
