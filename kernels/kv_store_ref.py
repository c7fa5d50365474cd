"""KV store: write new keys/values into the paged cache at `slot_mapping`.

Cache layout (per layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
slot = block_id * block_size + offset. A slot of -1 means "padding, do not write".
int8 caches also hold k_scale, v_scale fp32 [num_blocks, block_size, num_kv_heads]: one symmetric
scale per (token, head), computed here when the token is written (x = q * scale, q in [-127, 127]).
Reference: `kv_store_ref`; the CPU path is the reference itself (index_copy_ on flat views).
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
# A head whose values are all zero still needs a finite, non-zero scale.
MIN_SCALE = 1e-8


def quantize_per_token_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] float -> (int8 [T, H, D], fp32 scale [T, H])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / INT8_MAX).clamp(min=MIN_SCALE)  # [T, H]
    q = torch.round(xf / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def check_kv_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> None:
    """ValueError unless the scales fit the cache: fp32 [num_blocks, block_size, Hkv] on the cache's
    device for an int8 cache, absent for a float one."""
    if k_cache.dtype != torch.int8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale are only for int8 caches, the cache is {k_cache.dtype}")
        return
    if k_scale is None or v_scale is None:
        raise ValueError("an int8 KV cache needs k_scale and v_scale")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.shape != k_cache.shape[:3] or s.dtype != torch.float32:
            raise ValueError(
                f"{name} must be float32 {tuple(k_cache.shape[:3])} (num_blocks, block_size, Hkv), "
                f"got {s.dtype} {tuple(s.shape)}"
            )
        if s.device != k_cache.device:
            raise ValueError(f"{name} is on {s.device}, the cache on {k_cache.device}")


def _write(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, ...]
    flat.index_copy_(0, slots, values.to(cache.dtype))


def kv_store_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    padded: bool = True,
) -> None:
    """key, value [T, Hkv, D]; slot_mapping [T] int64. Quantizes when the cache is int8.
    `padded=False` promises no -1 slots (the engine knows it on the host), sparing a device sync."""
    if padded:
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if k_cache.dtype == torch.int8:
        if k_scale is None or v_scale is None:
            raise ValueError("an int8 KV cache needs k_scale and v_scale")
        k_q, k_s = quantize_per_token_head(key)
        v_q, v_s = quantize_per_token_head(value)
        _write(k_cache, slot_mapping, k_q)
        _write(v_cache, slot_mapping, v_q)
        _write(k_scale, slot_mapping, k_s)
        _write(v_scale, slot_mapping, v_s)
    else:
        _write(k_cache, slot_mapping, key)
        _write(v_cache, slot_mapping, value)
