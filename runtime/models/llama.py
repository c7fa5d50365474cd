"""Llama-family decoder: GQA, RoPE, RMSNorm, SwiGLU, tied or untied embeddings. One definition for
Llama, Mistral, Qwen2/Qwen2.5, Qwen3 and Phi-3: what differs between them is data in `ModelConfig`
(projection biases, Qwen3's q/k norms, Phi-3's fused projections and LongRoPE), read by the loaders
from each family's config or GGUF.

Weights come from a loader as a mapping from HF parameter names to dense tensors or
`QuantizedWeight`s; each linear packs for its kernel at construction. `forward` takes flat tensors
for the whole step (all sequences' tokens concatenated) and returns logits only for the rows in
`logits_indices`, so the vocabulary projection runs once per sampled sequence, not per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.runtime.backends.attention import ATTENTION_BACKENDS, AttentionBackend, AttentionSpec
from lowbit.runtime.backends.base import choose
from lowbit.runtime.backends.norm import NORM_BACKENDS, NormBackend
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.layers.attention import Attention, HeadRMSNorm
from lowbit.runtime.layers.attention_metadata import AttentionMetadata
from lowbit.runtime.layers.decode_layer import CompiledCPULayers, EagerLayers, LayerPath
from lowbit.runtime.layers.embedding import Embedding
from lowbit.runtime.layers.linear import FusedLinear, Linear
from lowbit.runtime.layers.norm import RMSNorm
from lowbit.runtime.layers.rotary import RotaryEmbedding, inverse_frequencies
from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.quant import WeightLike


def _silu(gate: torch.Tensor) -> torch.Tensor:
    # In place on the gate/up output, which nothing else holds (the same roundings as F.silu(gate)).
    return F.silu(gate, inplace=True)


def _gelu_tanh(gate: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh")  # Gemma's gelu_pytorch_tanh


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": _silu, "gelu_tanh": _gelu_tanh}


class MLP(nn.Module):
    def __init__(
        self, gate_up: list[WeightLike], down: WeightLike, intermediate: int, device, dtype,
        biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, activation: str = "silu",
    ):  # fmt: skip
        """gate_up: [gate, up], or one weight the checkpoint already fused (Phi-3: gate rows first)."""
        super().__init__()
        gate_bias, up_bias, down_bias = biases or (None, None, None)
        sizes = [intermediate, intermediate] if len(gate_up) == 1 else None
        self.gate_up = FusedLinear(gate_up, device, dtype, [gate_bias, up_bias], sizes)
        self.down_proj = Linear(down, device, dtype, down_bias)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        # The product goes to a new [T, I], and the [T, 2I] output is released before the down
        # projection, whose temporaries are the largest of the layer.
        act = self.activation(gate).mul(up)
        del gate, up
        return self.down_proj(act)

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step


def attention_spec(config: ModelConfig, layer: int) -> AttentionSpec:
    scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
    window, softcap = config.window(layer), config.attn_softcap
    return AttentionSpec(config.num_heads, config.num_kv_heads, scale, window, softcap)


class DecoderLayer(nn.Module):
    # Why the compiled decode layer (runtime/layers/decode_layer.py) cannot run this layer, if so.
    not_compiled: ClassVar[str | None] = None

    def __init__(
        self, config: ModelConfig, w: WeightGetter, i: int, device, dtype,
        attention: AttentionBackend, norm: NormBackend,
    ):  # fmt: skip
        super().__init__()
        p = f"model.layers.{i}."
        eps = config.rms_norm_eps
        a, m = p + "self_attn.", p + "mlp."
        self.norm_args = (eps, device, dtype, norm)
        self.input_layernorm = self.rms_norm(w, p + "input_layernorm")
        qk_norm = None
        if config.qk_norm:
            weights = (self.norm_weight(w, f"{a}{n}_norm") for n in "qk")
            qk_norm = tuple(HeadRMSNorm(weight, eps, device, dtype) for weight in weights)
        qkv = [w(a + "qkv_proj.weight")] if config.fused_qkv else [w(f"{a}{n}_proj.weight") for n in "qkv"]
        self.self_attn = Attention(
            qkv,
            w(a + "o_proj.weight"),
            attention_spec(config, i),
            config.head_dim,
            device,
            dtype,
            attention,
            qkv_bias=tuple(w(f"{a}{n}_proj.bias") for n in "qkv") if config.qkv_bias else None,
            o_bias=w(a + "o_proj.bias") if config.o_bias else None,
            qk_norm=qk_norm,
        )
        self.post_attention_layernorm = self.rms_norm(w, p + "post_attention_layernorm")
        fused = config.fused_gate_up
        self.mlp = MLP(
            [w(m + "gate_up_proj.weight")] if fused else [w(m + "gate_proj.weight"), w(m + "up_proj.weight")],
            w(m + "down_proj.weight"),
            config.intermediate_size,
            device,
            dtype,
            tuple(w(f"{m}{n}_proj.bias") for n in ("gate", "up", "down")) if config.mlp_bias else None,
            config.hidden_act,
        )
        self.add_norms(w, p)
        self.input_layernorm.fuse_quantization(self.self_attn.qkv)
        self.mlp_norm.fuse_quantization(self.mlp.gate_up)

    def add_norms(self, w: WeightGetter, prefix: str) -> None:
        """A family's norms beyond the two every layer has (Gemma's sandwich norms)."""

    @property
    def mlp_norm(self) -> RMSNorm:
        """The norm whose output the MLP reads."""
        return self.post_attention_layernorm

    def norm_weight(self, w: WeightGetter, name: str) -> torch.Tensor:
        """A norm's effective weight from the checkpoint's (Gemma: 1 + w)."""
        return w(name + ".weight")

    def rms_norm(self, w: WeightGetter, name: str) -> RMSNorm:
        return RMSNorm(self.norm_weight(w, name), *self.norm_args)

    def forward(self, rope, hidden, residual, cache: LayerKVCache, meta: AttentionMetadata):
        x, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, x, cache, meta)
        x, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(x), residual

    __call__ = forward  # skip nn.Module hook dispatch: ~4 us a call, ~300 calls per decode step


class WeightGetter:
    """Fetches each weight once from the loader's (lazy) mapping, with a clear error if missing."""

    def __init__(self, weights: Mapping[str, WeightLike]):
        self.weights = weights

    def __call__(self, name: str) -> WeightLike:
        try:
            return self.weights[name]
        except KeyError:
            raise ValueError(f"checkpoint is missing weight {name!r}") from None

    def get(self, name: str) -> WeightLike | None:
        return self.weights.get(name)


class LlamaForCausalLM(nn.Module):
    LAYER: ClassVar[type[DecoderLayer]] = DecoderLayer
    # Decode steps (one token per sequence) take the first of these that can run this model: each
    # layer as one compiled call on CPU, else the eager layers. Prompts always run the eager layers.
    DECODE_PATHS: tuple[type[LayerPath], ...] = (CompiledCPULayers, EagerLayers)

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, WeightLike],
        device: torch.device,
        dtype: torch.dtype,
        lm_head_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        w = WeightGetter(weights)
        self.config = config
        self.dtype = dtype
        embed = w("model.embed_tokens.weight")
        self.embed_tokens = Embedding(embed, device)
        # The vocabulary projection comes before the layers: packing it briefly holds two copies
        # of the largest weight, and that costs least peak memory while nothing else is resident.
        tied = config.tie_word_embeddings
        self.lm_head = Linear(embed if tied else w("lm_head.weight"), device, lm_head_dtype or dtype)
        if tied:
            self.embed_tokens.share(self.lm_head.packed)
        del embed
        inv_freq = inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, w.get("rope_freqs")
        )
        self.rotary = RotaryEmbedding(inv_freq, device, config.rope_scaling.attention_factor)
        self.embed_scale = 1.0  # Gemma scales its embeddings
        # One backend per op for the whole model, the first of each list that can run on the device.
        attention = choose("attention", ATTENTION_BACKENDS, device, dtype)
        norm = choose("norm", NORM_BACKENDS, device, dtype)
        self.layers = nn.ModuleList(
            [self.LAYER(config, w, i, device, dtype, attention, norm) for i in range(config.num_layers)]
        )
        final = self.layers[0].norm_weight(w, "model.norm")
        self.norm = RMSNorm(final, config.rms_norm_eps, device, lm_head_dtype or dtype, norm)
        self.eager_layers = EagerLayers(self.layers, device, dtype)
        self.decode_path = choose("decode path", self.DECODE_PATHS, self.layers, device, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions [T]; logits_indices [S] -> fp32 logits [S, vocab]."""
        hidden = self.embed_tokens(input_ids)  # fp32 [T, hidden]
        if self.embed_scale != 1.0:
            hidden = hidden * self.embed_scale
        rope = self.rope_tables(positions)
        layers = self.decode_path if meta.num_prefills == 0 else self.eager_layers
        hidden, residual = layers(hidden, rope, kv_caches, meta)
        x, _ = self.norm(hidden[logits_indices], residual[logits_indices])
        return self.output_logits(self.lm_head(x).float())

    def rope_tables(self, positions: torch.Tensor):
        """The step's rotary tables, in the form this model's layers take them."""
        return self.rotary.tables(positions)

    def output_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
