"""Keep freed host memory for reuse while training (glibc's malloc only).

A training step allocates and frees the same cells x features buffers every step. glibc
serves blocks above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns them
with ``munmap`` on free, so every such buffer is page-faulted and zero-filled by the kernel
again on every step: at 20k genes and batch 1024 (80 MB per buffer) that dominated the step
time. Inside :func:`reuse_host_memory` malloc takes large blocks from the heap and keeps freed
memory there, so the buffers of one step are reused by the next. Smaller buffers suffer too:
heap memory freed at the top beyond glibc's (dynamic) trim threshold is returned to the
kernel, and at a few MB a buffer (2k genes at batch 1024, 20k genes at batch 128) that meant
thousands of page faults a step, their cost varying from run to run (the measurements are in
``docs/performance.md``). On exit the previous settings are restored and the unused heap is
returned to the system. Elsewhere (macOS, musl, Windows) it does nothing.

It changes the whole process's allocator, so the library's ``train()`` does not apply it:
the command-line run wraps training in it (``trainer.reuse_host_memory``), and a script
can too::

    with reuse_host_memory():
        model.train(...)

glibc has no call to read its malloc settings back, so "previous" means: those set by an
enclosing :func:`reuse_host_memory` block (nesting is safe), or else those the process
started with: glibc's defaults, or the ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_MAX_``
environment variables and the ``glibc.malloc.trim_threshold`` / ``glibc.malloc.mmap_max``
tunables of ``GLIBC_TUNABLES`` where they are set. (Any explicit trim threshold, this one
included, also stops glibc adjusting its mmap threshold dynamically for the rest of the
process; glibc offers no call to turn that back on.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# the settings inside a reuse_host_memory block
_REUSE_SETTINGS = (0, 2**31 - 1)

# (mmap max, trim threshold) of each enclosing reuse_host_memory block, innermost last
_active: list[tuple[int, int]] = []


def startup_settings(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The ``(M_MMAP_MAX, M_TRIM_THRESHOLD)`` glibc's malloc started this process with:
    its defaults unless the environment (``environ``, default ``os.environ``) set them."""
    environ = os.environ if environ is None else environ
    values = {"mmap_max": _DEFAULT_MMAP_MAX, "trim_threshold": _DEFAULT_TRIM_THRESHOLD}
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        for key in values:
            if name.strip() == f"glibc.malloc.{key}":
                values[key] = _integer(value, values[key])
    # the MALLOC_*_ variables take precedence over the tunables (glibc's rule)
    values["mmap_max"] = _integer(environ.get("MALLOC_MMAP_MAX_"), values["mmap_max"])
    values["trim_threshold"] = _integer(
        environ.get("MALLOC_TRIM_THRESHOLD_"), values["trim_threshold"]
    )
    return values["mmap_max"], values["trim_threshold"]


def _integer(text: str | None, default: int) -> int:
    try:
        return int(text, 0) if text else default
    except ValueError:
        return default


def current_settings() -> tuple[int, int]:
    """The ``(M_MMAP_MAX, M_TRIM_THRESHOLD)`` in force now, as far as this module knows:
    the innermost open :func:`reuse_host_memory` block's, or :func:`startup_settings`."""
    return _active[-1] if _active else startup_settings()


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def _set(libc: ctypes.CDLL, settings: tuple[int, int]) -> None:
    mmap_max, trim_threshold = settings
    libc.mallopt(_M_MMAP_MAX, mmap_max)
    libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


@contextmanager
def reuse_host_memory(enabled: bool = True) -> Iterator[None]:
    """Within the block, freed host memory stays in the heap for the next allocation; on
    exit the previous settings (see the module notes) are restored. ``enabled=False``, or
    an allocator other than glibc's, makes it a no-op."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    previous = current_settings()
    _set(libc, _REUSE_SETTINGS)
    _active.append(_REUSE_SETTINGS)
    try:
        yield
    finally:
        _active.pop()
        _set(libc, previous)
        if not _active:
            libc.malloc_trim(0)
