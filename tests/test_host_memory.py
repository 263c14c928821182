"""Training keeps large freed host buffers for reuse instead of re-faulting them each step."""

import resource

import pytest
import torch

from regvi.train.host_memory import _glibc, reuse_host_memory


def _page_faults_of_a_fresh_buffer(n_floats: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n_floats)  # allocated, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc() is None, reason="glibc malloc only")
def test_large_buffers_are_reused_inside_the_training_scope():
    n = 16 * 2**20  # 64 MB: above glibc's largest mmap threshold

    def fewest_faults(repeats: int = 4) -> int:
        return min(_page_faults_of_a_fresh_buffer(n) for _ in range(repeats))

    # The fewest faults over a few allocations: a small allocation left just after a freed
    # block can strand it (the next aligned request of the same size no longer fits), so
    # the heap settles after a few blocks, as in training, where every step repeats the last.
    # Outside the scope no allocation is ever served without faulting.
    outside = fewest_faults()
    with reuse_host_memory():
        fewest_faults(6)  # warm-up
        inside = fewest_faults()
    after = _page_faults_of_a_fresh_buffer(n)
    # outside: every page of the mmap-ed buffer faults again (16k 4 kB pages, or 32 huge
    # pages where transparent huge pages are always on)
    assert outside >= 32
    assert inside * 10 < outside  # the freed heap block was reused
    assert after * 2 > outside  # defaults are back on exit


def test_disabled_or_unsupported_is_a_no_op():
    with reuse_host_memory(enabled=False):
        assert torch.ones(3).sum() == 3
