"""Paged attention: queries attend to keys/values read through block tables.

Inputs
  q            [T, H, D]  the step's query tokens, sequences laid out one after another
  k/v_cache    [num_blocks, block_size, Hkv, D]  (fp32/fp16/bf16, or int8 with k/v_scale)
  k/v_scale    [num_blocks, block_size, Hkv] fp32 for int8 caches, else None
  block_tables [B, max_blocks] int32: row b lists sequence b's blocks in order (padding ignored)
  query_start  B + 1 host ints: sequence b owns q[query_start[b]:query_start[b + 1]]
  context_lens B host ints (or [B] tensor): tokens in the cache for b, including this step's
The queries of sequence b sit at positions context_len - query_len ... context_len - 1 and attend
causally; with a sliding `window` > 0 the query at position p reads only keys (p - window, p]
(Mistral, Gemma's local layers: transformers' and llama.cpp's rule). `softcap` > 0 (Gemma 2) maps
each scaled score s to softcap * tanh(s / softcap) before the softmax. GQA: query head h reads kv
head h // (H // Hkv). int8 K/V are dequantized in here, with
each token's own scales; nothing outside attention sees dequantized values.

Reference: `paged_attention_ref` (a loop over sequences, fp32). Eager CPU paths: `decode_attention_cpu`
(one query per sequence, batched) and `prefill_attention_cpu` (one sequence, SDPA). Both compute
in fp32 and return fp32. Where the compiled CPU ops load, the engine uses their
`paged_decode_attention` and `paged_prefill_attention` (kernels/cpu/attention.cpp) instead: the same
fp32 computation, read straight from the paged cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gather_kv(
    cache: torch.Tensor, scale: torch.Tensor | None, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """One sequence's first `length` cached tokens, contiguous, fp32: [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()
    values = cache[blocks].flatten(0, 1)[:length].float()  # [length, Hkv, D]
    if scale is not None:
        values = values * scale[blocks].flatten(0, 1)[:length, :, None]
    return values


def _causal_mask(
    query_len: int, context_len: int, device: torch.device, window: int = 0, key0: int = 0
) -> torch.Tensor:
    """bool [query_len, context_len - key0]: True where query i may read key key0 + j."""
    query_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
    key_pos = torch.arange(key0, context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    return mask & (key_pos > query_pos - window) if window > 0 else mask


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's attention logit cap: softcap * tanh(s / softcap), or s as it is for softcap 0."""
    return torch.tanh(scores / softcap) * softcap if softcap > 0 else scores


def window_start(position: int, window: int) -> int:
    """The first key the query at `position` reads."""
    return max(0, position - window + 1) if window > 0 else 0


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0
) -> torch.Tensor:
    """Contiguous causal attention for one sequence whose queries are the last tokens of k/v.
    q [Tq, H, D], k/v [C, Hkv, D] -> fp32 [Tq, H, D]."""
    query_len, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [C, H, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = soft_cap(torch.einsum("qhd,khd->hqk", q.float(), k) * scale, softcap)  # [H, Tq, C]
    mask = _causal_mask(query_len, k.shape[0], q.device, window)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: list[int],
    context_lens: list[int],
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The spec for every paged attention path. Returns fp32 [T, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, context_len in enumerate(context_lens):
        start, end = query_start[b], query_start[b + 1]
        k = gather_kv(k_cache, k_scale, block_tables[b], context_len)
        v = gather_kv(v_cache, v_scale, block_tables[b], context_len)
        out[start:end] = attention_ref(q[start:end], k, v, scale, window, softcap)
    return out


def prefill_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One sequence's chunk of queries q [Tq, H, D] over its cache -> fp32 [Tq, H, D]."""
    query_len, num_heads, _ = q.shape
    k = gather_kv(k_cache, k_scale, block_table, context_len)  # [C, Hkv, D]
    v = gather_kv(v_cache, v_scale, block_table, context_len)
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, C, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    qh = q.float().transpose(0, 1)  # [H, Tq, D]
    # SDPA's math path (3-D inputs), in query chunks that each read only the keys they can see:
    # it materializes [H, rows, C] fp32 scores, so chunks bound that (unchunked: ~30 MB per layer
    # at 512 tokens), and the causal half of the work is skipped. SDPA's fused (flash) CPU kernel,
    # which 4-D inputs select, was ~1.3x faster but moved the fast-mode parity passage outside
    # the spread of rounding noise (mean |dlogit| 0.059, against 0.051-0.054 for the math path
    # under 2e-7 relative perturbations), so it is not used.
    # A soft-cap needs the scores between the product and the softmax, which SDPA does not expose:
    # that (Gemma 2 only) takes the reference's own einsum path, chunk by chunk all the same.
    attend = F.scaled_dot_product_attention if softcap == 0 else _capped_attention(softcap)
    out = torch.empty_like(qh)
    rows = max(1, SCORES_BYTES // (num_heads * context_len * 4))
    for start in range(0, query_len, rows):
        end = min(start + rows, query_len)
        visible = context_len - query_len + end  # keys up to the chunk's last query
        key0 = window_start(visible - (end - start), window)  # the chunk's first query's first key
        mask = _causal_mask(end - start, visible, q.device, window, key0)
        out[:, start:end] = attend(
            qh[:, start:end], k[:, key0:visible], v[:, key0:visible], attn_mask=mask, scale=scale
        )
    return out.transpose(0, 1)  # [Tq, H, D]


def _capped_attention(softcap: float):
    def attend(q, k, v, attn_mask, scale):  # q [H, Tq, D], k/v [H, C, D], attn_mask [Tq, C]
        scores = soft_cap(torch.matmul(q, k.transpose(1, 2)) * scale, softcap)
        return torch.matmul(scores.masked_fill(~attn_mask, float("-inf")).softmax(-1), v)

    return attend


SCORES_BYTES = 4 << 20  # bound on one query chunk's fp32 scores in prefill_attention_cpu


def decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One query per sequence, q [B, H, D]; context_lens [B] tensor -> fp32 [B, H, D].
    No host sync and no loop over sequences: every sequence is gathered to the batch's block-table
    width and positions past its context are masked (`masked` [B, L] bool, True past the context,
    may be passed in: it is the same for every layer of a step). int8 scales are folded into the
    scores (K) and the probabilities (V) instead of materialising dequantized caches.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    blocks = block_tables.long()  # [B, nb]
    k = k_cache[blocks].flatten(1, 2).float()  # [B, L, Hkv, D]
    v = v_cache[blocks].flatten(1, 2).float()
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim) * scale  # [B, Hkv, G, D]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1))  # [B, Hkv, G, L]
    if k_scale is not None:
        scores = scores * k_scale[blocks].flatten(1, 2).transpose(1, 2)[:, :, None, :]
    if masked is None:
        masked = decode_padding_mask(context_lens, k.shape[1], window)
    scores = soft_cap(scores, softcap).masked_fill(masked[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    if v_scale is not None:
        probs = probs * v_scale[blocks].flatten(1, 2).transpose(1, 2)[:, :, None, :]
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim)


def decode_padding_mask(context_lens: torch.Tensor, length: int, window: int = 0) -> torch.Tensor:
    """bool [B, length]: True at cache positions past each sequence's context, or before its
    sliding window."""
    positions = torch.arange(length, device=context_lens.device)[None, :]
    masked = positions >= context_lens[:, None]
    return masked | (positions < context_lens[:, None] - window) if window > 0 else masked
