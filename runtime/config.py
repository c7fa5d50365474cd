"""How we run a model (`EngineConfig`) and the dtype names it accepts.

What the model is (`ModelConfig`, `RopeScaling`) lives beside the model in `runtime/models/config.py`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")


def parse_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`, with a clear error for anything else."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    """How to run a model. Every field has the default a user of `LLM()` gets.

    dtype: compute dtype of activations. "auto" is bfloat16 on CPU (torch's packed int4/int8
        CPU kernels are fast only with bf16 activations) and float16 on CUDA. "float32" is the
        exact reference mode used by parity tests.
    kv_cache_dtype: "auto" follows `dtype`; "int8" stores one scale per (token, head).
    num_kv_blocks: pool size; None sizes it from `kv_cache_memory`.
    kv_cache_memory: bytes for the KV pool when `num_kv_blocks` is None; None means a share of
        the free memory (see `kv_cache.sizing`).
    max_model_len: context length; None takes the model's own.
    max_num_seqs: most sequences in one step; max_num_batched_tokens: most tokens in one step,
        which is also the prefill chunk size (512 on CPU keeps a decode step behind a prompt
        chunk to a fraction of a second).
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    quantization: str | None = None
    num_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # A decode step runs one token per sequence; a smaller budget could never be kept.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        return torch.bfloat16 if device.type == "cpu" else torch.float16
