"""Tests of regvi.plots: PNG files written atomically, UMAP computed without side effects."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import silhouette_score

from regvi.datasets import simulate
from regvi.errors import DataError
from regvi.plots import compute_umap, plot_embedding, plot_loss_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path, min_size=(100, 100)):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1]
    assert image.std() > 0.01  # not a blank canvas
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture(scope="module")
def embedded():
    """Simulated data with the true z as representation and its UMAP."""
    adata, truth = simulate(n_cells=500, n_genes=50, n_cell_types=4, n_batches=2, seed=7)
    adata.obsm["X_regvi"] = truth.z.astype(np.float32)
    adata.obs["log_library"] = truth.log_library
    x_before = adata.X.copy()
    embedding = compute_umap(adata, seed=0)
    return adata, truth, embedding, x_before


def make_history(n_epochs=40):
    epoch = np.arange(n_epochs)
    validation = np.where(epoch % 5 == 0, 120.0 - epoch, np.nan)
    return pd.DataFrame(
        {
            "epoch": epoch,
            "loss_train": 100.0 - epoch,
            "loss_validation": validation,
            "reconstruction_loss_train": 90.0 - epoch,
            "reconstruction_loss_validation": validation - 10,
            "kl_z_train": np.linspace(1, 5, n_epochs),
            "kl_library_train": np.full(n_epochs, np.nan),  # all NaN: left out
            "global_penalty_train": np.linspace(3, 2, n_epochs),
            "kl_weight": np.minimum(1.0, epoch / 10),
        }
    )


def test_plot_loss_curves_writes_png(tmp_path):
    path = tmp_path / "curves" / "loss.png"  # directory is created
    result = plot_loss_curves(make_history(), path)
    assert result == path
    assert_valid_png(path)


def test_plot_loss_curves_overwrites_and_handles_sparse_history(tmp_path):
    path = tmp_path / "loss.png"
    plot_loss_curves(make_history(), path)
    first = path.read_bytes()
    one_epoch = pd.DataFrame({"epoch": [0], "loss_train": [5.0], "loss_validation": [np.nan]})
    plot_loss_curves(one_epoch, path)
    assert path.read_bytes() != first
    assert_valid_png(path)
    plot_loss_curves(pd.DataFrame({"epoch": [], "loss_train": []}), path)
    assert_valid_png(path, min_size=(50, 50))


def test_plot_loss_curves_rejects_non_dataframe(tmp_path):
    with pytest.raises(TypeError):
        plot_loss_curves({"loss_train": [1.0]}, tmp_path / "x.png")


def test_failed_save_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "occupied.png"
    target.mkdir()  # a directory cannot be replaced by the file
    with pytest.raises(OSError):
        plot_loss_curves(make_history(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied.png"]


def test_compute_umap_shape_and_side_effects(embedded):
    adata, _, embedding, x_before = embedded
    assert embedding.shape == (adata.n_obs, 2)
    assert np.isfinite(embedding).all()
    np.testing.assert_array_equal(adata.obsm["X_umap"], embedding)
    assert (adata.X != x_before).nnz == 0
    assert len(adata.obsp) == 0 and "neighbors" not in adata.uns and "umap" not in adata.uns


def test_compute_umap_separates_cell_types(embedded):
    _, truth, embedding, _ = embedded
    assert silhouette_score(embedding, truth.cell_type) > 0.2
    # batches are not structure in z, so they should not separate
    assert silhouette_score(embedding, truth.batch) < 0.1


def test_compute_umap_key_added_and_errors(embedded):
    adata, _, _, _ = embedded
    small = adata[:60].copy()
    result = compute_umap(small, n_neighbors=10, key_added="X_other", seed=1)
    assert small.obsm["X_other"].shape == (60, 2)
    np.testing.assert_array_equal(small.obsm["X_other"], result)
    with pytest.raises(DataError, match="X_missing"):
        compute_umap(small, use_rep="X_missing")
    small.obsm["X_bad"] = np.full((60, 3), np.nan)
    with pytest.raises(DataError, match="NaN"):
        compute_umap(small, use_rep="X_bad")


def test_plot_embedding_writes_png(tmp_path, embedded):
    adata, _, _, _ = embedded
    adata = adata.copy()
    adata.obs["many"] = pd.Categorical([f"c{i % 40}" for i in range(adata.n_obs)])  # no legend
    adata.obs["with_missing"] = pd.Categorical(
        np.where(np.arange(adata.n_obs) % 3 == 0, None, "a"), categories=["a"]
    )
    path = tmp_path / "umap.png"
    result = plot_embedding(
        adata,
        ["cell_type", "batch", "log_library", "many", "with_missing"],
        path,
        title_prefix="test: ",
    )
    assert result == path
    assert_valid_png(path, min_size=(300, 300))
    # a single key as a string, another basis
    other = plot_embedding(adata, "cell_type", tmp_path / "z.png", basis="true_z")
    assert_valid_png(other)


def test_plot_embedding_errors(tmp_path, embedded):
    adata, _, _, _ = embedded
    with pytest.raises(DataError, match="not_a_column"):
        plot_embedding(adata, ["cell_type", "not_a_column"], tmp_path / "a.png")
    with pytest.raises(DataError, match="X_nope"):
        plot_embedding(adata, ["cell_type"], tmp_path / "b.png", basis="X_nope")
    assert list(tmp_path.iterdir()) == []
