"""glibc malloc settings for loading a model and for the steps after it (host memory, any device).

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
blocks that size come from the main heap. A load frees many multi-MB temporaries between the
weights it keeps, so the weights end up interleaved with holes the heap can neither reuse nor
return: measured on the default model, 375 MiB resident after load and a 403 MiB load peak,
against 354 and 373 MiB when every block over 128 KiB gets its own mapping during the load.
Inference wants the opposite: a prefill's multi-MB activations mapped fresh each step cost page
faults (measured: a 512-token prefill ran ~40% slower), so after loading, blocks up to 32 MiB
come from the heap again and up to 4 MiB of free heap top is kept for the next step.
Where libc is not glibc (no `mallopt`), nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
LOAD_MMAP_THRESHOLD = 128 << 10
RUN_MMAP_THRESHOLD = 32 << 20
RUN_TRIM_THRESHOLD = 4 << 20


def _libc() -> ctypes.CDLL | None:
    if os.environ.get("LOWBIT_MALLOPT", "1") == "0":  # for A/B measurements
        return None
    return _glibc()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """Opened once: after_step asks on every prefill step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def loading_weights() -> Iterator[None]:
    """Large blocks get their own mappings while loading; on exit, the inference settings."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)  # what load-time temporaries left free in the heap
            libc.mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, RUN_TRIM_THRESHOLD)


# A step with at least this many tokens (a prefill chunk) leaves multi-MB activations freed in the
# middle of the heap, where the trim threshold does not reach; malloc_trim returns their pages.
TRIM_AFTER_TOKENS = 64


def after_step(num_tokens: int) -> None:
    """Return the free heap pages a large step left behind (~1 ms; decode steps skip it)."""
    if num_tokens >= TRIM_AFTER_TOKENS and (libc := _libc()) is not None:
        libc.malloc_trim(0)
