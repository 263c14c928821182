"""Scale: streamed outputs equal the in-memory computation, bounded inference batches, and
out-of-core training (rows read from disk, block shuffling) matching in-memory training."""

import pickle

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from omegaconf import OmegaConf

from regvi import AmbientRegularizedSCVI
from regvi.config import TrainConfig
from regvi.data.io import OnDiskCsrRows
from regvi.data.loader import CsrMinibatchDataset, _SubsetBatchSampler
from regvi.errors import DataError
from regvi.model import base
from regvi.model.base import inference_batch_size
from regvi.outputs import write_h5ad_atomic
from regvi.run.pipeline import train
from regvi.run.rna import load_input


def test_streamed_normalized_layer_equals_in_memory_result(tmp_path, monkeypatch):
    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.simulate.n_cells, cfg.data.simulate.n_genes = 500, 60
    cfg.data.batch_size, cfg.trainer.max_epochs = 64, 3
    cfg.logger.name, cfg.trainer.enable_progress_bar, cfg.outputs.figures = "none", False, False
    cfg.outputs.batch_size = 77  # several uneven batches
    run_dir = train(cfg, tmp_path / "run")

    with h5py.File(run_dir / "results.h5ad") as f:  # written as a row-chunked dataset
        layer = f["layers/regvi_normalized"]
        assert layer.chunks is not None and np.prod(layer.chunks) * 4 <= 1 << 20
    results = ad.read_h5ad(run_dir / "results.h5ad")
    streamed = results.layers["regvi_normalized"]
    adata = load_input(cfg)
    AmbientRegularizedSCVI.setup_anndata(adata, batch_key="batch")
    model = AmbientRegularizedSCVI.load(run_dir / "model", adata)
    in_memory = model.get_normalized_expression(library_size=1e4, batch_size=1024)
    np.testing.assert_allclose(streamed, in_memory, rtol=1e-5, atol=1e-4)
    backed = ad.read_h5ad(run_dir / "results.h5ad", backed="r")
    np.testing.assert_allclose(
        backed.layers["regvi_normalized"][100:110], in_memory[100:110], rtol=1e-5, atol=1e-4
    )

    # without a batch size, decoding batches shrink with the number of genes (here to 50
    # cells of 60 genes), with the same results
    monkeypatch.setattr(base, "INFERENCE_VALUES_PER_BUFFER", 50 * 60)
    seen, inference = [], model.module.inference
    monkeypatch.setattr(
        model.module, "inference", lambda b: seen.append(b["x"].shape[0]) or inference(b)
    )
    np.testing.assert_allclose(model.get_normalized_expression(), in_memory, rtol=1e-6)
    assert max(seen) == 50 and sum(seen) == adata.n_obs
    seen.clear()
    nll = model.get_reconstruction_error(sample=False)  # deterministic: comparable
    assert max(seen) == 50
    assert nll == pytest.approx(
        model.get_reconstruction_error(batch_size=1024, sample=False), rel=1e-6
    )
    seen.clear()
    model.get_latent_representation()  # encodes only: the full default batch
    assert max(seen) == min(1024, adata.n_obs)


def test_inference_batch_size():
    assert inference_batch_size(None) == 1024
    assert inference_batch_size(None, 2000) == 1024
    assert inference_batch_size(None, 20000) == 209  # 2**22 values per dense buffer
    assert inference_batch_size(None, 20000, most=128) == 128
    assert inference_batch_size(None, 10**9) == 1
    assert inference_batch_size(300, 20000) == 300  # an explicit size is kept
    for bad in (0, -5, 2.5, True):
        with pytest.raises(DataError, match="batch_size"):
            inference_batch_size(bad)


def test_block_shuffling_pools_whole_blocks_and_sees_every_cell_once():
    subset = np.arange(1000, 1103)  # the last block holds 7 cells
    torch.manual_seed(3)
    sampler = _SubsetBatchSampler(subset, 16, True, 2, shuffle_block_cells=8)
    epochs = [list(sampler) for _ in range(2)]
    for fetches in epochs:
        cells = np.concatenate([mb for fetch in fetches for mb in fetch])
        np.testing.assert_array_equal(np.sort(cells), subset)
        assert sum(len(fetch) for fetch in fetches) == sampler.n_minibatches == 7
        for fetch in fetches:
            pooled = np.concatenate(fetch)
            blocks = np.unique((pooled - 1000) // 8)
            assert blocks.size <= pooled.size // 8 + 2  # whole blocks (two cut at the ends)
        # the pooled cells are shuffled across the fetch's minibatches, not block by block
        assert np.unique((fetches[0][0] - 1000) // 8).size > 2
    order = [np.concatenate([mb for fetch in fetches for mb in fetch]) for fetches in epochs]
    assert not np.array_equal(order[0], order[1])
    # without shuffling (validation) blocks play no part
    plain = _SubsetBatchSampler(subset, 16, False, 2, shuffle_block_cells=8)
    np.testing.assert_array_equal(np.concatenate([mb for f in plain for mb in f]), subset)


@pytest.mark.parametrize(
    "n_cells,batch_size,per_fetch", [(129, 128, 1), (257, 128, 2), (193, 64, 2)]
)
def test_a_pass_never_ends_on_a_one_cell_minibatch(n_cells, batch_size, per_fetch):
    # BatchNorm cannot normalise one cell: the last cell joins the minibatch before it
    subset = np.arange(n_cells)
    sampler = _SubsetBatchSampler(subset, batch_size, True, per_fetch)
    fetches = list(sampler)
    minibatches = [mb for fetch in fetches for mb in fetch]
    np.testing.assert_array_equal(np.sort(np.concatenate(minibatches)), subset)
    assert min(mb.size for mb in minibatches) > 1
    assert max(mb.size for mb in minibatches) == batch_size + 1
    assert len(minibatches) == sampler.n_minibatches == -(-n_cells // batch_size) - 1
    assert len(fetches) == len(sampler)
    # a single cell is still one minibatch, and other lengths are cut as before
    assert [mb.size for f in _SubsetBatchSampler(np.arange(1), 128, False) for mb in f] == [1]
    assert [mb.size for f in _SubsetBatchSampler(np.arange(130), 64, False) for mb in f] == [
        64,
        64,
        2,
    ]


def test_on_disk_rows_equal_anndata_rows(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(300, 40, density=0.1, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    X = sp.csr_matrix(sp.diags((np.arange(300) // 10 != 5).astype(np.float32)) @ X)
    X.eliminate_zeros()  # rows 50-59 empty
    ad.AnnData(X=X).write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r").X
    reader = OnDiskCsrRows(backed)
    selections = [
        np.sort(rng.choice(300, 40, replace=False)),
        np.r_[0:5, 48:70, 100, 102, 295:300],  # runs, empty rows, first and last rows
        np.arange(50, 60),
        np.array([], dtype=np.int64),
    ]
    for rows in selections:
        got, expected = reader[rows], X[rows]
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got.indptr, expected.indptr)
        np.testing.assert_array_equal(got.toarray(), expected.toarray())
    # a pickled copy (as sent to spawned data-parallel processes) reopens the file
    copy = pickle.loads(pickle.dumps(CsrMinibatchDataset(backed, {})))
    np.testing.assert_array_equal(copy._rows[selections[1]].toarray(), X[selections[1]].toarray())
    # the default fetch size comes from the file's own entry count, as in memory
    on_disk, in_memory = CsrMinibatchDataset(backed, {}), CsrMinibatchDataset(X, {})
    assert on_disk.entries_per_cell() == pytest.approx(in_memory.entries_per_cell())
    fetch = [np.array([3, 1, 2]), np.array([250, 51, 0])]
    for a, b in zip(on_disk[fetch], in_memory[fetch], strict=True):
        np.testing.assert_array_equal(a["x"].values.numpy(), b["x"].values.numpy())
        np.testing.assert_array_equal(a["x"].flat_index.numpy(), b["x"].flat_index.numpy())


@pytest.mark.parametrize("block_cells,workers", [(None, 0), (16, 0), (16, 1)])
def test_backed_training_matches_in_memory(tmp_path, block_cells, workers):
    """Same loss on the same seed from disk as in memory; with a loader worker process the
    backed run reads through its own file handle."""
    from regvi.datasets import simulate

    adata, _ = simulate(n_cells=400, n_genes=50, n_cell_types=2, n_batches=2, seed=4)
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    runs = {}
    for backed in (False, True):
        cfg = OmegaConf.structured(TrainConfig)
        cfg.data.path, cfg.data.backed, cfg.data.batch_size = str(path), backed, 64
        cfg.data.shuffle_block_cells = block_cells
        cfg.data.num_workers = workers  # a worker draws its seed from the global RNG
        cfg.covariates.batch_key = "batch"
        cfg.trainer.max_epochs, cfg.trainer.enable_progress_bar = 4, False
        cfg.logger.name, cfg.outputs.figures = "none", False
        runs[backed] = train(cfg, tmp_path / f"backed_{backed}")
    in_memory = pd.read_csv(runs[False] / "history.csv")
    backed = pd.read_csv(runs[True] / "history.csv")
    np.testing.assert_allclose(backed["loss_train"], in_memory["loss_train"], rtol=1e-6)
    np.testing.assert_allclose(backed["elbo_validation"], in_memory["elbo_validation"], rtol=1e-6)
    a, b = (ad.read_h5ad(runs[k] / "results.h5ad") for k in (False, True))
    np.testing.assert_allclose(b.obsm["X_regvi"], a.obsm["X_regvi"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())  # X copied from the input file
    np.testing.assert_allclose(
        b.layers["regvi_normalized"], a.layers["regvi_normalized"], rtol=1e-5
    )


def test_inference_keeps_the_order_of_the_indices_given(tmp_path):
    """Outputs for ``indices`` come back in that order (rows are read ascending, then put
    in place), in memory and from disk."""
    from regvi.datasets import simulate

    adata, _ = simulate(n_cells=200, n_genes=30, n_batches=2, seed=0, return_rho=False)
    adata.write_h5ad(tmp_path / "counts.h5ad")
    order = np.array([150, 3, 99, 3, 7, 0])
    for backed in (False, True):
        data = ad.read_h5ad(tmp_path / "counts.h5ad", backed="r" if backed else None)
        AmbientRegularizedSCVI.setup_anndata(data, batch_key="batch")
        model = AmbientRegularizedSCVI(data)
        model.train(max_epochs=1, batch_size=50, accelerator="cpu", enable_progress_bar=False)
        latent = model.get_latent_representation()
        np.testing.assert_allclose(
            model.get_latent_representation(indices=order, batch_size=4), latent[order], atol=1e-6
        )
        normalized = model.get_normalized_expression(indices=order)
        np.testing.assert_allclose(normalized, model.get_normalized_expression()[order], rtol=1e-5)


def test_streamed_layer_replaces_a_layer_of_the_same_name(tmp_path):
    """Training on an earlier run's results.h5ad: its old normalized layer is replaced."""
    adata = ad.AnnData(X=np.ones((5, 3), dtype=np.float32))
    adata.layers["regvi_normalized"] = np.zeros((5, 3), dtype=np.float32)

    def fill(dataset):
        dataset[0:5] = np.full((5, 3), 2.0, dtype=np.float32)

    write_h5ad_atomic(adata, tmp_path / "results.h5ad", {"regvi_normalized": fill})
    np.testing.assert_array_equal(
        ad.read_h5ad(tmp_path / "results.h5ad").layers["regvi_normalized"], 2.0
    )
