"""`ModelConfig` <-> HF `config.json` (transformers 4 and 5 keys): Llama, Mistral, Qwen2/Qwen2.5,
Qwen3 (dense), Phi-3, Gemma 2 and Gemma 3 (text). Each family's differences are read from the
fields its transformers config class defines (LlamaConfig.attention_bias/mlp_bias, Qwen2's q/k/v
biases, Qwen3's q/k norms, Mistral's sliding_window, Phi-3's LongRoPE, Gemma's soft-caps,
query_pre_attn_scalar, sliding/full layer pattern and Gemma 3's local rope base)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lowbit.runtime.models.config import ModelConfig, RopeScaling

# HF model_type -> lowbit architecture (GGUF's name).
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
# architecture -> (model_type, the HF class name) written back by to_hf_config.
HF_CLASSES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(theta, scaling) from transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`,
    per layer type for Gemma 3: the full layers' here)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError(
            "rotary embeddings over part of each head (partial_rotary_factor < 1) are not supported"
        )
    if kind in ("longrope", "su"):
        return theta, _longrope(cfg, params)
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, longrope)")


def _longrope(cfg: dict[str, Any], params: dict[str, Any]) -> RopeScaling:
    """Phi-3's LongRoPE with transformers' attention factor: given, else from the ratio of the
    context to the original one, sqrt(1 + ln(ratio) / ln(original)) (1 when not longer)."""
    original = int(params.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"])
    factor = params.get("factor") or cfg["max_position_embeddings"] / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        "longrope",
        factor=float(factor),
        original_max_position_embeddings=original,
        short_factor=tuple(float(f) for f in params["short_factor"]),
        long_factor=tuple(float(f) for f in params["long_factor"]),
        attention_factor=float(attention),
    )


def _gemma(cfg: dict[str, Any], model_type: str, path: Path | str) -> dict[str, Any]:
    """Gemma 2 / Gemma 3's fields. Without `layer_types` (transformers 4), transformers' patterns:
    Gemma 2's even layers slide, Gemma 3's all but every `sliding_window_pattern`-th (6)."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act not in _GELU_TANH:
        raise ValueError(f"{path}: {model_type}'s activation {act!r} is not supported (supported: GELU-tanh)")
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        pattern = 2 if model_type == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    fields: dict[str, Any] = {
        "hidden_act": "gelu_tanh",
        "query_pre_attn_scalar": cfg["query_pre_attn_scalar"],
        "attn_softcap": float(cfg.get("attn_logit_softcapping") or 0.0),
        "final_softcap": float(cfg.get("final_logit_softcapping") or 0.0),
        "sliding_window": cfg.get("sliding_window"),
        "layer_types": tuple("sliding" if t == "sliding_attention" else "full" for t in types),
    }
    if model_type == "gemma3_text":
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{path}: rope scaling on Gemma 3's sliding layers is not supported")
        theta = local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        fields.update(qk_norm=True, rope_local_theta=float(theta))
    return fields


def _family(cfg: dict[str, Any], model_type: str, path: Path | str) -> dict[str, Any]:
    """The ModelConfig fields in which a family differs from plain Llama."""
    bias = bool(cfg.get("attention_bias", False))  # Llama and Qwen3: q, k, v and o
    fields: dict[str, Any] = {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(cfg.get("mlp_bias", False))}
    if model_type == "mistral":
        fields["sliding_window"] = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            # Qwen's window applies only from layer max_window_layers on; no released model uses it.
            raise ValueError(f"{path}: {model_type} with use_sliding_window=true is not supported")
        fields["mlp_bias"] = False
    if model_type == "qwen2":  # Qwen2Attention: bias on q/k/v, none on o
        fields.update(qkv_bias=True, o_bias=False)
    if model_type == "qwen3":
        fields["qk_norm"] = True
    if model_type == "phi3":  # Phi3Attention / Phi3MLP: one qkv_proj, one gate_up_proj (gate rows first)
        fields.update(fused_qkv=True, fused_gate_up=True, sliding_window=cfg.get("sliding_window"))
    if model_type in ("gemma2", "gemma3_text"):
        fields.update(_gemma(cfg, model_type, path))
    return fields


def from_hf_config(cfg: dict[str, Any], path: Path | str) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:
        raise ValueError(
            f"{path}: Gemma 3 image-text checkpoints (Gemma3ForConditionalGeneration) are not supported; "
            "text-only ones (model_type gemma3_text, e.g. gemma-3-1b) and their GGUF conversions are"
        )
    if model_type not in MODEL_TYPES:
        supported = list(MODEL_TYPES)
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {supported})")
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    return ModelConfig(
        architecture=MODEL_TYPES[model_type],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        **_family(cfg, model_type, path),
    )


def to_hf_config(config: ModelConfig, dtype: str = "float16") -> dict[str, Any]:
    """A config.json that transformers (4 and 5), vLLM and lowbit all read."""
    s = config.rope_scaling
    rope: dict[str, Any] = {"rope_type": s.kind, "rope_theta": config.rope_theta}
    if s.kind != "default":
        rope["factor"] = s.factor
    if s.kind == "longrope":
        rope.update(
            short_factor=list(s.short_factor),
            long_factor=list(s.long_factor),
            original_max_position_embeddings=s.original_max_position_embeddings,
            attention_factor=s.attention_factor,
        )
    if s.kind == "llama3":
        rope.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    legacy_scaling = None if s.kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    arch = config.architecture
    if arch not in HF_CLASSES:
        raise ValueError(f"no HF config for architecture {arch!r} (supported: {list(HF_CLASSES)})")
    # What each family's HF class can express.
    if config.qk_norm != (arch in ("qwen3", "gemma3")) or (arch == "qwen2" and not config.qkv_bias):
        raise ValueError(f"{arch}: q/k norms are Qwen3's and Gemma 3's alone; Qwen2 always has q/k/v biases")
    if config.fused_qkv != (arch == "phi3") or config.fused_gate_up != (arch == "phi3"):
        raise ValueError(f"{arch}: fused qkv_proj / gate_up_proj are Phi-3's alone")
    if config.qkv_bias != config.o_bias and arch != "qwen2":
        raise ValueError(f"{arch}: HF's attention_bias sets q/k/v and o biases together")
    family: dict[str, Any] = {"attention_bias": config.o_bias, "mlp_bias": config.mlp_bias}
    if arch == "qwen2":
        family = {"use_sliding_window": False}
    elif arch == "qwen3":
        family = {"attention_bias": config.o_bias, "use_sliding_window": False}
    elif arch in ("mistral", "phi3"):
        family["sliding_window"] = config.sliding_window
    elif arch in ("gemma2", "gemma3"):
        family.update(_gemma_fields(config, rope))
    model_type, hf_class = HF_CLASSES[arch]
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "gelu_pytorch_tanh" if config.hidden_act == "gelu_tanh" else "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,  # transformers 4
        "rope_scaling": legacy_scaling,  # transformers 4
        "rope_parameters": rope,  # transformers 5
        "torch_dtype": dtype,
        **family,
    }


def _gemma_fields(config: ModelConfig, rope: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
        "attn_logit_softcapping": config.attn_softcap or None,
        "final_logit_softcapping": config.final_softcap or None,
        "sliding_window": config.sliding_window,
        "layer_types": [f"{config.layer_types[i] if config.layer_types else 'sliding'}_attention"
                        for i in range(config.num_layers)],
    }  # fmt: skip
    if config.architecture == "gemma3":
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta}
        fields.update(rope_parameters={"full_attention": rope, "sliding_attention": local})
        fields.update(rope_local_base_freq=config.rope_local_theta)  # transformers 4
    return fields
