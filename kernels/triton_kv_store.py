"""Triton KV store: write one step's keys/values into the paged cache, quantizing for int8 caches.

Layouts (the same as kernels/kv_store_ref.py, which holds the reference `kv_store_ref`):
  key, value    [T, Hkv, D]  fp16 / bf16 / fp32; any strides (e.g. views into a fused
                [T, H + 2 Hkv, D] qkv buffer), nothing is copied
  k/v_cache     [num_blocks, block_size, Hkv, D]  fp32 / fp16 / bf16, or int8
  k/v_scale     [num_blocks, block_size, Hkv] fp32, int8 caches only
  slot_mapping  [T] int64 or int32; slot = block * block_size + offset, -1 = padding (not written)
The -1 test happens inside the kernel (a masked store), so there is no host sync.

fp caches: the values are cast to the cache dtype (round-to-nearest-even, as torch's `.to`), so the
result is bit-identical to the reference. int8 caches: one program per (token, group of heads)
computes scale = max(amax / 127, MIN_SCALE) and q = clamp(round(x / scale), -127, 127) for K and V
in one pass. Both divisions use IEEE-rounded division (`div_rn`; a plain `/` may lower to an
approximate divide on NVIDIA) and the rounding is half-to-even like torch.round, so codes and scales
are bit-identical to `quantize_per_token_head` too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_store_ref import INT8_MAX, MIN_SCALE, check_kv_scales
from .triton_int8 import round_half_even
from .triton_support import next_power_of_2

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)
# Elements of one [BLOCK_H, BLOCK_D] tile: enough heads per program to amortise the slot load,
# small enough to stay in registers.
MAX_TILE = 4096


@triton.jit
def _store_tile(
    src_ptr, stride_st, stride_sh, stride_sd,
    cache_ptr, stride_cb, stride_cs, stride_ch, stride_cd,
    scale_ptr, stride_qb, stride_qs, stride_qh,
    tok, block, offset, heads, dims, head_mask, mask,
    QUANTIZE: tl.constexpr, MIN_SCALE: tl.constexpr, INT8_MAX: tl.constexpr,
):  # fmt: skip
    """One token's [BLOCK_H, BLOCK_D] tile of K or V into its slot (heads/dims are aranges)."""
    src = src_ptr + tok * stride_st + heads[:, None] * stride_sh + dims[None, :] * stride_sd
    x = tl.load(src, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    dst = cache_ptr + block * stride_cb + offset * stride_cs
    dst = dst + heads[:, None] * stride_ch + dims[None, :] * stride_cd
    if QUANTIZE:
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=1)  # [BLOCK_H]; masked lanes are 0
        scale = tl.maximum(tl.math.div_rn(amax, INT8_MAX), MIN_SCALE)  # [BLOCK_H]
        q = round_half_even(tl.math.div_rn(xf, scale[:, None]))
        q = tl.minimum(tl.maximum(q, -INT8_MAX), INT8_MAX)
        tl.store(dst, q.to(tl.int8), mask=mask)
        scale_dst = scale_ptr + block * stride_qb + offset * stride_qs + heads * stride_qh
        tl.store(scale_dst, scale, mask=head_mask)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_store_kernel(
    key_ptr, stride_kt, stride_kh, stride_kd,
    value_ptr, stride_vt, stride_vh, stride_vd,
    k_cache_ptr, stride_kcb, stride_kcs, stride_kch, stride_kcd,
    v_cache_ptr, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    k_scale_ptr, stride_ksb, stride_kss, stride_ksh,
    v_scale_ptr, stride_vsb, stride_vss, stride_vsh,
    slot_ptr, num_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANTIZE: tl.constexpr, MIN_SCALE: tl.constexpr, INT8_MAX: tl.constexpr,
):  # fmt: skip
    """Grid (T, cdiv(Hkv, BLOCK_H)): token `tok`, heads [BLOCK_H * pid1, ...), K and V."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    # A -1 slot masks every load and store of this program (no heads left): padding costs one
    # load, no branch, no host sync. (Folded into the head bound rather than and-ed in as a
    # scalar bool, which the interpreter mishandles when broadcast to 2-D.)
    valid = slot >= 0
    safe_slot = tl.where(valid, slot, 0)
    block = safe_slot // BLOCK_SIZE
    offset = safe_slot % BLOCK_SIZE
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    head_mask = heads < tl.where(valid, num_heads, 0)  # [BLOCK_H]
    mask = head_mask[:, None] & (dims[None, :] < head_dim)  # [BLOCK_H, BLOCK_D]
    _store_tile(
        key_ptr, stride_kt, stride_kh, stride_kd,
        k_cache_ptr, stride_kcb, stride_kcs, stride_kch, stride_kcd,
        k_scale_ptr, stride_ksb, stride_kss, stride_ksh,
        tok, block, offset, heads, dims, head_mask, mask, QUANTIZE, MIN_SCALE, INT8_MAX,
    )  # fmt: skip
    _store_tile(
        value_ptr, stride_vt, stride_vh, stride_vd,
        v_cache_ptr, stride_vcb, stride_vcs, stride_vch, stride_vcd,
        v_scale_ptr, stride_vsb, stride_vss, stride_vsh,
        tok, block, offset, heads, dims, head_mask, mask, QUANTIZE, MIN_SCALE, INT8_MAX,
    )  # fmt: skip


def _check_inputs(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(
            f"key and value must both be [T, Hkv, D], got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.dtype not in INPUT_DTYPES or value.dtype != key.dtype:
        raise ValueError(f"key/value must share one of {INPUT_DTYPES}, got {key.dtype} and {value.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            "k_cache and v_cache must be [num_blocks, block_size, Hkv, D] of one shape and dtype, got "
            f"{k_cache.dtype} {tuple(k_cache.shape)} and {v_cache.dtype} {tuple(v_cache.shape)}"
        )
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {k_cache.dtype}")
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key/value (Hkv, D) = {tuple(key.shape[1:])} does not match the cache's "
            f"{tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [T={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 or int32, got {slot_mapping.dtype}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"key, value, caches and slot_mapping must share one device, got {devices}")


def kv_store_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [T, Hkv, D] at `slot_mapping` [T] (-1 skipped), in place; matches
    `kv_store_ref`. int8 caches get codes and per-(token, head) scales in k/v_scale."""
    _check_inputs(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, k_scale, v_scale)
    tokens, num_heads, head_dim = key.shape
    if tokens == 0:
        return
    quantize = k_cache.dtype == torch.int8
    # Unused pointer arguments for fp caches: any tensor will do, QUANTIZE=False never reads them.
    k_s = k_scale if quantize else k_cache
    v_s = v_scale if quantize else v_cache
    k_s_strides = k_s.stride()[:3]
    v_s_strides = v_s.stride()[:3]
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(num_heads), max(1, MAX_TILE // block_d))
    grid = (tokens, triton.cdiv(num_heads, block_h))
    _kv_store_kernel[grid](
        key, *key.stride(),
        value, *value.stride(),
        k_cache, *k_cache.stride(),
        v_cache, *v_cache.stride(),
        k_s, *k_s_strides,
        v_s, *v_s_strides,
        slot_mapping, num_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_D=block_d,
        QUANTIZE=quantize, MIN_SCALE=MIN_SCALE, INT8_MAX=INT8_MAX,
        num_warps=4,
    )  # fmt: skip
