"""Synthetic GGUF files for the loader tests, written with the `gguf` package's `GGUFWriter`.

Everything here is independent of lowbit: the writer and quantizer are the `gguf` package's, and
the q/k row permutation is llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`),
re-implemented from its definition.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

# ---------------------------------------------------------------------------------------------
# Reference reader on the real default model, parsed once per test session (~3 s).


@functools.cache
def reference_reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


# ---------------------------------------------------------------------------------------------
# llama.cpp's q/k permutation and the gguf package's quantization round trip.


def hf_to_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter stores for an HF q_proj/k_proj weight [n_head * head_dim, in]."""
    out, *rest = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def to_raw(w: np.ndarray, qtype: Q) -> np.ndarray:
    """fp32 values -> the array GGUFWriter stores for `qtype` (the gguf package's quantizer)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def round_trip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """The fp32 values a reader of `to_raw(w, qtype)` must see (the gguf package's dequantizer)."""
    if qtype == Q.F32:
        return np.asarray(w, dtype=np.float32)
    return gguf.quants.dequantize(to_raw(w, qtype), qtype).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary (GPT-2 style), enough for transformers' GGUF converter.


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 byte tokens, one token per merge, then specials."""
    tokens = _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES] + SPECIAL_TOKENS
    types = [1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS)  # NORMAL, CONTROL
    return tokens, types, list(MERGES)


# ---------------------------------------------------------------------------------------------
# Writing files.


def write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, tuple],
    tensors: list[tuple[str, np.ndarray, Q | None]],
    alignment: int | None = None,
) -> Path:
    """metadata: key -> (value, GGUFValueType[, sub_type]); tensors: (name, data, raw_dtype)."""
    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, *sub) in metadata.items():
        writer.add_key_value(key, value, vtype, *sub)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class TinyLlama:
    """A one-layer llama GGUF. `head_dim=None` leaves llama.attention.key_length out of the file."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    ffn: int = 96
    layers: int = 1
    context: int = 256
    rope_theta: float = 50000.0
    rms_eps: float = 1e-6
    write_vocab_size: bool = True
    with_output: bool = False
    arch: str = "llama"
    qtypes: dict[str, Q] = field(default_factory=dict)  # gguf tensor name -> type (default F32)
    extra_metadata: dict[str, tuple] = field(default_factory=dict)
    drop_metadata: tuple[str, ...] = ()
    seed: int = 0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def vocab(self) -> int:
        return len(tiny_vocab()[0])

    def metadata(self) -> dict[str, tuple]:
        a = self.arch
        tokens, types, merges = tiny_vocab()
        meta: dict[str, tuple] = {
            f"{a}.block_count": (self.layers, V.UINT32),
            f"{a}.context_length": (self.context, V.UINT32),
            f"{a}.embedding_length": (self.hidden, V.UINT32),
            f"{a}.feed_forward_length": (self.ffn, V.UINT32),
            f"{a}.attention.head_count": (self.heads, V.UINT32),
            f"{a}.attention.head_count_kv": (self.kv_heads, V.UINT32),
            f"{a}.rope.freq_base": (self.rope_theta, V.FLOAT32),
            f"{a}.attention.layer_norm_rms_epsilon": (self.rms_eps, V.FLOAT32),
            "tokenizer.ggml.model": ("gpt2", V.STRING),
            "tokenizer.ggml.pre": ("default", V.STRING),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
            "tokenizer.ggml.bos_token_id": (tokens.index("<|im_start|>"), V.UINT32),
            "tokenizer.ggml.eos_token_id": (tokens.index("<|im_end|>"), V.UINT32),
        }
        if self.head_dim is not None:
            meta[f"{a}.attention.key_length"] = (self.head_dim, V.UINT32)
            meta[f"{a}.attention.value_length"] = (self.head_dim, V.UINT32)
        if self.write_vocab_size:
            meta[f"{a}.vocab_size"] = (self.vocab, V.UINT32)
        meta.update(self.extra_metadata)
        for key in self.drop_metadata:
            del meta[key]
        return meta

    def hf_weights(self) -> dict[str, np.ndarray]:
        """gguf name -> the HF-order fp32 weight (distinct random values for every tensor)."""
        rng = np.random.default_rng(self.seed)
        d, hd, f = self.hidden, self.resolved_head_dim, self.ffn
        shapes = {"token_embd.weight": (self.vocab, d), "output_norm.weight": (d,)}
        if self.with_output:
            shapes["output.weight"] = (self.vocab, d)
        for i in range(self.layers):
            shapes |= {
                f"blk.{i}.attn_norm.weight": (d,),
                f"blk.{i}.attn_q.weight": (self.heads * hd, d),
                f"blk.{i}.attn_k.weight": (self.kv_heads * hd, d),
                f"blk.{i}.attn_v.weight": (self.kv_heads * hd, d),
                f"blk.{i}.attn_output.weight": (d, self.heads * hd),
                f"blk.{i}.ffn_norm.weight": (d,),
                f"blk.{i}.ffn_gate.weight": (f, d),
                f"blk.{i}.ffn_up.weight": (f, d),
                f"blk.{i}.ffn_down.weight": (d, f),
            }
        return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}

    def write(self, path: Path) -> dict[str, np.ndarray]:
        """Write the file; returns gguf name -> the HF-order fp32 values a loader must produce."""
        weights = self.hf_weights()
        tensors, expected = [], {}
        for name, w in weights.items():
            qtype = self.qtypes.get(name, Q.F32)
            stored = w
            if ".attn_q." in name:
                stored = hf_to_gguf_permute(w, self.heads)
            elif ".attn_k." in name:
                stored = hf_to_gguf_permute(w, self.kv_heads)
            tensors.append((name, to_raw(stored, qtype), None if qtype == Q.F32 else qtype))
            # Blocks run along rows, so quantizing permuted rows = permuting quantized rows.
            expected[name] = round_trip(w, qtype)
        write_gguf(path, self.arch, self.metadata(), tensors)
        return expected


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}
