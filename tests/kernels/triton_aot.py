"""Compile lowbit's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

Run by tests/kernels/test_triton_sm90_compile.py in a child process with TRITON_INTERPRET unset:
`triton.jit` picks the interpreter or the compiler when a kernel is decorated, and the test process
has TRITON_INTERPRET=1. By hand (from the repository root):
    env -u TRITON_INTERPRET python tests/kernels/triton_aot.py --out results.json [triton_w8a8 ...]

How. Each case calls a module's real launcher on CPU tensors laid out the way the engine lays them
out (SmolLM2-135M and Llama-3-8B-class shapes; q/k/v as views into the fused qkv buffer), with
`JITFunction.run` replaced by a recorder. So the constexprs, num_warps and num_stages are whatever
the launcher chooses, and this check follows the code when block sizes are retuned. Each recorded
launch is specialised by the kernel's own binder, as Triton's launch path does (argument dtypes,
ints equal to 1, 16-divisibility of ints and pointers), and compiled with `triton.compile` for
GPUTarget("cuda", 90, 32) down to a cubin with Triton's bundled ptxas, whose -v log gives registers
and spills. Launchers that size split-K from the SM count see an H100/H200's 132 SMs.

Output (the --out file): {"skip": reason} when this Triton cannot compile ahead of time, else
{"results": [...]}: one dict per distinct compiled kernel (see `_compile`), plus failed entries for
launchers that raised and for kernels of a module that no case launched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import torch

ARCH = 90
GPU_SMS = 132  # H100 SXM and H200
# Model shapes: the default model (SmolLM2-135M) and a Llama-3-8B-class model.
SMOL = dict(hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536)
LLAMA = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336)
KV_BLOCK = 16  # runtime.config's default KV cache block size
F16, BF16, F32, I8 = torch.float16, torch.bfloat16, torch.float32, torch.int8
HALF = (F16, BF16)


# --- recording launches ------------------------------------------------------------------------------


@dataclass
class Launch:
    """One distinct specialisation of a kernel, as Triton's launch path would compile it."""

    module: str
    fn: Any  # JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any  # the backend's options object
    labels: list[str] = field(default_factory=list)
    strict: bool = False  # used by a 16-bit variant: spills are an error


class Recorder:
    def __init__(self, target: Any) -> None:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.backend = make_backend(target)
        self._make_binder = create_function_from_signature
        self._binders: dict[int, Callable] = {}
        self.launches: dict[str, Launch] = {}
        self.errors: list[dict] = []  # launchers that raised instead of launching
        self.module = self.label = ""
        self.strict = True

    @contextlib.contextmanager
    def variant(self, label: str, dtype: torch.dtype) -> Iterator[None]:
        """Launches inside are named `label`; spills are errors when `dtype` (the activations') is
        16-bit. A launcher that raises is recorded as a failure of this variant; the next one runs."""
        self.label, self.strict = label, dtype in HALF
        try:
            yield
        except Exception as e:
            self.errors.append({"module": self.module, "kernel": "<launcher>", "labels": [label], "ok": False,
                                "error": _short(f"{type(e).__name__}: {e}")})  # fmt: skip
        finally:
            self.label, self.strict = "", True

    def record(self, fn: Any, args: tuple, kwargs: dict) -> None:
        """JITFunction.run up to the compile, without a driver (see triton/runtime/jit.py)."""
        from triton import knobs

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = self._binders[id(fn)] = self._make_binder(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        key = f"{self.module} {fn.__name__} {specialization} {options}"
        launch = self.launches.get(key)
        if launch is None:
            options, signature, constexprs, attrs = fn._pack_args(
                self.backend, kwargs, bound_args, specialization, options
            )
            launch = self.launches[key] = Launch(self.module, fn, signature, constexprs, attrs, options)
        launch.labels.append(self.label)
        launch.strict = launch.strict or self.strict


def _install(recorder: Recorder) -> None:
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, kwargs)

    JITFunction.run = run


def _uncovered(module: str, launched: set[str]) -> list[str]:
    """The module's kernels (jit functions launched as `name[grid]` in its source) that no case launched."""
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(f"lowbit.kernels.{module}")
    source = inspect.getsource(mod)
    jitted = [name for name, obj in vars(mod).items() if isinstance(obj, JITFunction)]
    return sorted({name for name in jitted if f"{name}[" in source} - launched)


# --- compiling ---------------------------------------------------------------------------------------

_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _short(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2 :]


def _compile(launch: Launch, target: Any) -> dict:
    import triton
    from triton.compiler import ASTSource

    # Top-level constexprs by name (keys are argument paths; only tuple arguments have longer ones).
    named = {launch.fn.arg_names[k[0]]: repr(v) for k, v in launch.constexprs.items() if len(k) == 1}
    result: dict[str, Any] = {
        "module": launch.module,
        "kernel": launch.fn.__name__,
        "labels": launch.labels,
        "strict": launch.strict,
        "num_warps": launch.options.num_warps,
        "num_stages": launch.options.num_stages,
        "constexprs": {k: v for k, v in named.items() if not k.startswith("stride")},
        "pointers": {k: v for k, v in launch.signature.items() if v.startswith("*")},
    }
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # TRITON_DUMP_PTXAS_LOG makes make_cubin print ptxas -v's log to stdout: catch it here.
        with contextlib.redirect_stdout(log):
            src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
            kernel = triton.compile(src, target=target, options=launch.options.__dict__)
    except Exception as e:
        result.update(ok=False, error=_short(f"{type(e).__name__}: {e}"))
        return result
    finally:
        result["seconds"] = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    spills, regs = _SPILLS.search(text), _REGS.search(text)
    ptx = kernel.asm.get("ptx", "")
    result.update(
        ok=True,
        shared=kernel.metadata.shared,
        registers=int(regs.group(1)) if regs else None,  # None: no ptxas log (another Triton version)
        stack_frame=int(spills.group(1)) if spills else None,
        spill_stores=int(spills.group(2)) if spills else None,
        spill_loads=int(spills.group(3)) if spills else None,
        mma="wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None,
    )
    return result


_POOL: tuple[list[Launch], Any] | None = None  # what forked workers compile, by index


def _compile_index(i: int) -> dict:
    assert _POOL is not None
    launches, target = _POOL
    return _compile(launches[i], target)


def _compile_all(launches: list[Launch], target: Any, jobs: int) -> list[dict]:
    """Compile every launch, in `jobs` forked workers (the recorded launches are not picklable)."""
    global _POOL
    if jobs <= 1 or len(launches) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_compile(launch, target) for launch in launches]
    _POOL = (launches, target)
    # Slowest first (the dot kernels), so no worker is left with a long compile at the end.
    order = sorted(range(len(launches)), key=lambda i: "dot" not in str(launches[i].fn.src))
    results: list[dict] = [{} for _ in launches]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {i: pool.submit(_compile_index, i) for i in order}
        for i, future in futures.items():
            try:
                results[i] = future.result()
            except BrokenProcessPool:  # a crash inside Triton or ptxas takes the worker (and the pool) down
                launch = launches[i]
                error = "the compiling process died (a crash in Triton or ptxas); --jobs 1 shows which kernel"
                results[i] = {"module": launch.module, "kernel": launch.fn.__name__, "labels": launch.labels,
                              "ok": False, "error": error}  # fmt: skip
    return results


def _aot_unavailable() -> str | None:
    """Why this Triton cannot compile for sm_90 here, or None."""
    try:
        import triton
    except ImportError as e:
        return f"triton is not importable: {e}"
    missing = []
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        missing.append("triton.backends.compiler.GPUTarget")
    try:
        from triton.compiler import ASTSource, make_backend  # noqa: F401
    except ImportError:
        missing.append("triton.compiler.ASTSource/make_backend")
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        if not hasattr(JITFunction, "_pack_args"):
            missing.append("triton.runtime.jit.JITFunction._pack_args")
    except ImportError:
        missing.append("triton.runtime.jit.create_function_from_signature")
    if missing:
        return f"triton {triton.__version__} lacks the AOT API this check uses: {', '.join(missing)}"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(ARCH).path
    except Exception as e:
        return f"triton {triton.__version__} has no usable NVIDIA backend / bundled ptxas for sm_{ARCH}: {e}"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"no executable ptxas for sm_{ARCH} (triton {triton.__version__} found {ptxas!r})"
    return None


# --- cases: the launchers, called the way the engine calls them --------------------------------------

CASES: dict[str, Callable[[Recorder], None]] = {}


def case(module: str) -> Callable:
    def register(fn: Callable[[Recorder], None]) -> Callable[[Recorder], None]:
        CASES[module] = fn
        return fn

    return register


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _qkv(model: dict, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The fused qkv projection viewed as heads [T, H + 2 Hkv, D], and q, k, v as views into it."""
    h, hkv, d = model["heads"], model["kv_heads"], model["head_dim"]
    heads = torch.zeros(tokens, h + 2 * hkv, d, dtype=dtype)
    return heads, heads[:, :h], heads[:, h : h + hkv], heads[:, h + hkv :]


def _cache(model: dict, dtype: torch.dtype, num_blocks: int) -> tuple:
    """(k_cache, v_cache, k_scale, v_scale) as runtime.kv_cache makes them: [num_blocks, KV_BLOCK, Hkv, D]."""
    shape = (num_blocks, KV_BLOCK, model["kv_heads"], model["head_dim"])
    k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    if dtype != I8:
        return k, v, None, None
    return k, v, torch.ones(shape[:3]), torch.ones(shape[:3])


def _group(model: dict) -> int:
    return model["heads"] // model["kv_heads"]


def _patch_sm_count(module: Any, name: str) -> None:
    """Launchers that size split-K from the SM count see an H100/H200 (their CPU fallback is tiny)."""
    if not hasattr(module, name):  # a rename must not silently compile the 1-SM launches instead
        raise AttributeError(f"{module.__name__} has no {name}")
    setattr(module, name, lambda device: GPU_SMS)


@case("triton_act_quant")
def _act_quant(rec: Recorder) -> None:
    from lowbit.kernels.triton_act_quant import quantize_per_token_triton, rms_norm_quant_triton

    # Per-token quantization of o_proj / down_proj inputs: one tile (2 and 8 warps), the looped path.
    widths = [(F16, SMOL["hidden"]), (BF16, LLAMA["hidden"]), (BF16, LLAMA["ffn"]), (F32, LLAMA["hidden"])]
    for dtype, width in widths:
        with rec.variant(f"quantize_per_token {_name(dtype)} K={width}", dtype):
            quantize_per_token_triton(torch.zeros(8, width, dtype=dtype))
    # The norm before q/k/v and gate/up; the first layer has no residual yet. 16384 takes the looped path.
    for dtype, hidden, has_residual, smooth in [
        (F16, SMOL["hidden"], True, False), (BF16, LLAMA["hidden"], False, False),
        (BF16, LLAMA["hidden"], True, True), (F16, 8192, True, False), (BF16, 16384, True, False),
        (F32, 16384, True, True),
    ]:  # fmt: skip
        label = f"rms_norm_quant {_name(dtype)} hidden={hidden} residual={has_residual} smooth={smooth}"
        with rec.variant(label, dtype):
            res = torch.zeros(8, hidden) if has_residual else None
            s = torch.ones(hidden) if smooth else None
            rms_norm_quant_triton(torch.zeros(8, hidden, dtype=dtype), torch.ones(hidden), 1e-5, res, s)


@case("triton_w8a8")
def _w8a8(rec: Recorder) -> None:
    from lowbit.kernels.triton_w8a8 import pack_w8a8_triton, w8a8_gemm_triton, w8a8_matmul_triton

    n, k = LLAMA["hidden"], LLAMA["hidden"]
    packed = pack_w8a8_triton(torch.zeros(n, k, dtype=I8), torch.ones(n, 1))
    # Batch 1 decode (M == 1 specialises), then the small / medium / large tile configs.
    for m, dtypes in [(1, (BF16,)), (16, (F16,)), (64, (BF16,)), (512, (F16, BF16, F32))]:
        for dtype in dtypes:
            with rec.variant(f"w8a8_gemm out={_name(dtype)} M={m} N={n} K={k}", dtype):
                w8a8_gemm_triton(torch.zeros(m, k, dtype=I8), torch.ones(m, 1), packed, out_dtype=dtype)
    with rec.variant("w8a8_matmul float16 M=64 with bias", F16):
        w8a8_matmul_triton(torch.zeros(64, k, dtype=F16), packed, torch.zeros(n, dtype=F16))


@case("triton_kv_store")
def _kv_store(rec: Recorder) -> None:
    from lowbit.kernels.triton_kv_store import kv_store_triton

    variants = [(SMOL, F16, F16), (SMOL, BF16, I8), (LLAMA, BF16, BF16), (LLAMA, F16, I8)]
    variants += [(LLAMA, F32, F32), (LLAMA, F32, I8), (LLAMA, F16, F32)]
    for model, dtype, cache_dtype in variants:
        label = f"kv_store {_name(dtype)} -> {_name(cache_dtype)} cache, Hkv={model['kv_heads']}"
        label += f" D={model['head_dim']}"
        with rec.variant(label, dtype):
            _, _, k, v = _qkv(model, 4, dtype)
            kc, vc, ks, vs = _cache(model, cache_dtype, 8)
            kv_store_triton(k, v, kc, vc, torch.arange(4, dtype=torch.int64), ks, vs)


@case("triton_decode_attention")
def _decode(rec: Recorder) -> None:
    from lowbit.kernels import triton_decode_attention as mod

    _patch_sm_count(mod, "_sm_count")
    d256 = dict(LLAMA, head_dim=256)
    # (model, q dtype, cache dtype, batch): batch 1 at 2k context takes split-K and the reduce kernel
    # (the launcher's split heuristic, at 132 SMs), batch 64 the direct (one split) path.
    variants = [(LLAMA, F16, F16, 1), (LLAMA, F16, I8, 64), (LLAMA, BF16, BF16, 64), (LLAMA, BF16, I8, 1)]
    variants += [(SMOL, F16, F16, 64), (d256, BF16, BF16, 1), (LLAMA, F32, I8, 1)]
    for model, dtype, cache_dtype, batch in variants:
        d, context = model["head_dim"], 2048 if batch == 1 else 256
        label = (f"decode q={_name(dtype)} cache={_name(cache_dtype)} G={_group(model)} D={d} "
                 f"batch={batch} context={context}")  # fmt: skip
        with rec.variant(label, dtype):
            blocks = context // KV_BLOCK
            _, q, _, _ = _qkv(model, batch, dtype)
            kc, vc, ks, vs = _cache(model, cache_dtype, blocks)  # every sequence reads the same blocks
            tables = torch.arange(blocks, dtype=torch.int32).repeat(batch, 1)  # [batch, blocks]
            lens = torch.full((batch,), context, dtype=torch.int32)
            mod.paged_decode_attention_triton(q, kc, vc, tables, lens, d**-0.5, ks, vs)


@case("triton_prefill_attention")
def _prefill(rec: Recorder) -> None:
    from lowbit.kernels.triton_prefill_attention import prefill_attention_triton

    # max_query_len 512: full tiles; 1: decode rows in a mixed batch (the smallest tile).
    variants = [(LLAMA, F16, F16, 512), (LLAMA, BF16, BF16, 512), (LLAMA, BF16, I8, 512), (LLAMA, F16, I8, 1)]
    variants += [(SMOL, F16, F16, 512), (LLAMA, F32, I8, 512)]
    variants += [(dict(SMOL, head_dim=96), F16, F16, 512)]  # D padded to BLOCK_D = 128
    for model, dtype, cache_dtype, max_query_len in variants:
        d = model["head_dim"]
        label = (f"prefill q={_name(dtype)} cache={_name(cache_dtype)} G={_group(model)} D={d} "
                 f"max_query_len={max_query_len}")  # fmt: skip
        with rec.variant(label, dtype):
            batch, context = 2, max_query_len + 64  # a cached prefix before each sequence's queries
            blocks = -(-context // KV_BLOCK)
            _, q, _, _ = _qkv(model, batch * max_query_len, dtype)
            kc, vc, ks, vs = _cache(model, cache_dtype, batch * blocks)
            tables = torch.arange(batch * blocks, dtype=torch.int32).reshape(batch, blocks)
            starts = torch.arange(batch + 1, dtype=torch.int32) * max_query_len
            lens = torch.full((batch,), context, dtype=torch.int32)
            prefill_attention_triton(q, kc, vc, tables, starts, lens, max_query_len, d**-0.5, ks, vs)


@case("triton_rms_norm")
def _rms_norm(rec: Recorder) -> None:
    from lowbit.kernels.triton_rms_norm import add_rms_norm_triton

    for dtype, hidden, has_residual in [
        (F16, SMOL["hidden"], True), (BF16, SMOL["hidden"], False), (F16, LLAMA["hidden"], False),
        (BF16, LLAMA["hidden"], True), (F16, 8192, True), (BF16, 8192, True), (BF16, 16384, True),
        (F16, 16384, False), (F32, LLAMA["hidden"], True), (F32, 16384, True),
    ]:  # fmt: skip
        with rec.variant(f"add_rms_norm {_name(dtype)} hidden={hidden} residual={has_residual}", dtype):
            res = torch.zeros(4, hidden) if has_residual else None
            add_rms_norm_triton(torch.zeros(4, hidden, dtype=dtype), res, torch.ones(hidden), 1e-5, dtype)


@case("triton_rotary")
def _rotary(rec: Recorder) -> None:
    from lowbit.kernels.triton_rotary import rotary_triton

    for model, dtype in [(SMOL, F16), (SMOL, BF16), (LLAMA, F16), (LLAMA, BF16), (LLAMA, F32)]:
        label = f"rotary {_name(dtype)} H={model['heads']} Hkv={model['kv_heads']} D={model['head_dim']}"
        with rec.variant(label, dtype):
            heads, _, _, _ = _qkv(model, 4, dtype)
            cos = torch.ones(4, 1, model["head_dim"])  # RotaryEmbedding.tables' [T, 1, D]
            rotary_triton(heads, cos, cos.clone(), model["heads"] + model["kv_heads"])


@case("triton_w4a16")
def _w4a16(rec: Recorder) -> None:
    from lowbit.kernels import triton_support
    from lowbit.kernels import triton_w4a16 as mod

    _patch_sm_count(triton_support, "num_sms")
    n, k = LLAMA["hidden"], LLAMA["hidden"]
    # Rows: 1 = FMA GEMV, 8 = 16-row dots (gemv path), 32 / 128 = the two gemm tiles, above
    # DENSE_M_THRESHOLD = the dequantize kernel (+ torch.matmul, on CPU here). At N = K = 4096 on 132
    # SMs every fused launch splits K and writes fp32 partials.
    dense = mod.DENSE_M_THRESHOLD + 1
    # (dtype, group size, act-order, rows): GPTQ/AWQ groups of 128 (GPTQ act-order reads x through
    # perm), GGUF Q4_0/Q4_1 blocks of 32. Each tl.dot tile config is compiled once, in one 16-bit dtype
    # (fp16 dots are also compiled by the attention kernels): these are the slow compiles, 5-10 s
    # each, mostly Triton's software pipelining of the unrolled nibble planes.
    variants = [(F16, 128, False, (1, 32, dense)), (BF16, 128, False, (1, 8, 128))]
    variants += [(F16, 128, True, (1, dense)), (BF16, 32, False, (1,)), (F32, 128, True, (1, 8, dense))]
    for dtype, group_size, act_order, rows in variants:
        packed = _w4a16_packed(n, k, dtype, group_size, act_order)
        for m in rows:
            label = f"w4a16 {_name(dtype)} M={m} N={n} K={k} group={group_size} act_order={act_order}"
            with rec.variant(label, dtype):
                mod.w4a16_matmul_triton(torch.zeros(m, k, dtype=dtype), packed, group_size)
    # One split: the output is stored in the activation dtype (what a wide lm_head gets).
    with rec.variant(f"w4a16_gemv bfloat16 M=1 N={n} K={k} group=128 split_k=1", BF16):
        packed = _w4a16_packed(n, k, BF16, 128, False)
        mod.w4a16_gemv_triton(torch.zeros(1, k, dtype=BF16), packed, 128, split_k=1)


def _w4a16_packed(n: int, k: int, dtype: torch.dtype, group_size: int, act_order: bool) -> dict:
    """Tensors shaped like `pack_w4a16_triton`'s output (the values do not matter here)."""
    packed = {
        "qweight": torch.zeros(k // 8, n, dtype=torch.int32),  # [K128 / 8, N]
        "scales": torch.ones(k // group_size, n, dtype=dtype),  # [K / G, N]
        "mins": torch.zeros(k // group_size, n, dtype=dtype),
    }
    if act_order:
        packed["perm"] = torch.arange(k, dtype=torch.int32)  # [K]
    return packed


@case("triton_ggml")
def _ggml(rec: Recorder) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from lowbit.kernels import triton_ggml as mod
    from lowbit.kernels import triton_support

    _patch_sm_count(triton_support, "num_sms")
    n, k = LLAMA["hidden"], LLAMA["hidden"]
    # Every type at M = 1 (FMA GEMV, split-K) in bf16: each type is its own constexpr specialisation
    # (~3 s a compile); 16-row dots in fp16 on a super-block and a 32-block type; the 32-row and
    # 64-row tiles and the dequantize kernel on the commonest K-quant; fp32 on the largest tile.
    variants = [(t, BF16, 1) for t in mod.TYPES] + [("Q6_K", F16, 8), ("Q5_0", F16, 8)]
    variants += [("Q4_K", BF16, 32), ("Q4_K", F16, 64), ("Q4_K", F16, mod.DENSE_M_THRESHOLD + 1)]
    variants += [("IQ4_XS", F32, 64)]
    for qtype, dtype, m in variants:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        blocks = torch.zeros(n, k // block * type_size, dtype=torch.uint8)
        with rec.variant(f"ggml {qtype} {_name(dtype)} M={m} N={n} K={k}", dtype):
            mod.ggml_matmul_triton(torch.zeros(m, k, dtype=dtype), blocks, qtype)


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("modules", nargs="*", help=f"kernel modules (default: all of {sorted(CASES)})")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be decorated for the interpreter")
    unknown = sorted(set(args.modules) - set(CASES))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {sorted(CASES)}")

    def write(payload: dict) -> None:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)

    reason = _aot_unavailable()
    if reason is not None:
        write({"skip": reason})
        return 0
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", ARCH, 32)
    recorder = Recorder(target)
    _install(recorder)
    problems = []  # cases that could not run, kernels no case launched
    for module in args.modules or sorted(CASES):
        recorder.module = module
        try:
            CASES[module](recorder)
        except Exception as e:
            error = f"the case itself failed: {type(e).__name__}: {e}"
            problems.append({"module": module, "kernel": "<case>", "labels": [], "ok": False, "error": error})
            continue
        launched = {launch.fn.__name__ for launch in recorder.launches.values() if launch.module == module}
        error = "launched by its module's launchers but by no case of tests/kernels/triton_aot.py"
        problems += [{"module": module, "kernel": name, "labels": [], "ok": False, "error": error}
                     for name in _uncovered(module, launched)]  # fmt: skip
    results = recorder.errors + problems + _compile_all(list(recorder.launches.values()), target, args.jobs)
    write({"results": results})
    return 0


if __name__ == "__main__":
    # A fresh cache, so that every kernel really goes through ptxas (which prints its log for us).
    cache_dir = tempfile.mkdtemp(prefix="lowbit-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
