"""`EngineInfo`: what a loaded engine is, as front doors and the server may read it.

The server (model cards, /tokenize, /detokenize, the system fingerprint), its metrics and the CLI's
banners need a handful of facts about the engine. They read them here rather than from the
engine's working parts (`kv_spec`, `model_config`, ...), which stay free to change. Live numbers
(queue lengths, KV blocks in use, the prefix-cache hit rate) are not facts of the load: they come
from `Engine.stats()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EngineInfo:
    """Fixed at load; `Engine.info` builds it once."""

    source: str  # the checkpoint as its loader named it: a GGUF file or an HF model directory
    architecture: str  # the model family, e.g. "llama"
    device: torch.device
    dtype: torch.dtype  # compute dtype
    kv_cache_dtype: str  # "float32", "float16", "bfloat16" or "int8"
    max_model_len: int  # the context length requests may use (prompt + generated)
    vocab_size: int  # token ids are in [0, vocab_size)
    kv_num_blocks: int  # the KV pool
    kv_block_size: int  # tokens per KV block
    load_seconds: float

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV pool holds, all requests together."""
        return self.kv_num_blocks * self.kv_block_size
