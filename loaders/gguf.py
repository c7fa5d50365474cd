"""GGUF loader: GGUF files of the llama, mistral, qwen2, qwen3, phi3, gemma2 and gemma3
architectures -> `Checkpoint` with weights kept in packed form.

Tensor names are mapped to HF's (llama.cpp's names: gguf's TENSOR_NAMES). For the `llama` and
`mistral` architectures llama.cpp's converter permutes the rows of attn_q/attn_k so that rotary
pairs are adjacent (its interleaved RoPE); we permute them back (a row permutation, exact on packed
data) and use HF's rotate-half RoPE for every format. Qwen2/Qwen3 files are stored unpermuted
(NeoX RoPE, which is rotate-half). A family's options come from the tensors the file has: q/k/v
biases (`attn_q.bias`, Qwen2), an o bias, q/k norms (`attn_q_norm`, Qwen3, Gemma 3). Gemma's
converter stores every norm weight as 1 + w; we hand HF's w (the model adds the 1 back), and take
what the converter does not write from llama.cpp's own rules (`_gemma`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

import torch

from lowbit.runtime.models.config import ModelConfig, RopeScaling
from lowbit.runtime.quant import WeightLike

from .base import Checkpoint, LazyWeights
from .gguf_blocks import decode_tensor
from .gguf_file import GGUFFile, read_gguf
from .tokenizer import tokenizer_from_gguf

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
# Architectures whose converter permutes q/k rows for llama.cpp's interleaved RoPE.
_PERMUTED = ("llama", "mistral")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Where an architecture's converter names a tensor differently: Phi-3 keeps its fused projections,
# Gemma has a norm on each side of attention and of the MLP.
_GEMMA_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma2": _GEMMA_NAMES,
    "gemma3": _GEMMA_NAMES,
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.cache
def _layer_names(arch: str) -> dict[str, str]:
    return {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    names = _layer_names(arch)
    if match and match.group(2) in names:
        return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"
    return None


def rotary_unpermutation(num_heads: int, head_dim: int) -> torch.Tensor:
    """Index i such that hf_rows = gguf_rows[i]. llama.cpp stores the row of HF's (head h, half j,
    pair i) at (h, i, j)."""
    half = head_dim // 2
    h, j, i = torch.meshgrid(torch.arange(num_heads), torch.arange(2), torch.arange(half), indexing="ij")
    return (h * head_dim + i * 2 + j).flatten()


def _get(meta: dict, arch: str, key: str, default=None, *, path: str):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
    return value


def model_config(gguf: GGUFFile) -> ModelConfig:
    meta, path = gguf.metadata, str(gguf.path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {ARCHITECTURES})")
    hidden = _get(meta, arch, "embedding_length", path=path)
    heads = _get(meta, arch, "attention.head_count", path=path)
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    scaling = RopeScaling()
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: rotary embeddings over part of each head are not supported")
    if "rope_factors_long.weight" in gguf.tensors:
        scaling = _longrope(gguf, arch, path)
    elif meta.get(f"{arch}.rope.scaling.type", "none") == "linear":
        scaling = RopeScaling("linear", float(meta[f"{arch}.rope.scaling.factor"]))
    elif meta.get(f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise ValueError(f"{path}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise ValueError(f"{path}: GGUF metadata gives no vocabulary size")
    has = gguf.tensors.__contains__
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_get(meta, arch, "feed_forward_length", path=path),
        num_layers=_get(meta, arch, "block_count", path=path),
        num_heads=heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-5, path=path)),
        rope_theta=float(_get(meta, arch, "rope.freq_base", 10000.0, path=path)),
        max_position_embeddings=_get(meta, arch, "context_length", path=path),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        rope_scaling=scaling,
        qkv_bias=has("blk.0.attn_q.bias"),
        o_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_down.bias"),
        qk_norm=has("blk.0.attn_q_norm.weight"),
        fused_qkv=has("blk.0.attn_qkv.weight"),
        fused_gate_up=arch == "phi3",
        # Phi-3's converter writes 0 for "no window" (its Phi-4 marker).
        sliding_window=meta.get(f"{arch}.attention.sliding_window") or None,
        **(_gemma(meta, arch) if arch.startswith("gemma") else {}),
    )


def _gemma(meta: dict, arch: str) -> dict:
    """Gemma's fields as llama.cpp derives them (src/llama-model.cpp): Gemma 2's even layers and all
    but every 6th of Gemma 3's slide; the score scale is 1/sqrt(head_dim), except for the 27B models
    (Gemma 2: 46 layers, Gemma 3: 62), whose query_pre_attn_scalar is hidden / heads."""
    layers, hidden = meta[f"{arch}.block_count"], meta[f"{arch}.embedding_length"]
    heads = meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    pattern = 2 if arch == "gemma2" else 6
    big = layers == (46 if arch == "gemma2" else 62)
    fields = {
        "hidden_act": "gelu_tanh",
        "query_pre_attn_scalar": hidden // heads if big else head_dim,
        "attn_softcap": float(meta.get(f"{arch}.attn_logit_softcapping", 0.0)),
        "final_softcap": float(meta.get(f"{arch}.final_logit_softcapping", 0.0)),
        "layer_types": tuple("sliding" if (i + 1) % pattern else "full" for i in range(layers)),
    }
    if arch == "gemma3":
        fields["rope_local_theta"] = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))
    return fields


def _longrope(gguf: GGUFFile, arch: str, path: str) -> RopeScaling:
    """Phi-3's LongRoPE from the factor tensors and metadata llama.cpp's converter writes."""
    meta = gguf.metadata
    original = int(_get(meta, arch, "rope.scaling.original_context_length", path=path))
    factors = {
        kind: tuple(float(f) for f in gguf.tensor_bytes(f"rope_factors_{kind}.weight").view("<f4"))
        for kind in ("short", "long")
    }
    ratio = _get(meta, arch, "context_length", path=path) / original
    default = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    return RopeScaling(
        "longrope",
        factor=ratio,
        original_max_position_embeddings=original,
        short_factor=factors["short"],
        long_factor=factors["long"],
        attention_factor=float(meta.get(f"{arch}.rope.scaling.attn_factor", default)),
    )


class _GGUFWeights:
    """Decodes one tensor at a time from the memory map, fixing q/k row order on the way."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig):
        self.gguf = gguf
        self.norm_shift = config.architecture.startswith("gemma")
        names = {n: hf_name(n, config.architecture) for n in gguf.tensors}
        self.by_hf = {hf: n for n, hf in names.items() if hf is not None}
        self.unpermute = {}
        if config.architecture in _PERMUTED:
            self.unpermute = {
                "q_proj": rotary_unpermutation(config.num_heads, config.head_dim),
                "k_proj": rotary_unpermutation(config.num_kv_heads, config.head_dim),
            }

    def __call__(self, name: str) -> WeightLike:
        gguf_name = self.by_hf[name]
        info = self.gguf.tensors[gguf_name]
        try:
            weight = decode_tensor(self.gguf.tensor_bytes(gguf_name), info.qtype, info.shape)
        except ValueError as e:
            raise ValueError(f"{self.gguf.path}: tensor {gguf_name!r}: {e}") from None
        self.gguf.release(gguf_name)
        if self.norm_shift and name.endswith("norm.weight"):
            return weight.float() - 1.0  # the converter's 1 + w, back to HF's w
        proj = name.split(".")[-2] if "." in name else None  # "rope_freqs" has no module part
        if proj in self.unpermute:
            index = self.unpermute[proj]
            dense = isinstance(weight, torch.Tensor)
            rows = weight.shape[0] if dense else weight.out_features
            if rows != len(index):
                raise ValueError(
                    f"{self.gguf.path}: tensor {gguf_name!r} has {rows} rows, the header implies {len(index)}"
                )
            weight = weight[index] if dense else weight.select_rows(index)
        return weight


def load_gguf(path: str | os.PathLike) -> Checkpoint:
    gguf = read_gguf(path)
    config = model_config(gguf)
    tokenizer = tokenizer_from_gguf(gguf.metadata)
    # The weights reader keeps the file without its metadata: the vocabulary and merges (~100k
    # strings) are then freed before the model is built, instead of leaving half-empty allocator
    # arenas among the model's objects (~2.5 MiB resident after load).
    fetch = _GGUFWeights(dataclasses.replace(gguf, metadata={}), config)
    return Checkpoint(config, LazyWeights(list(fetch.by_hf), fetch), tokenizer, str(path))
