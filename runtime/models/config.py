"""What the model is: the shape of a decoder, read from a GGUF header or a config.json.

It lives beside the model code rather than with the engine settings (`runtime/config.py`) because
the loaders produce it too: they import this module, and importing it must never pull in the model,
its layers or its kernels (hence no torch here and a light `runtime/models/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default", "linear", "llama3" or "longrope" (HF's names).

    longrope (Phi-3-128k, Phi-3.5): per-frequency divisors `short_factor` / `long_factor` [D/2],
    cos/sin multiplied by `attention_factor`; `use_long` picks the long factors for every position
    (the engine sets it when its context passes original_max_position_embeddings).
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    use_long: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama- or Gemma-family decoder, read from a GGUF header or a config.json.

    The families differ by data here: `qkv_bias` (Qwen2, Llama's attention_bias), `o_bias`
    (attention_bias), `mlp_bias`, `qk_norm` (Qwen3, Gemma 3: RMSNorm over each head's q and k
    before rotary), `sliding_window` (Mistral, Phi-3, Gemma: each token attends to the last
    `sliding_window` positions) on the layers `layer_types` marks "sliding" (all of them when it is
    empty), `fused_qkv` / `fused_gate_up` (Phi-3's checkpoints store those projections as one
    weight each), `hidden_act` (the gated MLP's activation: "silu", or Gemma's "gelu_tanh"),
    `query_pre_attn_scalar` (Gemma: scores scaled by its ** -0.5 instead of head_dim's),
    `attn_softcap` / `final_softcap` (Gemma 2's attention and output logit caps, 0: none) and
    `rope_local_theta` (Gemma 3's sliding layers rotate with their own base and no scaling).
    What is code rather than data (Gemma's extra norms, its embedding scale) lives in the
    family's model class (runtime/models/registry.py).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: {ACTIVATIONS})")
        if self.layer_types and (
            len(self.layer_types) != self.num_layers or set(self.layer_types) - {"sliding", "full"}
        ):
            raise ValueError(f"layer_types must be 'sliding' or 'full' for each of {self.num_layers} layers")

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window, 0 for full attention."""
        sliding = not self.layer_types or self.layer_types[layer] == "sliding"
        return self.sliding_window or 0 if sliding else 0


ACTIVATIONS = ("silu", "gelu_tanh")
