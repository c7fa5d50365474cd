"""`ModelConfig` <-> HF `config.json` for Llama-family models (transformers 4 and 5 rope keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.runtime.models.config import ModelConfig, RopeScaling

MODEL_TYPES = ("llama", "mistral")


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(theta, scaling) from transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
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
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def from_hf_config(cfg: dict[str, Any], path: Path | str) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {MODEL_TYPES})")
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    return ModelConfig(
        architecture="llama",
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
    )


def to_hf_config(config: ModelConfig, dtype: str = "float16") -> dict[str, Any]:
    """A config.json that transformers (4 and 5), vLLM and lowbit all read."""
    s = config.rope_scaling
    rope: dict[str, Any] = {"rope_type": s.kind, "rope_theta": config.rope_theta}
    if s.kind != "default":
        rope["factor"] = s.factor
    if s.kind == "llama3":
        rope.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    legacy_scaling = None if s.kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,  # transformers 4
        "rope_scaling": legacy_scaling,  # transformers 4
        "rope_parameters": rope,  # transformers 5
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
