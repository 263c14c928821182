"""Integration metrics on an embedding: batch mixing, biological conservation, graph
connectivity, and the neighbourhood marker-correlation metric of the purpose keys.

Pure numpy / scipy / scikit-learn, CPU only, written to run on hundreds of thousands of cells:

* kNN graphs come from :class:`sklearn.neighbors.NearestNeighbors` (exact), or from
  pynndescent (approximate) above :data:`APPROX_KNN_ABOVE` cells when it is installed;
* per-cell kNN scores (iLISI, cLISI, batch entropy) are computed for at most
  ``max_queries`` query cells (a random subsample) whose neighbours are searched among *all*
  cells;
* silhouette-based scores are quadratic in the number of cells and are computed on a random
  subsample of at most ``silhouette_max_cells`` cells (20,000 by default);
* clustering for NMI/ARI uses k-means with k = the number of labels (leiden would need igraph
  and leidenalg, which regvi does not depend on), MiniBatchKMeans above 100,000 cells.

Every subsampling that happened is reported in the ``note`` column of
:func:`integration_metrics`'s table. All scores lie in [0, 1], higher is better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from regvi.errors import DataError

__all__ = [
    "KnnGraph",
    "knn_graph",
    "umap_connectivities",
    "batch_entropy",
    "lisi",
    "ilisi",
    "clisi",
    "silhouette_label",
    "silhouette_batch",
    "clustering_nmi_ari",
    "isolated_label_silhouette",
    "graph_connectivity",
    "integration_metrics",
    "neighbourhood_correlation",
    "summarise_neighbourhood_correlation",
    "log_normalise",
]

APPROX_KNN_ABOVE = 100_000
SILHOUETTE_MAX_CELLS = 20_000
MAX_QUERIES = 50_000
KMEANS_MINIBATCH_ABOVE = 100_000


# --------------------------------------------------------------------------- kNN
@dataclass
class KnnGraph:
    """Neighbours of ``queries`` (row ``i`` of ``indices`` belongs to cell ``queries[i]``),
    self excluded, sorted by distance; indices refer to all ``n_cells`` cells."""

    indices: np.ndarray  # (n_queries, k) int64
    distances: np.ndarray  # (n_queries, k) float64
    queries: np.ndarray  # (n_queries,) int64
    n_cells: int

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def first(self, k: int) -> KnnGraph:
        """The same graph with only the ``k`` nearest neighbours."""
        return KnnGraph(self.indices[:, :k], self.distances[:, :k], self.queries, self.n_cells)


def _as_embedding(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise DataError(f"an embedding must be 2-D (cells x dimensions), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise DataError("the embedding contains NaN or infinite values")
    return X


def knn_graph(
    X: np.ndarray,
    k: int = 15,
    queries: np.ndarray | None = None,
    approximate: bool | None = None,
    seed: int = 0,
) -> KnnGraph:
    """The ``k`` nearest neighbours (Euclidean, self excluded) of each query cell among all
    cells of ``X``. ``approximate=None`` uses pynndescent above :data:`APPROX_KNN_ABOVE`
    cells when it is installed, exact search otherwise."""
    X = _as_embedding(X)
    n = X.shape[0]
    if n < 2:
        raise DataError(f"a kNN graph needs at least 2 cells, got {n}")
    k = int(min(k, n - 1))
    queries = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    if approximate is None:
        approximate = n > APPROX_KNN_ABOVE
    if approximate:
        try:
            from pynndescent import NNDescent
        except ImportError:
            approximate = False
    if approximate:
        index = NNDescent(X, n_neighbors=k + 1, random_state=seed, n_jobs=-1)
        idx, dist = index.query(X[queries], k=k + 1)
    else:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k + 1, n_jobs=-1).fit(X)
        dist, idx = nn.kneighbors(X[queries])
    idx, dist = _drop_self(idx.astype(np.int64), dist.astype(np.float64), queries, k)
    return KnnGraph(idx, dist, queries, n)


def _nearest(
    reference: np.ndarray, query: np.ndarray, k: int, approximate: bool | None, seed: int
) -> np.ndarray:
    """Indices ``(n_query, k)`` of the ``k`` nearest reference cells of each query cell
    (Euclidean, nearest first), as :func:`knn_graph` searches."""
    if approximate is None:
        approximate = reference.shape[0] > APPROX_KNN_ABOVE
    if approximate:
        try:
            from pynndescent import NNDescent
        except ImportError:
            approximate = False
    if approximate:
        index = NNDescent(reference, n_neighbors=max(k, 15), random_state=seed, n_jobs=-1)
        return index.query(query, k=k)[0].astype(np.int64)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, n_jobs=-1).fit(reference)
    return nn.kneighbors(query, return_distance=False).astype(np.int64)


def knn_label_transfer(
    reference: np.ndarray,
    labels: Sequence | np.ndarray | pd.Series,
    query: np.ndarray,
    k: int = 15,
    approximate: bool | None = None,
    seed: int = 0,
    chunk_cells: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Labels of ``query`` cells by majority vote of their ``k`` nearest ``reference``
    cells in a shared embedding (reference cells without a label are left out).

    For query cell :math:`q` with neighbours :math:`N_k(q)`, the predicted label is
    :math:`\hat y_q = \arg\max_c n_c(q)`, :math:`n_c(q) = |\{r \in N_k(q): y_r = c\}|`
    (a tie goes to the label of the nearest neighbour when it is among the tied), and the
    uncertainty is :math:`1 - n_{\hat y_q}(q)/k`: 0 when every neighbour agrees, near
    :math:`1 - 1/C` for an even split over C labels. Returns ``(predicted, uncertainty)``,
    an object array of label strings and a float array; computed ``chunk_cells`` query
    cells at a time.
    """
    reference, query = _as_embedding(reference), _as_embedding(query)
    values = pd.Series(np.asarray(labels, dtype=object))
    if len(values) != reference.shape[0]:
        raise DataError(
            f"knn_label_transfer: {len(values)} labels for {reference.shape[0]} reference cells"
        )
    if reference.shape[1] != query.shape[1]:
        raise DataError(
            f"knn_label_transfer: the reference has {reference.shape[1]} dimensions, the query "
            f"{query.shape[1]}"
        )
    known = values.notna().to_numpy()
    if not known.any():
        raise DataError("knn_label_transfer: no reference cell has a label")
    codes, categories = pd.factorize(values[known].astype(str))
    reference = reference[known]
    k = int(min(k, reference.shape[0]))
    if k < 1:
        raise DataError(f"knn_label_transfer: k must be at least 1, got {k}")
    predicted = np.empty(query.shape[0], dtype=np.int64)
    uncertainty = np.empty(query.shape[0], dtype=np.float64)
    for start in range(0, query.shape[0], chunk_cells):
        neighbours = codes[
            _nearest(reference, query[start : start + chunk_cells], k, approximate, seed)
        ]
        votes = np.zeros((neighbours.shape[0], len(categories)))
        np.add.at(votes, (np.arange(neighbours.shape[0])[:, None], neighbours), 1.0)
        winner = (votes + 0.5 * (np.arange(len(categories)) == neighbours[:, :1])).argmax(axis=1)
        predicted[start : start + len(winner)] = winner
        uncertainty[start : start + len(winner)] = 1.0 - votes[np.arange(len(winner)), winner] / k
    return np.asarray(categories, dtype=object)[predicted], uncertainty


def _drop_self(
    idx: np.ndarray, dist: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query from its own neighbour list (or the farthest neighbour when the
    query is absent, e.g. with duplicated points), keeping ``k`` columns."""
    is_self = idx == queries[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    # a row may list itself twice only with duplicate points; keep the first occurrence
    first = is_self & (np.cumsum(is_self, axis=1) == 1)
    keep = ~first
    out_idx = idx[keep].reshape(idx.shape[0], -1)[:, :k]
    out_dist = dist[keep].reshape(idx.shape[0], -1)[:, :k]
    return out_idx, out_dist


def umap_connectivities(graph: KnnGraph) -> sp.csr_matrix:
    r"""UMAP's fuzzy neighbourhood graph (McInnes et al., 2018) of a kNN graph of all cells:
    what scanpy's ``pp.neighbors`` stores as ``obsp["connectivities"]`` (``method="umap"``,
    local connectivity 1, fuzzy union), for :func:`scanpy.tl.umap`.

    For cell :math:`i` with neighbour distances :math:`d_{ij}`: :math:`\rho_i` is the distance
    to its nearest neighbour at a positive distance, and :math:`\sigma_i` solves

    .. math:: \sum_j \exp\!\big(-\max(0, d_{ij} - \rho_i) / \sigma_i\big) = \log_2(k + 1)

    by bisection (64 steps, tolerance :math:`10^{-5}`; :math:`k + 1` counts the cell itself, as
    UMAP does), floored at :math:`10^{-3}` times the cell's mean distance (the mean over all
    cells where :math:`\rho_i = 0`). The directed weights
    :math:`w_{ij} = \exp(-\max(0, d_{ij} - \rho_i)/\sigma_i)` are combined by fuzzy union,
    :math:`P = W + W^\top - W \circ W^\top`.

    The same graph as umap-learn's (float32 arithmetic as there), computed with vectorised
    numpy: umap-learn's kernels are numba functions compiled again in every process, which
    took most of a default run's figure time (see ``docs/performance.md``).
    """
    n, k = graph.n_cells, graph.k
    if graph.indices.shape[0] != n or not np.array_equal(graph.queries, np.arange(n)):
        raise DataError("UMAP connectivities need the kNN graph of every cell")
    distances = graph.distances.astype(np.float32)
    # UMAP counts the cell itself (distance 0) among its k + 1 neighbours: in the means too
    positive = distances > 0
    has_positive = positive.any(axis=1)
    rho = np.where(has_positive, distances[np.arange(n), positive.argmax(axis=1)], 0)
    rho = rho.astype(np.float32)
    excess32 = distances - rho[:, None]
    excess = excess32.astype(np.float64)  # the bisection's sums in float64, as in umap-learn
    target = np.log2(k + 1)

    def mass_below_target(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mass = np.where(excess > 0, np.exp(-excess / sigma[:, None]), 1.0).sum(axis=1)
        return mass <= target, np.abs(mass - target) < 1e-5

    sigma = _bisect_rows(mass_below_target, n, 64).astype(np.float32)
    mean_distance = distances.sum(axis=1) / np.float32(k + 1)
    floor = np.where(rho > 0, mean_distance, distances.sum() / np.float32(n * (k + 1)))
    sigma = np.maximum(sigma, np.float32(1e-3) * floor.astype(np.float32))

    weights = np.where(
        (excess32 <= 0) | (sigma[:, None] == 0), np.float32(1), np.exp(-excess32 / sigma[:, None])
    ).astype(np.float32)
    rows = np.repeat(np.arange(n), k)
    directed = sp.csr_matrix((weights.ravel(), (rows, graph.indices.ravel())), shape=(n, n))
    directed.eliminate_zeros()
    transpose = directed.T.tocsr()
    union = (directed + transpose - directed.multiply(transpose)).tocsr()
    union.eliminate_zeros()
    return union


def _codes(values: Sequence | np.ndarray | pd.Series, name: str) -> tuple[np.ndarray, int]:
    series = pd.Series(np.asarray(values)).astype("object")
    if series.isna().any():
        raise DataError(f"{name} has missing values")
    cat = pd.Categorical(series.astype(str))
    return cat.codes.astype(np.int64), len(cat.categories)


# --------------------------------------------------------------------------- batch mixing
def batch_entropy(graph: KnnGraph, batch: Sequence | np.ndarray) -> float:
    r"""Mean normalised entropy of the batches among each cell's neighbours.

    For query cell :math:`i` with neighbour batch frequencies :math:`p_{ib}` over its
    :math:`k` neighbours, :math:`H_i = -\sum_b p_{ib}\log p_{ib} / \log B`, with :math:`B`
    the number of batches. Returns :math:`\frac{1}{n}\sum_i H_i \in [0, 1]`: 1 when every
    neighbourhood holds all batches equally, 0 when every neighbourhood is one batch.
    NaN with fewer than two batches.
    """
    codes, n_batches = _codes(batch, "batch")
    if n_batches < 2:
        return float("nan")
    counts = _neighbour_counts(codes[graph.indices], n_batches)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(np.mean(h / np.log(n_batches)))


def _neighbour_counts(neighbour_codes: np.ndarray, n_categories: int) -> np.ndarray:
    """``(n_queries, n_categories)`` counts of each category among the neighbours."""
    n_q = neighbour_codes.shape[0]
    flat = neighbour_codes + (np.arange(n_q)[:, None] * n_categories)
    return np.bincount(flat.ravel(), minlength=n_q * n_categories).reshape(n_q, n_categories)


def _bisect_rows(
    grow: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
    n_rows: int,
    n_iter: int,
) -> np.ndarray:
    """Vectorised per-row bisection for a positive scale ``x`` (one per row), started at 1.

    ``grow(x)`` returns which rows need a larger ``x`` and which have converged (or ``None``:
    run all ``n_iter`` steps). A row doubles ``x`` until it first overshoots, then halves its
    bracket; converged rows keep their ``x``."""
    x = np.ones(n_rows)
    lo = np.zeros(n_rows)
    hi = np.full(n_rows, np.inf)
    active = np.ones(n_rows, dtype=bool)
    for _ in range(n_iter):
        larger, done = grow(x)
        if done is not None:
            active &= ~done
            if not active.any():
                break
        lo = np.where(active & larger, x, lo)
        hi = np.where(active & ~larger, x, hi)
        x = np.where(active, np.where(np.isinf(hi), x * 2.0, (lo + hi) / 2.0), x)
    return x


def _perplexity_weights(distances: np.ndarray, perplexity: float, n_iter: int = 50) -> np.ndarray:
    """Gaussian kernel weights per row, with the precision of each row calibrated by
    bisection so the entropy of the weights equals ``log(perplexity)`` (as in Harmony's
    LISI). Vectorised over rows."""
    d = distances - distances[:, :1]  # shift invariant; avoids underflow
    target = np.log(min(perplexity, d.shape[1]))

    def entropy_too_high(beta: np.ndarray) -> tuple[np.ndarray, None]:
        P = np.exp(-d * beta[:, None])
        sum_p = P.sum(axis=1)
        H = np.log(sum_p) + beta * (d * P).sum(axis=1) / sum_p
        return H > target, None  # too flat -> sharpen (raise beta)

    beta = _bisect_rows(entropy_too_high, d.shape[0], n_iter)
    P = np.exp(-d * beta[:, None])
    return P / P.sum(axis=1, keepdims=True)


def lisi(graph: KnnGraph, values: Sequence | np.ndarray, perplexity: float = 30.0) -> np.ndarray:
    r"""Per-cell Local Inverse Simpson's Index of a categorical variable.

    With Gaussian neighbour weights :math:`w_{ij}` (perplexity-calibrated, summing to 1) and
    :math:`q_{ic} = \sum_{j: c_j=c} w_{ij}`, :math:`\mathrm{LISI}_i = 1 / \sum_c q_{ic}^2`:
    the effective number of categories in the neighbourhood, between 1 and the number of
    categories.
    """
    codes, n_cat = _codes(values, "categories")
    w = _perplexity_weights(graph.distances, perplexity)
    nb = codes[graph.indices]
    q = np.zeros((nb.shape[0], n_cat))
    rows = np.repeat(np.arange(nb.shape[0]), nb.shape[1])
    np.add.at(q, (rows, nb.ravel()), w.ravel())
    return 1.0 / (q**2).sum(axis=1)


def ilisi(graph: KnnGraph, batch: Sequence | np.ndarray, perplexity: float = 30.0) -> float:
    r"""Integration LISI, normalised: :math:`(\mathrm{median}_i\,\mathrm{LISI}_i - 1)/(B - 1)`
    over the batches (scib's scaling), in [0, 1]; 1 = perfectly mixed. NaN with one batch."""
    _, n_batches = _codes(batch, "batch")
    if n_batches < 2:
        return float("nan")
    return float(np.clip((np.median(lisi(graph, batch, perplexity)) - 1) / (n_batches - 1), 0, 1))


def clisi(graph: KnnGraph, labels: Sequence | np.ndarray, perplexity: float = 30.0) -> float:
    r"""Cell-type LISI, normalised: :math:`(L - \mathrm{median}_i\,\mathrm{LISI}_i)/(L - 1)`
    over the :math:`L` labels, in [0, 1]; 1 = every neighbourhood is one label."""
    _, n_labels = _codes(labels, "labels")
    if n_labels < 2:
        return float("nan")
    med = np.median(lisi(graph, labels, perplexity))
    return float(np.clip((n_labels - med) / (n_labels - 1), 0, 1))


def graph_connectivity(graph: KnnGraph, labels: Sequence | np.ndarray) -> float:
    r"""scib's graph connectivity: for each label :math:`c`, take the kNN graph restricted to
    cells of label :math:`c` (edges as undirected) and the fraction of those cells in its
    largest connected component, :math:`\mathrm{LCC}_c / n_c`; return the mean over labels.
    1 when every label forms one connected piece. ``graph`` must hold every cell."""
    if graph.queries.size != graph.n_cells:
        raise DataError("graph connectivity needs the kNN graph of every cell")
    codes, n_labels = _codes(labels, "labels")
    n, k = graph.indices.shape
    rows = np.repeat(graph.queries, k)
    cols = graph.indices.ravel()
    same = codes[rows] == codes[cols]
    adj = sp.csr_matrix((np.ones(same.sum()), (rows[same], cols[same])), shape=(n, n))
    scores = []
    for c in range(n_labels):
        members = np.flatnonzero(codes == c)
        if members.size == 0:
            continue
        sub = adj[members][:, members]
        _, comp = connected_components(sub, directed=True, connection="weak")
        scores.append(np.bincount(comp).max() / members.size)
    return float(np.mean(scores))


# --------------------------------------------------------------------------- silhouettes
def _subsample(n: int, max_cells: int, seed: int, must: np.ndarray | None = None) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if must is None or must.size == 0:
        return np.sort(rng.choice(n, max_cells, replace=False))
    must = np.unique(must)[:max_cells]
    rest = np.setdiff1d(np.arange(n), must)
    extra = rng.choice(rest, max(0, max_cells - must.size), replace=False)
    return np.sort(np.concatenate([must, extra]))


def silhouette_label(
    X: np.ndarray,
    labels: Sequence | np.ndarray,
    max_cells: int = SILHOUETTE_MAX_CELLS,
    seed: int = 0,
) -> float:
    r"""Label silhouette rescaled to [0, 1]: :math:`(\bar s + 1)/2`, where
    :math:`s_i = (b_i - a_i)/\max(a_i, b_i)` (:math:`a_i` mean distance to cells of its own
    label, :math:`b_i` to the nearest other label). Computed on a random subsample of at most
    ``max_cells`` cells (the cost is quadratic)."""
    from sklearn.metrics import silhouette_samples

    X = _as_embedding(X)
    codes, n_labels = _codes(labels, "labels")
    if n_labels < 2:
        return float("nan")
    sub = _subsample(X.shape[0], max_cells, seed)
    if np.unique(codes[sub]).size < 2:
        return float("nan")
    return float((silhouette_samples(X[sub], codes[sub]).mean() + 1) / 2)


def silhouette_batch(
    X: np.ndarray,
    batch: Sequence | np.ndarray,
    labels: Sequence | np.ndarray,
    max_cells: int = SILHOUETTE_MAX_CELLS,
    seed: int = 0,
) -> float:
    r"""scib-style batch silhouette: within each label :math:`c`, the silhouette
    :math:`s_i` of the *batch* labelling, scored :math:`1 - |s_i|`; averaged over the cells
    of the label, then over labels (labels present in one batch only are skipped). 1 = batches
    indistinguishable within every label. Computed on a random subsample of at most
    ``max_cells`` cells."""
    from sklearn.metrics import silhouette_samples

    X = _as_embedding(X)
    b_codes, n_batches = _codes(batch, "batch")
    l_codes, _ = _codes(labels, "labels")
    if n_batches < 2:
        return float("nan")
    sub = _subsample(X.shape[0], max_cells, seed)
    scores = []
    for c in np.unique(l_codes[sub]):
        members = sub[l_codes[sub] == c]
        b = b_codes[members]
        n_b = np.unique(b).size
        if n_b < 2 or members.size <= n_b:
            continue
        s = silhouette_samples(X[members], b)
        scores.append(np.mean(1 - np.abs(s)))
    return float(np.mean(scores)) if scores else float("nan")


def isolated_label_silhouette(
    X: np.ndarray,
    labels: Sequence | np.ndarray,
    batch: Sequence | np.ndarray,
    max_cells: int = SILHOUETTE_MAX_CELLS,
    seed: int = 0,
) -> float:
    r"""scib's isolated-label silhouette. Isolated labels are those present in the fewest
    batches. For each, the mean over its cells of the label silhouette :math:`s_i` (all
    labels), rescaled :math:`(\bar s + 1)/2`; the score is the mean over isolated labels.
    The subsample (at most ``max_cells`` cells) keeps the isolated labels' cells first."""
    from sklearn.metrics import silhouette_samples

    X = _as_embedding(X)
    l_codes, n_labels = _codes(labels, "labels")
    b_codes, _ = _codes(batch, "batch")
    if n_labels < 2:
        return float("nan")
    pairs = pd.DataFrame({"l": l_codes, "b": b_codes}).drop_duplicates()
    n_batches_per_label = pairs.groupby("l")["b"].nunique()
    isolated = n_batches_per_label.index[n_batches_per_label == n_batches_per_label.min()]
    must = np.flatnonzero(np.isin(l_codes, isolated))
    rng = np.random.default_rng(seed)
    if must.size > max_cells // 2:
        must = rng.choice(must, max_cells // 2, replace=False)
    sub = _subsample(X.shape[0], max_cells, seed, must=must)
    s = silhouette_samples(X[sub], l_codes[sub])
    scores = [(s[l_codes[sub] == c].mean() + 1) / 2 for c in isolated if (l_codes[sub] == c).any()]
    return float(np.mean(scores))


# --------------------------------------------------------------------------- clustering
def clustering_nmi_ari(X: np.ndarray, labels: Sequence | np.ndarray, seed: int = 0) -> dict:
    r"""NMI and ARI between the labels and a k-means clustering of the embedding with
    k = the number of labels (MiniBatchKMeans above 100,000 cells).

    NMI :math:`= I(C;L)/\sqrt{H(C)H(L)}` (geometric normalisation); ARI is the Rand index
    adjusted for chance. Both 1 for a perfect match; NMI ~ 0 and ARI ~ 0 for an unrelated
    clustering."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    X = _as_embedding(X)
    codes, n_labels = _codes(labels, "labels")
    if n_labels < 2:
        return {"nmi": float("nan"), "ari": float("nan")}
    if X.shape[0] > KMEANS_MINIBATCH_ABOVE:
        km = MiniBatchKMeans(n_clusters=n_labels, random_state=seed, n_init=3, batch_size=4096)
    else:
        km = KMeans(n_clusters=n_labels, random_state=seed, n_init=5)
    clusters = km.fit_predict(X)
    return {
        "nmi": float(normalized_mutual_info_score(codes, clusters, average_method="geometric")),
        "ari": float(adjusted_rand_score(codes, clusters)),
    }


# --------------------------------------------------------------------------- all together
#: metric name -> category (batch correction or biological conservation).
METRIC_CATEGORIES = {
    "ilisi": "batch",
    "batch_entropy": "batch",
    "silhouette_batch": "batch",
    "graph_connectivity": "batch",
    "silhouette_label": "bio",
    "clisi": "bio",
    "nmi_kmeans": "bio",
    "ari_kmeans": "bio",
    "isolated_label_silhouette": "bio",
}


def integration_metrics(
    X: np.ndarray,
    batch: Sequence | np.ndarray | None,
    labels: Sequence | np.ndarray | None = None,
    n_neighbors: int = 15,
    lisi_neighbors: int = 90,
    max_queries: int = MAX_QUERIES,
    silhouette_max_cells: int = SILHOUETTE_MAX_CELLS,
    seed: int = 0,
    full_graph: KnnGraph | None = None,
) -> pd.DataFrame:
    """All metrics of one embedding as a table with columns ``metric, value, category, note``.

    Label-free (need ``batch``): ``ilisi`` and ``batch_entropy`` (on ``lisi_neighbors`` and
    ``n_neighbors`` neighbours of at most ``max_queries`` query cells). With ``labels`` also:
    ``silhouette_batch``, ``graph_connectivity`` (kNN graph of ``n_neighbors`` on all cells),
    ``silhouette_label``, ``clisi``, ``nmi_kmeans``, ``ari_kmeans``,
    ``isolated_label_silhouette`` and the scib-style aggregates ``batch_score`` /
    ``bio_score`` (means of their category) and ``total_score = 0.6 bio + 0.4 batch``.
    ``full_graph`` may pass a precomputed kNN graph of every cell (``n_neighbors`` columns).
    """
    X = _as_embedding(X)
    n = X.shape[0]
    rows: list[tuple[str, float, str]] = []
    rng = np.random.default_rng(seed)
    queries = np.arange(n) if n <= max_queries else np.sort(rng.choice(n, max_queries, False))
    q_note = "" if n <= max_queries else f"{queries.size} of {n} cells as kNN queries"
    s_note = "" if n <= silhouette_max_cells else f"subsample of {silhouette_max_cells} of {n}"
    graph_q = knn_graph(X, max(lisi_neighbors, n_neighbors), queries=queries, seed=seed)
    if batch is not None:
        batch = np.asarray(batch)
        rows.append(("ilisi", ilisi(graph_q.first(lisi_neighbors), batch), q_note))
        rows.append(("batch_entropy", batch_entropy(graph_q.first(n_neighbors), batch), q_note))
    if labels is not None:
        labels = np.asarray(labels)
        full = full_graph
        if full is None:
            full = graph_q if queries.size == n else knn_graph(X, n_neighbors, seed=seed)
        rows.append(("graph_connectivity", graph_connectivity(full.first(n_neighbors), labels), ""))
        if batch is not None:
            rows.append(
                (
                    "silhouette_batch",
                    silhouette_batch(X, batch, labels, silhouette_max_cells, seed),
                    s_note,
                )
            )
        rows.append(
            ("silhouette_label", silhouette_label(X, labels, silhouette_max_cells, seed), s_note)
        )
        rows.append(("clisi", clisi(graph_q.first(lisi_neighbors), labels), q_note))
        km = clustering_nmi_ari(X, labels, seed)
        k_note = f"KMeans, k = {np.unique(labels).size} labels"
        rows.append(("nmi_kmeans", km["nmi"], k_note))
        rows.append(("ari_kmeans", km["ari"], k_note))
        if batch is not None:
            iso = isolated_label_silhouette(X, labels, batch, silhouette_max_cells, seed)
            rows.append(("isolated_label_silhouette", iso, s_note))
    table = pd.DataFrame(rows, columns=["metric", "value", "note"])
    table.insert(2, "category", table["metric"].map(METRIC_CATEGORIES))
    if labels is not None and batch is not None:
        batch_score = table.loc[table.category == "batch", "value"].mean()
        bio_score = table.loc[table.category == "bio", "value"].mean()
        table = pd.concat(
            [
                table,
                pd.DataFrame(
                    {
                        "metric": ["batch_score", "bio_score", "total_score"],
                        "value": [batch_score, bio_score, 0.6 * bio_score + 0.4 * batch_score],
                        "category": "aggregate",
                        "note": [
                            "mean of batch metrics",
                            "mean of bio metrics",
                            "0.6 bio + 0.4 batch",
                        ],
                    }
                ),
            ],
            ignore_index=True,
        )
    return table


# --------------------------------------------------------------------------- neighbourhood correlation
def log_normalise(counts: np.ndarray | sp.spmatrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(counts / total * target_sum)`` per cell (cells with zero total stay zero), as
    float32 CSR."""
    X = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.diags(scale.astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return X.tocsr()


def _strata_masks(
    obs: pd.DataFrame,
    rows: np.ndarray,
    cols: np.ndarray,
    library_key: str | None,
    dataset_key: str | None,
    technical_keys: Sequence[str],
) -> dict[str, np.ndarray]:
    """Boolean masks over (cell, neighbour) pairs, one per stratum present."""

    def same(key: str) -> np.ndarray:
        codes, _ = _codes(obs[key].to_numpy(), f"obs column {key!r}")
        return codes[rows] == codes[cols]

    masks: dict[str, np.ndarray] = {"all": np.ones(rows.shape, dtype=bool)}
    if library_key:
        same_lib = same(library_key)
        masks["same_library"] = same_lib
        masks["other_library"] = ~same_lib
        if dataset_key:
            same_ds = same(dataset_key)
            masks["other_library_same_dataset"] = ~same_lib & same_ds
            masks["other_dataset"] = ~same_ds
    elif dataset_key:
        same_ds = same(dataset_key)
        masks["same_dataset"] = same_ds
        masks["other_dataset"] = ~same_ds
    if technical_keys:
        per_key = {k: same(k) for k in technical_keys}
        all_same = np.logical_and.reduce(list(per_key.values()))
        masks["same_technical"] = all_same
        masks["other_technical"] = ~all_same
        if len(technical_keys) > 1:
            for k, m in per_key.items():
                masks[f"same_{k}"] = m
                masks[f"other_{k}"] = ~m
    return masks


def neighbourhood_correlation(
    expression: np.ndarray | sp.spmatrix,
    neighbours: np.ndarray,
    obs: pd.DataFrame,
    library_key: str | None = None,
    dataset_key: str | None = None,
    technical_keys: Sequence[str] = (),
    chunk_size: int = 8192,
) -> pd.DataFrame:
    r"""Per-cell correlation of marker expression with its latent neighbours, by stratum.

    For cell :math:`i` with marker vector :math:`x_i` (e.g. log-normalised expression of the
    marker genes) and neighbours :math:`N(i)` (row ``i`` of ``neighbours``, self excluded),
    :math:`r_{ij}` is the Pearson correlation of :math:`x_i` and :math:`x_j` over the markers.
    For each stratum :math:`S` (a relation between cell and neighbour)

    .. math:: \mathrm{corr}_S(i) = \frac{1}{|N_S(i)|}\sum_{j \in N_S(i)} r_{ij}

    Strata (present only when their keys are given; absent keys give no column, not NaN):
    ``all``; with ``library_key``: ``same_library``, ``other_library``; with ``dataset_key``
    too: ``other_library_same_dataset``, ``other_dataset`` (``same_dataset`` /
    ``other_dataset`` without a library key); with ``technical_keys``: ``same_technical``
    (equal in every technical key) and ``other_technical`` (differs in any), plus
    ``same_<key>`` / ``other_<key>`` per key when there are several.

    Returns one row per cell with columns ``corr_<S>`` (NaN when the cell has no neighbour in
    :math:`S`, or a neighbour pair has a constant marker vector) and ``n_neighbours_<S>``.
    """
    neighbours = np.asarray(neighbours, dtype=np.int64)
    n, k = neighbours.shape
    if sp.issparse(expression):
        expression = sp.csr_matrix(expression)
    else:
        expression = np.asarray(expression)
    if expression.shape[0] != n or len(obs) != n:
        raise DataError(
            f"expression ({expression.shape[0]} cells), neighbours ({n}) and obs ({len(obs)}) "
            "must describe the same cells"
        )
    for key in [library_key, dataset_key, *technical_keys]:
        if key and key not in obs.columns:
            raise DataError(f"obs column {key!r} not found for the neighbourhood correlation")
    # standardise each cell's marker vector: r_ij = <z_i, z_j>
    Z = np.empty(expression.shape, dtype=np.float32)
    for start in range(0, n, chunk_size):
        block = expression[start : start + chunk_size]
        block = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        block = block - block.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(block, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            Z[start : start + chunk_size] = np.where(norm > 0, block / norm, np.nan)
    r = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk_size):
        zi = Z[start : start + chunk_size]
        r[start : start + chunk_size] = np.einsum(
            "ig,ijg->ij", zi, Z[neighbours[start : start + chunk_size]]
        )
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    masks = _strata_masks(
        obs, rows.ravel(), neighbours.ravel(), library_key, dataset_key, technical_keys
    )
    out = {}
    for name, mask in masks.items():
        m = mask.reshape(n, k)
        count = m.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"corr_{name}"] = np.where(m, r, 0.0).sum(axis=1) / count
        out[f"corr_{name}"][count == 0] = np.nan
        out[f"n_neighbours_{name}"] = count
    return pd.DataFrame(out, index=obs.index)


def summarise_neighbourhood_correlation(per_cell: pd.DataFrame) -> pd.DataFrame:
    """Headline values of :func:`neighbourhood_correlation`: for each stratum the median of
    ``corr_<S>`` over cells with at least one neighbour in it (``nbr_corr_<S>``) and the
    fraction of all neighbour pairs that fall in it (``nbr_frac_<S>``). Same columns as
    :func:`integration_metrics`."""
    rows = []
    total = per_cell["n_neighbours_all"].sum()
    for col in per_cell.columns:
        if not col.startswith("corr_"):
            continue
        name = col.removeprefix("corr_")
        values = per_cell[col].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        n_cells = int(finite.size)
        rows.append(
            (
                f"nbr_corr_{name}",
                float(np.median(finite)) if n_cells else float("nan"),
                "neighbourhood",
                f"median over {n_cells} cells with neighbours in stratum",
            )
        )
        frac = per_cell[f"n_neighbours_{name}"].sum() / total if total else float("nan")
        rows.append((f"nbr_frac_{name}", float(frac), "neighbourhood", "fraction of kNN pairs"))
    return pd.DataFrame(rows, columns=["metric", "value", "category", "note"])


def embedding_metrics_with_neighbourhood(
    X: np.ndarray,
    obs: pd.DataFrame,
    batch_key: str | None,
    labels_key: str | None,
    marker_expression: np.ndarray | sp.spmatrix | None,
    purpose_keys: Mapping[str, object] | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    **kwargs,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """:func:`integration_metrics` plus the neighbourhood correlation summary for one
    embedding; returns (table, per-cell neighbourhood correlations or None)."""
    batch = obs[batch_key].to_numpy() if batch_key else None
    labels = obs[labels_key].to_numpy() if labels_key else None
    graph = knn_graph(X, n_neighbors, seed=seed)
    table = integration_metrics(
        X, batch, labels, n_neighbors=n_neighbors, seed=seed, full_graph=graph, **kwargs
    )
    per_cell = None
    if marker_expression is not None:
        pk = dict(purpose_keys or {})
        per_cell = neighbourhood_correlation(
            marker_expression,
            graph.indices,
            obs,
            library_key=pk.get("library_key"),
            dataset_key=pk.get("dataset_key"),
            technical_keys=list(pk.get("technical_covariate_keys") or []),
        )
        table = pd.concat([table, summarise_neighbourhood_correlation(per_cell)], ignore_index=True)
    return table, per_cell
