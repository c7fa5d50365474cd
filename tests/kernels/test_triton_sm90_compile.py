"""Every Triton kernel compiles for sm_90 (H100/H200), on a machine without a GPU.

The other kernel tests run under TRITON_INTERPRET=1, which accepts Triton that no GPU compiler would
(non-power-of-two aranges, tl.dot shapes under 16, dtype mismatches, unsupported ops) and never sees
shared memory or registers. Here tests/kernels/triton_aot.py drives each module's real launchers the
way the engine calls them (fp16 / bf16 activations, fp16 / bf16 / int8 KV caches, at least one fp32
variant per kernel; SmolLM2-135M and Llama-3-8B-class shapes), records the launches instead of
running them, and compiles each distinct one with Triton's compiler and bundled ptxas for sm_90.
It runs in a child process because `triton.jit` chooses interpreter or compiler when a kernel module
is imported, and conftest.py set TRITON_INTERPRET=1 before that happened in this process.

Checked per compiled kernel: it compiles (through ptxas to a cubin); its shared memory fits one
block on sm_90 (227 KiB; 228 KiB per SM); its registers x threads fit the SM's 64K registers (else
the launch fails); and, for fp16/bf16 variants, ptxas reports no register spills. fp32 variants
(the exact reference mode, IEEE dots on FMA units) may spill: that is reported as a warning, not a
failure. Triton without the AOT API (ASTSource, GPUTarget, a bundled ptxas) skips with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from lowbit.kernels.triton_support import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

SCRIPT = Path(__file__).with_name("triton_aot.py")
REPO = Path(__file__).resolve().parents[2]
MODULES = [
    "triton_act_quant",
    "triton_w8a8",
    "triton_kv_store",
    "triton_decode_attention",
    "triton_prefill_attention",
    "triton_rms_norm",
    "triton_rotary",
    "triton_w4a16",
    "triton_ggml",
]
# sm_90 limits (CUDA programming guide, compute capability 9.0).
MAX_SHARED_PER_BLOCK = 227 * 1024  # bytes, opt-in maximum; an SM has 228 KiB
REGISTERS_PER_SM = 64 * 1024  # 32-bit registers; one block must fit
TIMEOUT_S = 600  # a hang, not a slow machine: the whole compile takes ~1 minute on 2 cores


def _selected_modules(request: pytest.FixtureRequest) -> list[str]:
    """The modules whose tests this session runs, so `-k w8a8` compiles only that file's kernels."""
    here = [item for item in request.session.items if item.path == request.node.path]
    chosen = {item.callspec.params["module"] for item in here if hasattr(item, "callspec")}
    return sorted(chosen) or MODULES


@pytest.fixture(scope="module")
def aot_results(request: pytest.FixtureRequest) -> list[dict]:
    """Compile the selected modules' kernels in one child process (one torch + triton import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="lowbit-sm90-") as tmp:
        out = Path(tmp) / "results.json"
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), *_selected_modules(request)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
        if proc.returncode != 0 or not out.exists():
            pytest.fail(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                f"stderr:\n{proc.stderr[-6000:]}"
            )
        payload = json.loads(out.read_text())
    if "skip" in payload:
        pytest.skip(f"no ahead-of-time compile for sm_90: {payload['skip']}")
    return payload["results"]


def _describe(r: dict) -> str:
    where = "; ".join(r["labels"]) or "-"
    if "num_warps" not in r:
        return f"{r['kernel']} [{where}]"
    consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
    return f"{r['kernel']}[{consts}, num_warps={r['num_warps']}, num_stages={r['num_stages']}] [{where}]"


def _spills(r: dict) -> int:
    return (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)


def _problems(r: dict) -> list[str]:
    if not r["ok"]:
        return [f"{_describe(r)}: {r['error']}"]
    problems = []
    if r["shared"] > MAX_SHARED_PER_BLOCK:
        problems.append(f"{_describe(r)}: {r['shared']} bytes of shared memory > {MAX_SHARED_PER_BLOCK}")
    if r["registers"] is not None:
        # Registers are allocated per thread in multiples of 8.
        per_block = -(-r["registers"] // 8) * 8 * 32 * r["num_warps"]
        if per_block > REGISTERS_PER_SM:
            problems.append(
                f"{_describe(r)}: {r['registers']} registers x {32 * r['num_warps']} threads = {per_block} "
                f"> {REGISTERS_PER_SM}: the launch would fail"
            )
    if r["strict"] and _spills(r):
        problems.append(
            f"{_describe(r)}: ptxas spills ({r['registers']} registers, {r['spill_stores']} bytes spill "
            f"stores, {r['spill_loads']} bytes spill loads, {r['stack_frame']} bytes stack frame)"
        )
    return problems


@pytest.mark.parametrize("module", MODULES)
def test_compiles_for_sm90(module: str, aot_results: list[dict]) -> None:
    results = [r for r in aot_results if r["module"] == module]
    assert results, f"tests/kernels/triton_aot.py launched no kernel of {module}"
    for r in results:
        if r["ok"] and not r["strict"] and _spills(r):
            warnings.warn(
                f"sm_90 {_describe(r)}: ptxas spills ({r['registers']} registers, {r['spill_stores']} bytes "
                f"spill stores, {r['spill_loads']} bytes spill loads); not a failure for fp32",
                stacklevel=1,
            )
    problems = [p for r in results for p in _problems(r)]
    assert not problems, f"{module} for sm_90:\n" + "\n".join(problems)
