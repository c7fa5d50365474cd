"""Fused CPU ops for the decode step (kernels/cpu_ops.cpp), compiled once per machine on first use.

At one token per step the model's small ops (norms, casts, rotary, cache writes, attention over a
short context) cost more in dispatch than in arithmetic; these three ops replace ~25 eager ops
per layer. The extension is built with torch's cpp_extension (g++ and ninja; cached under
~/.cache/torch_extensions, one build per CPU feature set), so the first load on a machine takes
about 30 s. Without a compiler, or with LOWBIT_CPU_OPS=0, `load()` returns None and the engine
keeps the eager torch path, which computes the same thing.

References (tests/kernels/test_cpu_ops.py): `add_rms_norm` against F.rms_norm, `rotary_kv_store`
against runtime.layers.rotary.apply_rotary + kernels.kv_store.kv_store_ref, and
`paged_decode_attention` against kernels.paged_attention.paged_attention_ref.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from contextlib import suppress
from functools import cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_ops.cpp")
# Reductions (dot products, sums) only vectorize when the compiler may reassociate them.
CFLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


def _build_name() -> str:
    """-march=native builds for this CPU: key the cached build by the CPU's feature flags, so a home
    directory shared with another kind of machine never loads instructions that one lacks."""
    flags = platform.machine()
    with suppress(OSError), open("/proc/cpuinfo") as f:
        flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    return f"lowbit_cpu_ops_{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


@cache
def load() -> ModuleType | None:
    """The compiled ops, or None where they are disabled or cannot be built (logged once)."""
    if os.environ.get("LOWBIT_CPU_OPS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build

        return build(name=_build_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the eager path still works
        logger.warning("fused CPU ops unavailable, using eager torch ops (%s)", str(e).splitlines()[0])
        return None
