"""The atlas simulator plants what its docstring says: tree, studies, composition, soup, depth,
batch effects; it is deterministic and rejects bad arguments."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from regvi.atlas import simulate_atlas


@pytest.fixture(scope="module")
def atlas() -> ad.AnnData:
    # default tree (120 types), studies and libraries; fewer cells and genes for speed
    return simulate_atlas(n_cells=4000, n_genes=1000, seed=1)


def codes(adata: ad.AnnData, key: str) -> np.ndarray:
    return adata.obs[key].cat.codes.to_numpy()


def lognorm(X: np.ndarray) -> np.ndarray:
    return np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)


def cell_profiles(adata: ad.AnnData, cells: np.ndarray) -> np.ndarray:
    """The cells' own profiles p_c rebuilt from the planted truth (module docstring, step 7)."""
    tr = adata.uns["atlas_truth"]
    t, s, lib = (codes(adata, k)[cells] for k in ("cell_type", "study", "library"))
    eta = tr["type_log_expression"][t] + adata.obsm["programs"][cells] @ tr["program_loadings"]
    eta += tr["study_lineage_effect"][s, tr["lineage_of_type"][t]]
    eta += tr["library_effect"][lib] + np.log(tr["study_gene_scaling"][s])
    eta -= eta.max(axis=1, keepdims=True)
    p = np.exp(eta)
    return p / p.sum(axis=1, keepdims=True)


def test_tree_studies_and_libraries(atlas):
    tr = atlas.uns["atlas_truth"]
    obs = atlas.obs
    assert obs["cell_type"].nunique() >= 100
    assert obs["cell_type_l2"].nunique() >= 20
    assert obs["cell_type_l1"].nunique() >= 5
    assert obs["library"].nunique() >= 20
    assert obs["study"].nunique() >= 4
    assert (obs["batch"].astype(str) == obs["library"].astype(str)).all()
    # each library belongs to exactly one study, the planted one, and studies hold several
    lib_study = pd.crosstab(obs["library"], obs["study"]).to_numpy()
    assert ((lib_study > 0).sum(axis=1) == 1).all()
    np.testing.assert_array_equal(lib_study.argmax(axis=1), tr["study_of_library"])
    assert np.bincount(tr["study_of_library"]).min() >= 2
    # labels follow the parent arrays
    t = codes(atlas, "cell_type")
    np.testing.assert_array_equal(codes(atlas, "cell_type_l2"), tr["subtype_of_type"][t])
    np.testing.assert_array_equal(codes(atlas, "cell_type_l1"), tr["lineage_of_type"][t])
    np.testing.assert_array_equal(
        tr["lineage_of_type"], tr["lineage_of_subtype"][tr["subtype_of_type"]]
    )


def test_composition_varies_with_absent_and_rare_types(atlas):
    tr = atlas.uns["atlas_truth"]
    per_lib = pd.crosstab(atlas.obs["library"], atlas.obs["cell_type"]).to_numpy()
    np.testing.assert_array_equal(per_lib, tr["library_type_counts"])
    # planted absences: cells only where present, and some (library, type) pairs planted absent
    assert not (per_lib[~tr["library_present"]]).any()
    assert (~tr["library_present"]).sum() > 0.1 * per_lib.size
    assert (~tr["study_present"]).any()
    # every type has cells in >= 2 studies
    per_study = pd.crosstab(atlas.obs["study"], atlas.obs["cell_type"]).to_numpy()
    assert ((per_study > 0).sum(axis=0) >= 2).all()
    # rare types exist: the planted rare types have far fewer cells than the others
    totals = per_lib.sum(axis=0)
    rare = np.isin(np.arange(totals.size), tr["rare_types"])
    assert rare.sum() >= 5
    assert np.median(totals[rare]) < 0.4 * np.median(totals[~rare])
    # libraries of one study differ in composition (total variation between fractions)
    frac = per_lib / per_lib.sum(axis=1, keepdims=True)
    lib_of_study = np.flatnonzero(
        tr["study_of_library"] == np.bincount(tr["study_of_library"]).argmax()
    )
    tv = [0.5 * np.abs(frac[a] - frac[b]).sum() for a, b in itertools.combinations(lib_of_study, 2)]
    assert min(tv) > 0.1


def test_counts_are_whole_non_negative_and_no_cell_is_empty(atlas, tmp_path):
    X = atlas.X
    assert sp.issparse(X) and X.format == "csr" and X.dtype == np.float32
    assert X.shape == (4000, 1000)
    assert (X.data >= 0).all() and np.array_equal(X.data, np.round(X.data))
    assert (np.asarray(X.sum(axis=1)).ravel() > 0).all()
    assert list(atlas.var_names[:2]) == ["gene_0", "gene_1"]
    for key in ("cell_type", "cell_type_l2", "cell_type_l1", "library", "batch", "study"):
        assert isinstance(atlas.obs[key].dtype, pd.CategoricalDtype)
    # the planted truth survives an .h5ad round trip
    path = tmp_path / "atlas.h5ad"
    atlas.write_h5ad(path)
    back = ad.read_h5ad(path)
    for key in ("soup", "study_gene_scaling", "contamination", "study_lineage_effect"):
        np.testing.assert_array_equal(back.uns["atlas_truth"][key], atlas.uns["atlas_truth"][key])
    assert (back.X != atlas.X).nnz == 0


def test_study_depth_follows_planted_medians(atlas):
    tr = atlas.uns["atlas_truth"]
    planted = tr["study_median_depth"]
    assert planted.max() / planted.min() > 5
    totals = np.asarray(atlas.X.sum(axis=1)).ravel()
    study = codes(atlas, "study")
    observed = np.array([np.median(totals[study == s]) for s in range(planted.size)])
    np.testing.assert_array_equal(np.argsort(observed), np.argsort(planted))
    assert np.abs(np.log(observed / planted)).max() < np.log(1.3)


def test_soup_is_the_library_mean_and_contaminates_at_the_planted_fraction(atlas):
    """Genes at least 30x above a lineage's own level in the soup (markers of other lineages)
    carry counts in that lineage's cells at the planted contamination: solving
    obs = sum d (1 - a) p + a sum d soup for a recovers each library's planted fraction."""
    tr = atlas.uns["atlas_truth"]
    lib, lineage = codes(atlas, "library"), codes(atlas, "cell_type_l1")
    depth = atlas.obs["depth"].to_numpy()
    estimated, planted = [], []
    for library in range(tr["contamination"].size):
        cells = np.flatnonzero(lib == library)
        p = cell_profiles(atlas, cells)
        soup = tr["soup"][library]
        np.testing.assert_allclose(p.mean(axis=0), soup, rtol=1e-10, atol=1e-15)
        obs = own = soup_total = 0.0
        for b in np.unique(lineage[cells]):
            in_b = lineage[cells] == b
            genes = np.flatnonzero(soup >= 30 * p[in_b].mean(axis=0))
            if in_b.sum() < 10 or genes.size < 5:
                continue
            genes = genes[np.argsort(soup[genes])[::-1][:25]]
            d = depth[cells[in_b], None]
            obs += atlas.X[cells[in_b]][:, genes].sum()
            own += (d * p[in_b][:, genes]).sum()
            soup_total += (d * soup[genes]).sum()
        alpha = tr["contamination"][library]
        if soup_total == 0:  # no lineage with >= 10 cells and >= 5 such genes here
            continue
        if alpha > 0.09:  # soup dominates these genes: observed >> the cells' own level
            assert obs > 4 * own
        estimated.append((obs - own) / (soup_total - own))
        planted.append(alpha)
    estimated, planted = np.array(estimated), np.array(planted)
    assert planted.size >= 0.75 * tr["contamination"].size
    assert np.abs(estimated / planted - 1).max() < 0.3
    assert np.corrcoef(estimated, planted)[0, 1] > 0.97
    assert planted.max() > 5 * planted.min()


def test_hierarchy_siblings_closer_than_cousins_closer_than_other_lineages(atlas):
    tr = atlas.uns["atlas_truth"]
    t = codes(atlas, "cell_type")
    L = lognorm(atlas.X.toarray())
    counts = np.bincount(t)
    keep = np.flatnonzero(counts >= 10)
    means = np.stack([L[t == k].mean(axis=0) for k in keep])
    means -= means.mean(axis=0)
    corr = np.corrcoef(means)
    sub, lin = tr["subtype_of_type"][keep], tr["lineage_of_type"][keep]
    i, j = np.triu_indices(keep.size, 1)
    sibling = corr[i, j][sub[i] == sub[j]]
    cousin = corr[i, j][(sub[i] != sub[j]) & (lin[i] == lin[j])]
    other = corr[i, j][lin[i] != lin[j]]
    assert min(sibling.size, cousin.size, other.size) >= 10
    assert sibling.mean() > cousin.mean() + 0.1
    assert cousin.mean() > other.mean() + 0.1
    assert np.median(sibling) > np.percentile(other, 95)


def nearest_centroid_accuracy(L: np.ndarray, labels: np.ndarray) -> float:
    """Two-fold nearest-centroid accuracy on the top 10 PCs of L's 200 most variable genes."""
    centred = L - L.mean(axis=0)
    centred = centred[:, np.argsort(centred.var(axis=0))[::-1][:200]]
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :10] * s[:10]
    fold = np.arange(labels.size) % 2
    correct = 0
    classes = np.unique(labels)
    for f in (0, 1):
        train, test = fold != f, fold == f
        centroids = np.stack([pcs[train & (labels == c)].mean(axis=0) for c in classes])
        dist = ((pcs[test, None, :] - centroids[None]) ** 2).sum(axis=2)
        correct += (classes[dist.argmin(axis=1)] == labels[test]).sum()
    return correct / labels.size


def study_accuracy_within_one_type(adata: ad.AnnData) -> tuple[float, float]:
    """Accuracy predicting study among the cells of the type best spread over >= 3 studies."""
    table = pd.crosstab(adata.obs["cell_type"], adata.obs["study"]).to_numpy()
    well = np.where(table >= 12, table, 0)
    best = np.argmax(np.where((well > 0).sum(axis=1) >= 3, well.sum(axis=1), 0))
    studies = np.flatnonzero(well[best])
    cells = np.flatnonzero(
        (codes(adata, "cell_type") == best) & np.isin(codes(adata, "study"), studies)
    )
    L = lognorm(adata.X[cells].toarray())
    acc = nearest_centroid_accuracy(L, codes(adata, "study")[cells])
    return acc, 1.0 / studies.size


def test_batch_effect_predicts_study_within_a_cell_type():
    """With batch effects, study is predictable inside one type; with them (and depth and soup
    differences) switched off it is at chance: the signal is the planted gene-wise effect."""
    kw = dict(n_cells=2500, n_genes=600, n_cell_types=30, n_subtypes=10, n_lineages=4)
    kw |= dict(n_studies=4, n_libraries=8, seed=3)
    acc, chance = study_accuracy_within_one_type(simulate_atlas(**kw))
    assert acc > 0.9 > chance + 0.5
    flat = dict(depth_range=(2000.0, 2000.0), contamination_range=(0.0, 0.0))
    off = dict(batch_effect_sd=0.0, library_effect_sd=0.0, gene_scaling_sd=0.0)
    acc_off, chance_off = study_accuracy_within_one_type(simulate_atlas(**kw, **flat, **off))
    assert acc_off < chance_off + 0.2
    # the study x lineage effect alone (no per-study gene scaling) is enough
    only = dict(library_effect_sd=0.0, gene_scaling_sd=0.0)
    acc_only, chance_only = study_accuracy_within_one_type(simulate_atlas(**kw, **flat, **only))
    assert acc_only > chance_only + 0.3


def test_batch_effect_is_lineage_specific(atlas):
    """Between two studies, the difference of one type's log-fold change and another
    lineage's type's follows the planted study x lineage effects of those two lineages."""
    tr = atlas.uns["atlas_truth"]
    t, s = codes(atlas, "cell_type"), codes(atlas, "study")
    table = pd.crosstab(t, s).to_numpy()
    lin = tr["lineage_of_type"]
    best, best_n = None, 0
    for s1, s2 in itertools.combinations(range(table.shape[1]), 2):
        n = np.minimum(table[:, s1], table[:, s2])
        for ta, tb in itertools.combinations(np.argsort(n)[::-1][:12], 2):
            if lin[ta] != lin[tb] and min(n[ta], n[tb]) > best_n:
                best, best_n = (s1, s2, ta, tb), min(n[ta], n[tb])
    assert best_n >= 15
    s1, s2, ta, tb = best
    X = atlas.X

    def mean_profile(typ: int, study: int) -> tuple[np.ndarray, np.ndarray]:
        cells = np.flatnonzero((t == typ) & (s == study))
        summed = np.asarray(X[cells].sum(axis=0)).ravel()
        return summed / summed.sum(), summed

    lfc, enough = [], np.ones(X.shape[1], bool)
    for typ in (ta, tb):
        (f1, n1), (f2, n2) = mean_profile(typ, s1), mean_profile(typ, s2)
        enough &= (n1 >= 30) & (n2 >= 30)
        lfc.append(np.log(f1 + 1e-9) - np.log(f2 + 1e-9))
    D = tr["study_lineage_effect"]
    planted_a = D[s1, lin[ta]] - D[s2, lin[ta]]
    planted_b = D[s1, lin[tb]] - D[s2, lin[tb]]
    diff = (lfc[0] - lfc[1])[enough]
    assert enough.sum() >= 100
    right = np.corrcoef(diff, (planted_a - planted_b)[enough])[0, 1]
    # against the wrong second lineage the match drops: the effect is lineage-specific
    others = [a for a in range(D.shape[1]) if a not in (lin[ta], lin[tb])]
    wrong = max(
        np.corrcoef(diff, (planted_a - (D[s1, a] - D[s2, a]))[enough])[0, 1] for a in others
    )
    assert right > 0.65
    assert right > wrong + 0.2


def test_deterministic_for_a_seed():
    kw = dict(n_cells=600, n_genes=200, n_cell_types=20, n_subtypes=8, n_lineages=3)
    kw |= dict(n_studies=3, n_libraries=6)
    a, b, c = (
        simulate_atlas(**kw, seed=5),
        simulate_atlas(**kw, seed=5),
        simulate_atlas(**kw, seed=6),
    )
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.uns["atlas_truth"]["soup"], b.uns["atlas_truth"]["soup"])
    assert (a.X != c.X).nnz > 0.1 * a.X.nnz


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_cells": 100}, "n_cells=100 is too small"),
        ({"n_cells": 5000.5}, "n_cells must be an integer"),
        ({"n_genes": 10}, "n_genes must be >= 50"),
        ({"n_cell_types": 10}, "n_cell_types must be >= 24"),
        ({"n_subtypes": 4}, "n_subtypes must be >= 6"),
        ({"n_studies": 1}, "n_studies must be >= 2"),
        ({"n_libraries": 8}, "n_libraries must be >= 10"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": True}, "seed must be an integer"),
        ({"depth_range": (6000, 800)}, "depth_range must satisfy"),
        ({"depth_range": (0, 800)}, "depth_range low end must be > 0"),
        ({"depth_range": 800}, "depth_range must be a pair"),
        ({"contamination_range": (0.1, 1.0)}, "contamination_range high end must be < 1"),
        ({"contamination_range": (-0.1, 0.1)}, "contamination_range must satisfy"),
        ({"batch_effect_sd": -0.1}, "batch_effect_sd must be finite"),
        ({"gene_scaling_sd": float("nan")}, "gene_scaling_sd must be finite"),
        ({"library_absent_prob": 1.0}, "library_absent_prob must be finite"),
        ({"min_depth": 0.5}, "min_depth must be finite"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate_atlas(**kwargs)
