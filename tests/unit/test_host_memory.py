"""runtime/host_memory.py against the kernel's own accounting of this process (/proc/self/status)."""

from __future__ import annotations

import ctypes

import pytest

from lowbit.runtime import host_memory


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.fixture
def libc():
    lib = host_memory._libc()
    if lib is None:
        pytest.skip("not glibc")
    return lib


def test_after_a_large_step_freed_heap_pages_go_back(libc):
    """Blocks under the run-time mmap threshold come from the heap; once freed behind a block still
    held, only malloc_trim returns their pages, and after_step does it for a prefill-sized step."""
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    with host_memory.loading_weights():
        pass  # leaves the run-time settings
    blocks = [libc.malloc(1 << 20) for _ in range(49)]
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    # Keep the highest block, wherever earlier tests left holes in the heap: the 48 freed below it
    # cannot go back by shrinking the heap top.
    keep = max(blocks)
    for b in blocks:
        if b != keep:
            libc.free(b)
    before = _rss_anon_kib()
    host_memory.after_step(host_memory.TRIM_AFTER_TOKENS)
    after = _rss_anon_kib()
    libc.free(keep)
    assert before - after > 32 << 10, (before, after)  # most of the 48 MiB came back


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_MALLOPT", "0")
    assert host_memory._libc() is None
