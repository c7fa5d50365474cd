"""HF Llama-family directories (config.json + *.safetensors, fp32/fp16/bf16).

Weights stay dense unless `quantization` asks for round-to-nearest on load ("w4a16" group 128,
"w8a16" per channel); then every decoder-layer projection is quantized as it is read. Embeddings,
norms and lm_head stay dense, as GPTQ/AWQ checkpoints leave them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lowbit.runtime.config import ModelConfig, RopeScaling
from lowbit.runtime.quant import WeightLike
from lowbit.runtime.quant.rtn import quantize_rtn

from .base import Checkpoint, LazyWeights
from .tokenizer import tokenizer_from_pretrained

MODEL_TYPES = ("llama", "mistral")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def model_config(cfg: dict[str, Any], path: Path) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {MODEL_TYPES})")
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("quant_method")
        raise ValueError(f"{path}: quantized checkpoints ({method!r}) are not supported by this loader yet")
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


def _index(path: Path) -> dict[str, Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                index[name] = file
    return index


def load_safetensors_dir(path: str | os.PathLike, quantization: str | None = None) -> Checkpoint:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json")
    config = model_config(json.loads(config_file.read_text()), path)
    index = _index(path)

    def fetch(name: str) -> WeightLike:
        with safe_open(index[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if quantization and name.split(".")[-2] in _PROJECTIONS:
            return quantize_rtn(tensor, quantization)
        return tensor

    return Checkpoint(config, LazyWeights(list(index), fetch), tokenizer_from_pretrained(path), str(path))
