"""Integration metrics on hand-built cases with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from regvi import metrics as M
from regvi.errors import DataError


def graph(indices, distances=None):
    indices = np.asarray(indices, dtype=np.int64)
    if distances is None:
        distances = np.tile(np.arange(1, indices.shape[1] + 1, dtype=float), (len(indices), 1))
    return M.KnnGraph(indices, np.asarray(distances, float), np.arange(len(indices)), len(indices))


@pytest.fixture
def clouds():
    """600 cells, 3 batches x 2 labels. `mixed`: position depends on the label only;
    `separated`: each batch shifted far away."""
    rng = np.random.default_rng(0)
    batch = np.repeat(["a", "b", "c"], 200)
    labels = np.tile(np.repeat(["x", "y"], 100), 3)
    mixed = np.where(labels[:, None] == "x", 0.0, 10.0) + rng.normal(size=(600, 5))
    shift = {"a": 0.0, "b": 50.0, "c": 100.0}
    separated = mixed + np.array([shift[b] for b in batch])[:, None]
    return batch, labels, mixed, separated


def test_batch_entropy_exact_on_hand_built_graph():
    batch = np.array(["a", "b", "a", "b"])
    # every cell's two neighbours: one of each batch -> entropy log 2 / log 2 = 1
    mixed = graph([[1, 2], [0, 3], [3, 0], [2, 1]])
    assert M.batch_entropy(mixed, batch) == pytest.approx(1.0)
    # every cell's neighbours are of its own batch -> 0
    same = graph([[2, 2], [3, 3], [0, 0], [1, 1]])
    assert M.batch_entropy(same, batch) == pytest.approx(0.0)
    assert np.isnan(M.batch_entropy(mixed, ["a"] * 4))


def test_lisi_counts_effective_categories():
    # equal distances -> uniform weights; 2 neighbours of 2 batches -> LISI 2 (iLISI 1)
    batch = np.array(["a", "b", "a", "b"])
    mixed = graph([[1, 2], [0, 3], [3, 0], [2, 1]], np.ones((4, 2)))
    np.testing.assert_allclose(M.lisi(mixed, batch, perplexity=2), 2.0)
    assert M.ilisi(mixed, batch, perplexity=2) == pytest.approx(1.0)
    same = graph([[2, 2], [3, 3], [0, 0], [1, 1]], np.ones((4, 2)))
    assert M.ilisi(same, batch, perplexity=2) == pytest.approx(0.0)


def test_mixing_scores_mixed_vs_separated(clouds):
    batch, labels, mixed, separated = clouds
    g_mix, g_sep = M.knn_graph(mixed, 90), M.knn_graph(separated, 90)
    assert M.ilisi(g_mix, batch) > 0.8
    assert M.ilisi(g_sep, batch) < 0.01
    assert M.batch_entropy(g_mix.first(15), batch) > 0.9
    assert M.batch_entropy(g_sep.first(15), batch) < 0.01
    assert M.silhouette_batch(mixed, batch, labels) > 0.9
    assert M.silhouette_batch(separated, batch, labels) < 0.1
    assert M.clisi(g_mix, labels) > 0.99


def test_label_conservation_scores(clouds):
    batch, labels, mixed, separated = clouds
    assert M.silhouette_label(mixed, labels) > 0.9
    assert M.clustering_nmi_ari(mixed, labels) == {"nmi": 1.0, "ari": 1.0}
    assert M.clustering_nmi_ari(separated, labels)["nmi"] < 0.1  # k-means splits batches
    assert M.isolated_label_silhouette(mixed, labels, batch) > 0.9
    # a random labelling is not conserved
    shuffled = np.random.default_rng(1).permutation(labels)
    assert abs(M.silhouette_label(mixed, shuffled) - 0.5) < 0.05


def test_graph_connectivity_hand_built():
    labels = np.array(["x", "x", "x", "x", "y", "y"])
    # label x: 0-1 and 2-3 are two separate pairs -> largest component 2/4; y connected: 1
    g = graph([[1, 4], [0, 5], [3, 4], [2, 5], [5, 0], [4, 2]])
    assert M.graph_connectivity(g, labels) == pytest.approx((0.5 + 1.0) / 2)
    g2 = graph([[1, 4], [2, 5], [3, 4], [0, 5], [5, 0], [4, 2]])
    assert M.graph_connectivity(g2, labels) == pytest.approx(1.0)


def test_umap_connectivities_hand_built():
    # two neighbours at distances 1 and 2: rho = 1, so the nearest gets weight 1 and sigma
    # solves 1 + exp(-1 / sigma) = log2(3)
    g = graph([[1, 2], [0, 2], [0, 1]])
    P = M.umap_connectivities(g).toarray()
    w = np.log2(3) - 1  # the farther neighbour's weight exp(-1 / sigma)
    # directed: every cell's nearest has weight 1, the other w; fuzzy union a + b - ab
    expected = np.array([[0, 1, 1], [1, 0, 2 * w - w * w], [1, 2 * w - w * w, 0]])
    np.testing.assert_allclose(P, expected, atol=2e-5)  # bisection tolerance 1e-5
    with pytest.raises(DataError, match="every cell"):
        M.umap_connectivities(M.KnnGraph(g.indices[:2], g.distances[:2], np.arange(2), 3))


def test_umap_connectivities_match_umap_learn(clouds):
    """Oracle: umap-learn's fuzzy_simplicial_set (what scanpy's pp.neighbors calls) on the
    same neighbours, with the cell itself in column 0 as scanpy passes them."""
    import scipy.sparse as sp
    from umap.umap_ import fuzzy_simplicial_set

    X = clouds[2].astype(np.float32)
    X[1] = X[0]  # a duplicate: a neighbour at distance 0
    n, k = X.shape[0], 15
    g = M.knn_graph(X, k - 1)
    ours = M.umap_connectivities(g)
    indices = np.column_stack([np.arange(n), g.indices])
    distances = np.column_stack([np.zeros(n), g.distances])
    reference, _, _ = fuzzy_simplicial_set(
        sp.coo_matrix((n, 1)), k, None, None, knn_indices=indices, knn_dists=distances
    )
    reference = reference.tocsr()
    assert ours.nnz == reference.nnz
    np.testing.assert_allclose(ours.toarray(), reference.toarray(), atol=1e-6)
    assert abs(ours - ours.T).max() == 0


def test_knn_graph_excludes_self_even_with_duplicates():
    X = np.array([[0.0], [0.0], [1.0], [5.0]])
    g = M.knn_graph(X, 2)
    assert g.indices.shape == (4, 2)
    assert not (g.indices == np.arange(4)[:, None]).any()
    assert set(g.indices[0]) == {1, 2} and set(g.indices[1]) == {0, 2}


def test_integration_metrics_table_and_subsampling_note(clouds):
    batch, labels, mixed, _ = clouds
    table = M.integration_metrics(mixed, batch, labels, silhouette_max_cells=200, max_queries=300)
    values = dict(zip(table.metric, table.value, strict=True))
    assert values["ilisi"] > 0.7 and values["nmi_kmeans"] == 1.0
    notes = dict(zip(table.metric, table.note, strict=True))
    assert notes["silhouette_label"] == "subsample of 200 of 600"
    assert notes["ilisi"] == "300 of 600 cells as kNN queries"
    assert {"batch_score", "bio_score", "total_score"} <= set(table.metric)
    # label-free: only the batch mixing metrics
    free = M.integration_metrics(mixed, batch, None)
    assert list(free.metric) == ["ilisi", "batch_entropy"]


def test_neighbourhood_correlation_strata_hand_built():
    # 6 cells; markers: cells 0,1,2,4 share profile p, cell 3 has -p, cell 5 has profile q
    p = np.array([1.0, 2.0, 3.0, 4.0])
    q = np.array([4.0, 1.0, 3.0, 2.0])
    r_pq = np.corrcoef(p, q)[0, 1]
    expr = np.stack([p, 2 * p, p + 1, -p, p, q])
    obs = pd.DataFrame(
        {
            "lib": ["L1", "L1", "L2", "L3", "L3", "L1"],
            "ds": ["D1", "D1", "D1", "D2", "D2", "D1"],
            "kit": ["v2", "v3", "v2", "v3", "v2", "v3"],
        },
        index=[f"c{i}" for i in range(6)],
    )
    neighbours = np.array([[1, 2, 3], [0, 5, 4], [0, 1, 3], [4, 2, 0], [3, 0, 5], [1, 0, 2]])
    out = M.neighbourhood_correlation(expr, neighbours, obs, "lib", "ds", ["kit"])
    # cell 0 (L1, D1, v2): 1 same library (r=1), 2 same dataset other library (cell 2, r=1),
    # 3 other dataset (r=-1); same kit: cell 2; other kit: cells 1, 3
    c0 = out.loc["c0"]
    assert c0["corr_all"] == pytest.approx(1 / 3)
    assert c0["corr_same_library"] == pytest.approx(1.0)
    assert c0["corr_other_library"] == pytest.approx(0.0)
    assert c0["corr_other_library_same_dataset"] == pytest.approx(1.0)
    assert c0["corr_other_dataset"] == pytest.approx(-1.0)
    assert c0["corr_same_technical"] == pytest.approx(1.0)
    assert c0["corr_other_technical"] == pytest.approx(0.0)
    assert c0["n_neighbours_other_dataset"] == 1 and c0["n_neighbours_same_library"] == 1
    # cell 1 (L1, D1, v3): neighbours 0 (same lib), 5 (same lib, r_pq), 4 (other dataset)
    c1 = out.loc["c1"]
    assert c1["corr_same_library"] == pytest.approx((1 + r_pq) / 2)
    assert c1["corr_other_dataset"] == pytest.approx(1.0)
    assert np.isnan(c1["corr_other_library_same_dataset"])
    assert c1["n_neighbours_other_library_same_dataset"] == 0
    # cell 3 (L3, D2, v3): neighbour 4 same library (r=-1); 2 and 0 other dataset (r=-1)
    assert out.loc["c3", "corr_same_library"] == pytest.approx(-1.0)
    assert out.loc["c3", "n_neighbours_other_dataset"] == 2

    # only library_key: cross-dataset and technical strata are absent, not errors
    lib_only = M.neighbourhood_correlation(expr, neighbours, obs, library_key="lib")
    assert {c for c in lib_only.columns if c.startswith("corr_")} == {
        "corr_all",
        "corr_same_library",
        "corr_other_library",
    }
    np.testing.assert_allclose(lib_only["corr_same_library"], out["corr_same_library"])
    summary = M.summarise_neighbourhood_correlation(lib_only)
    assert "nbr_corr_same_library" in set(summary.metric)
    fracs = summary.set_index("metric")["value"]
    assert fracs["nbr_frac_same_library"] + fracs["nbr_frac_other_library"] == pytest.approx(1.0)


def test_neighbourhood_correlation_sparse_and_constant_rows():
    import scipy.sparse as sp

    expr = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    obs = pd.DataFrame({"lib": ["a", "a", "b"]})
    nb = np.array([[1, 2], [0, 2], [0, 1]])
    out = M.neighbourhood_correlation(sp.csr_matrix(expr), nb, obs, "lib")
    assert out.loc[0, "corr_same_library"] == pytest.approx(1.0)
    assert np.isnan(out.loc[2, "corr_all"])  # a constant marker vector has no correlation


def test_log_normalise():
    X = np.array([[1.0, 3.0], [0.0, 0.0]])
    out = M.log_normalise(X, target_sum=4).toarray()
    np.testing.assert_allclose(out, [[np.log1p(1.0), np.log1p(3.0)], [0.0, 0.0]], rtol=1e-6)
