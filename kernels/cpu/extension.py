"""The compiled CPU ops (kernels/cpu/*.cpp, one extension), built once per machine on first use.

At one token per step the model's small ops (norms, casts, rotary, cache writes, attention over a
short context) cost more in dispatch than in arithmetic. norm_rotary.cpp fuses them, attention.cpp
is attention over the paged KV cache (decode and prefill), gemm.cpp is the group-quantized GEMM
(kernels/cpu/gemm.py), and decode_layer.cpp runs a whole decoder layer per call for decode
steps (runtime/layers/decode_layer.py). The extension is built with torch's cpp_extension (g++
and ninja; cached under ~/.cache/torch_extensions, one build per CPU feature set and source
version), so the first load on a machine takes about a minute. Without a compiler, or with
LOWBIT_CPU_OPS=0, `load()` returns None and the engine keeps the eager torch path, which computes
the same thing.

References (tests/kernels/test_cpu_ops.py): `add_rms_norm` against F.rms_norm, `rotary_kv_store`
against runtime.layers.rotary.apply_rotary + kernels.kv_store_ref.kv_store_ref, and
`paged_decode_attention` / `paged_prefill_attention` against
kernels.paged_attention_ref.paged_attention_ref and contiguous SDPA.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
from contextlib import suppress
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
# Reductions (dot products, sums) only vectorize when the compiler may reassociate them.
# -fopenmp makes at::parallel_for parallel (without it the header runs the loop on one thread);
# nothing is linked for it: the OpenMP runtime torch already loaded resolves the calls, so the
# ops share torch's threads rather than starting a second pool.
CFLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp"]

# One extension from every source: the decode layer calls the GEMMs and the small ops directly.
SOURCES = (
    "module.cpp",
    "norm_rotary.cpp",
    "attention.cpp",
    "gemm.cpp",
    "ggml_blocks.cpp",
    "decode_layer.cpp",
)
HEADER = "ops.h"


def _build_name() -> str:
    """-march=native builds for this CPU: key the cached build by the CPU's feature flags, so a home
    directory shared with another kind of machine never loads instructions that one lacks; by the
    sources and header, which torch's own rebuild check does not cover (headers); and by where the
    sources are, since torch rebuilds a name whose include path changed: two checkouts sharing one
    name rebuilt it back and forth (~100 s each) whenever both were in use; by torch's version,
    whose C++ ABI the library is built against; and by the compiler flags, which torch's rebuild
    check covers but `_load_built`, importing a noted library directly, does not."""
    key = hashlib.sha256(f"{platform.machine()} {HERE.resolve()} torch {torch.__version__}".encode())
    key.update(" ".join(CFLAGS).encode())
    with suppress(OSError), open("/proc/cpuinfo") as f:
        key.update(next((line for line in f if line.startswith(("flags", "Features"))), "").encode())
    for name in (*SOURCES, HEADER):
        key.update((HERE / name).read_bytes())
    return f"lowbit_cpu_ops_{key.hexdigest()[:12]}"


@cache
def load() -> ModuleType | None:
    """The compiled ops, or None where they are disabled or cannot be built (logged once); the
    engine then runs eager torch ops, which compute the same thing."""
    if os.environ.get("LOWBIT_CPU_OPS", "1") == "0":
        logger.warning("compiled CPU ops disabled (LOWBIT_CPU_OPS=0), using eager torch ops")
        return None
    try:
        name = _build_name()
    except OSError as e:  # an install that left a source out: say so rather than crash the forward
        logger.warning("compiled CPU ops unavailable, using eager torch ops (%s)", e)
        return None
    if (module := _load_built(name)) is not None:
        return module
    try:
        from torch.utils.cpp_extension import load as build_extension

        module = build_extension(
            name=name, sources=[str(HERE / source) for source in SOURCES], extra_cflags=CFLAGS,
            extra_include_paths=[str(HERE)], verbose=False,
        )  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a failed build: the eager path still works
        logger.warning("compiled CPU ops unavailable, using eager torch ops (%s)", str(e).splitlines()[0])
        return None
    if (note := _index(name)) is not None:
        with suppress(OSError):
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(module.__file__)
    return module


def build_needed() -> bool:
    """Whether `load()` would compile the extension (about 100 s) rather than import a previous
    build, so that a caller can say what the wait is for. False where the ops are disabled or
    already loaded. A noted library that exists counts as built (if importing it fails after all,
    `load()` still builds)."""
    if os.environ.get("LOWBIT_CPU_OPS", "1") == "0" or load.cache_info().currsize:
        return False
    try:
        name = _build_name()
    except OSError:  # a source is missing: load() builds nothing
        return False
    if (note := _index(name)) is None:
        return True
    try:
        return not Path(note.read_text()).is_file()
    except OSError:  # no note: never built here (or noted where we cannot read)
        return True


def _index(name: str) -> Path | None:
    """Where the path of build `name`'s shared library is noted once it is built (None without a
    cache directory: no XDG_CACHE_HOME and no home directory)."""
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:
        return None
    return root / "lowbit" / "cpu_ops" / name


def _load_built(name: str) -> ModuleType | None:
    """Build `name`, imported straight from the library a previous process built, or None.
    torch's cpp_extension would find it too, but importing that module pulls in setuptools and
    distutils (~4.5 MiB resident, ~0.1 s) only to learn that nothing needs building. The name
    covers the sources, header, flags, CPU and torch version, so a noted library is never stale."""
    if (note := _index(name)) is None:
        return None
    try:
        library = Path(note.read_text())
        spec = importlib.util.spec_from_file_location(name, library)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (OSError, ImportError):  # not built yet, moved, or built for another torch: build again
        return None
