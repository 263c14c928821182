"""Training keeps large freed host buffers for reuse instead of re-faulting them each step."""

import resource

import pytest
import torch

from regvi.train import host_memory
from regvi.train.host_memory import _glibc, reuse_host_memory, startup_settings

N_FLOATS = 16 * 2**20  # 64 MB: above glibc's largest mmap threshold


def _page_faults_of_a_fresh_buffer(n_floats: int = N_FLOATS) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n_floats)  # allocated, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _fewest_faults(repeats: int = 4) -> int:
    # The fewest faults over a few allocations: a small allocation left just after a freed
    # block can strand it (the next aligned request of the same size no longer fits), so
    # the heap settles after a few blocks, as in training, where every step repeats the last.
    return min(_page_faults_of_a_fresh_buffer() for _ in range(repeats))


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_large_buffers_are_reused_inside_the_training_scope():
    # Outside the scope no allocation is ever served without faulting.
    outside = _fewest_faults()
    with reuse_host_memory():
        _fewest_faults(6)  # warm-up
        inside = _fewest_faults()
    after = _page_faults_of_a_fresh_buffer()
    # outside: every page of the mmap-ed buffer faults again (16k 4 kB pages, or 32 huge
    # pages where transparent huge pages are always on)
    assert outside >= 32
    assert inside * 10 < outside  # the freed heap block was reused
    assert after * 2 > outside  # defaults are back on exit


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_nested_scopes_restore_the_enclosing_settings():
    outside = _fewest_faults()
    with reuse_host_memory():
        with reuse_host_memory():
            _fewest_faults(6)
        # the inner block's exit restored the outer block's settings, not glibc's defaults
        assert host_memory.current_settings() == host_memory._REUSE_SETTINGS
        _fewest_faults(6)
        still_inside = _fewest_faults()
    assert still_inside * 10 < outside
    assert host_memory.current_settings() == startup_settings()
    assert _page_faults_of_a_fresh_buffer() * 2 > outside


def test_previous_settings_come_from_the_environment_when_set():
    assert startup_settings({}) == (65536, 128 * 1024)
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576:glibc.malloc.mmap_max=7"}
    assert startup_settings(tunables) == (7, 1048576)
    # glibc's MALLOC_*_ variables win over the tunables; junk is ignored
    env = {**tunables, "MALLOC_TRIM_THRESHOLD_": "4096", "MALLOC_MMAP_MAX_": "junk"}
    assert startup_settings(env) == (7, 4096)


def test_disabled_or_unsupported_is_a_no_op():
    with reuse_host_memory(enabled=False):
        assert torch.ones(3).sum() == 3
    assert host_memory.current_settings() == startup_settings()


def test_train_no_longer_changes_the_allocator():
    from regvi import AmbientRegularizedSCVI
    from regvi.datasets import simulate

    adata, _ = simulate(n_cells=64, n_genes=20, n_batches=1, seed=0, return_rho=False)
    AmbientRegularizedSCVI.setup_anndata(adata)
    model = AmbientRegularizedSCVI(adata, n_latent=2, n_hidden=8)
    with pytest.warns(DeprecationWarning, match="reuse_host_memory"):
        model.train(max_epochs=1, batch_size=32, enable_progress_bar=False, reuse_host_memory=True)
    assert host_memory._active == []
