"""The paged KV pool: `KVCacheSpec`, allocation per storage dtype, and default sizing."""

from __future__ import annotations

import logging
import os

import torch

from .fp import allocate_fp
from .int8 import allocate_int8
from .layer import LayerKVCache
from .spec import KVCacheSpec

logger = logging.getLogger(__name__)

# Without an explicit budget the pool takes this share of the memory that is free at start-up,
# capped, so that a laptop keeps room for everything else.
FREE_MEMORY_SHARE = 0.25
MAX_DEFAULT_BYTES = 4 << 30


def allocate_kv_cache(spec: KVCacheSpec, device: torch.device) -> list[LayerKVCache]:
    """One `LayerKVCache` per layer, zero-filled."""
    return allocate_int8(spec, device) if spec.quantized else allocate_fp(spec, device)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def num_blocks_for(
    spec: KVCacheSpec, memory: int | None, device: torch.device, most: int | None = None
) -> int:
    """Blocks that fit `memory` bytes; when None, the default: a share of free memory, capped, and
    at most `most` blocks (what the engine's sequences can use at full context)."""
    if memory is None:
        memory = min(int(available_memory(device) * FREE_MEMORY_SHARE), MAX_DEFAULT_BYTES)
        if most is not None:
            memory = min(memory, most * spec.bytes_per_block())
        share = FREE_MEMORY_SHARE * 100
        logger.info("KV cache: %.0f MiB (at most %.0f%% of free memory, capped)", memory / 2**20, share)
    blocks = memory // spec.bytes_per_block()
    if blocks < 1:
        raise ValueError(
            f"KV cache memory {memory} bytes is less than one block ({spec.bytes_per_block()} bytes)"
        )
    return int(blocks)


__all__ = ["KVCacheSpec", "LayerKVCache", "allocate_kv_cache", "num_blocks_for"]
