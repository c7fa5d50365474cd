"""Gemma 2 and Gemma 3 (text) decoders: the Llama layer with Gemma's code differences.

- every RMSNorm scales by (1 + w) (the loaders hand HF's w; GGUF's stored 1 + w is shifted back);
- "sandwich" norms: the attention and MLP outputs are normed before they join the residual
  stream (post_attention_layernorm, post_feedforward_layernorm), and the MLP reads
  pre_feedforward_layernorm;
- embeddings scaled by sqrt(hidden);
- Gemma 3's sliding layers rotate with their own base (`rope_local_theta`, no scaling).
The data differences (GELU-tanh, query_pre_attn_scalar, soft-caps, alternating sliding/full
layers, Gemma 3's q/k norms) are ModelConfig fields read by the shared layers.
"""

from __future__ import annotations

import torch

from lowbit.kernels.paged_attention_ref import soft_cap
from lowbit.runtime.kv_cache import LayerKVCache
from lowbit.runtime.layers.attention_metadata import AttentionMetadata
from lowbit.runtime.layers.norm import RMSNorm
from lowbit.runtime.layers.rotary import RotaryEmbedding, inverse_frequencies
from lowbit.runtime.models.config import ModelConfig, RopeScaling

from .llama import DecoderLayer, LlamaForCausalLM, WeightGetter


class GemmaDecoderLayer(DecoderLayer):
    not_compiled = "Gemma's post-attention and post-feedforward norms run in the eager layers"

    def __init__(self, config: ModelConfig, w: WeightGetter, i: int, device, dtype, attention, norm):
        super().__init__(config, w, i, device, dtype, attention, norm)
        # The sliding layers of a model with a local rope base take the second table.
        self.rope_index = int(config.rope_local_theta is not None and config.window(i) > 0)

    def add_norms(self, w, prefix) -> None:
        self.pre_feedforward_layernorm = self.rms_norm(w, prefix + "pre_feedforward_layernorm")
        self.post_feedforward_layernorm = self.rms_norm(w, prefix + "post_feedforward_layernorm")

    @property
    def mlp_norm(self) -> RMSNorm:
        return self.pre_feedforward_layernorm

    def norm_weight(self, w: WeightGetter, name: str) -> torch.Tensor:
        return w(name + ".weight").float() + 1.0  # Gemma's RMSNorm: x_normed * (1 + w), in fp32

    def forward(self, rope, hidden, residual, cache: LayerKVCache, meta: AttentionMetadata):
        x, residual = self.input_layernorm(hidden, residual)
        attn, _ = self.post_attention_layernorm(self.self_attn(rope[self.rope_index], x, cache, meta))
        x, residual = self.pre_feedforward_layernorm(attn, residual)
        out, _ = self.post_feedforward_layernorm(self.mlp(x))
        return out, residual

    __call__ = forward  # as DecoderLayer's: no nn.Module hook dispatch


class GemmaForCausalLM(LlamaForCausalLM):
    LAYER = GemmaDecoderLayer

    def __init__(
        self, config: ModelConfig, weights, device: torch.device, dtype: torch.dtype, lm_head_dtype=None
    ):
        super().__init__(config, weights, device, dtype, lm_head_dtype)
        # HF casts sqrt(hidden) to the embedding dtype; fp32 here, as the embeddings are.
        self.embed_scale = config.hidden_size**0.5
        self.local_rotary = self.rotary
        if config.rope_local_theta is not None:
            inv_freq = inverse_frequencies(config.head_dim, config.rope_local_theta, RopeScaling())
            self.local_rotary = RotaryEmbedding(inv_freq, device)

    def rope_tables(self, positions: torch.Tensor):
        """(full layers' tables, sliding layers' tables): each layer takes its own."""
        tables = self.rotary.tables(positions)
        local = tables if self.local_rotary is self.rotary else self.local_rotary.tables(positions)
        return tables, local

    def output_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return soft_cap(logits, self.config.final_softcap)
