"""HF Llama-family directories: config.json + *.safetensors, dense or quantized.

Dense (fp32/fp16/bf16): weights stay dense unless `quantization` asks for round-to-nearest on load
("w4a16" group 128, "w8a16" per channel, "w8a8"); then every decoder-layer projection is quantized as
it is read. Embeddings, norms and lm_head stay dense, as GPTQ/AWQ checkpoints leave them.

Quantized: config.json's `quantization_config` (or, from old AutoGPTQ, a lone quantize_config.json)
names the format by `quant_method`: gptq, awq or compressed-tensors (loaders/gptq.py, awq.py,
compressed_tensors.py). The weights mapping then holds canonical `QuantizedWeight`s under the HF names
("model.layers.0.self_attn.q_proj.weight") for the quantized linears, the file's tensors for the rest,
each checked against the shape config.json implies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.quant import QuantizedWeight, WeightLike
from lowbit.runtime.quant.rtn import RTN_SCHEMES, quantize_rtn

from .awq import AwqFormat
from .base import Checkpoint, LazyWeights
from .compressed_tensors import CompressedTensorsFormat
from .gptq import GptqFormat
from .hf_config import from_hf_config
from .tokenizer import tokenizer_from_pretrained

_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
)  # fmt: skip


class QuantFormat(Protocol):
    """What a quantized format's reader offers (GptqFormat, AwqFormat, CompressedTensorsFormat)."""

    method: str

    def quantized_modules(self, names: Collection[str], linear_modules: Collection[str]) -> list[str]: ...

    def component_names(self, module: str) -> list[str]: ...

    def required_names(self, module: str) -> list[str]: ...

    def read(
        self, raw: Mapping[str, torch.Tensor], module: str, shape: tuple[int, int]
    ) -> QuantizedWeight: ...


FORMATS: dict[str, type] = {
    "gptq": GptqFormat,
    "awq": AwqFormat,
    "compressed-tensors": CompressedTensorsFormat,
}


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) of every linear layer config.json implies."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, ffn = config.hidden_size, config.intermediate_size
    per_layer = {"self_attn.o_proj": (hidden, q), "mlp.down_proj": (hidden, ffn)}
    if config.fused_qkv:  # Phi-3
        per_layer["self_attn.qkv_proj"] = (q + 2 * kv, hidden)
    else:
        per_layer.update({"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden)})
        per_layer["self_attn.v_proj"] = (kv, hidden)
    if config.fused_gate_up:
        per_layer["mlp.gate_up_proj"] = (2 * ffn, hidden)
    else:
        per_layer.update({"mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden)})
    shapes = {
        f"model.layers.{i}.{name}": s for i in range(config.num_layers) for name, s in per_layer.items()
    }
    shapes["lm_head"] = (config.vocab_size, hidden)
    return shapes


def _dense_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape, for the 2-D weights whose shape config.json fixes."""
    shapes: dict[str, tuple[int, ...]] = {f"{m}.weight": s for m, s in linear_shapes(config).items()}
    shapes["model.embed_tokens.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


class SafetensorsTensors(Mapping[str, torch.Tensor]):
    """Every tensor of a directory's *.safetensors files by name, read only when asked for."""

    def __init__(self, path: Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors files")
        self.index: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self.index[name] = file

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.index[name], framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def quant_format(cfg: Mapping[str, Any], path: Path) -> QuantFormat | None:
    """The reader for a quantized directory's format, or None for a dense one."""
    qcfg = cfg.get("quantization_config")
    where = path / "config.json"
    if qcfg is None and (path / "quantize_config.json").is_file():
        where = path / "quantize_config.json"
        qcfg = {"quant_method": "gptq", **json.loads(where.read_text())}
    if qcfg is None:
        return None
    method = qcfg.get("quant_method")
    if method not in FORMATS:
        raise ValueError(
            f"{where}: quantized checkpoints with quant_method {method!r} are not supported "
            f"(supported: {sorted(FORMATS)})"
        )
    try:
        return FORMATS[method](qcfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_safetensors_dir(path: str | os.PathLike, quantization: str | None = None) -> Checkpoint:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json")
    cfg = json.loads(config_file.read_text())
    config = from_hf_config(cfg, path)
    fmt = quant_format(cfg, path)
    if quantization is not None and quantization not in RTN_SCHEMES:
        raise ValueError(f"quantization must be one of {sorted(RTN_SCHEMES)}, got {quantization!r}")
    if quantization and fmt is not None:
        raise ValueError(
            f"{path}: quantization={quantization!r} applies to dense checkpoints; this one is already "
            f"quantized ({fmt.method})"
        )
    raw = SafetensorsTensors(path)
    weights = (
        _dense_weights(raw, config, quantization)
        if fmt is None
        else _quantized_weights(raw, config, fmt, path)
    )
    return Checkpoint(config, weights, tokenizer_from_pretrained(path), str(path))


def _checked(raw: SafetensorsTensors, name: str, shapes: Mapping[str, tuple[int, ...]]) -> torch.Tensor:
    tensor = raw[name]
    if name in shapes and tuple(tensor.shape) != shapes[name]:
        raise ValueError(
            f"{raw.index[name]}: tensor {name!r} has shape {tuple(tensor.shape)}, "
            f"config.json implies {shapes[name]}"
        )
    return tensor


def _dense_weights(raw: SafetensorsTensors, config: ModelConfig, quantization: str | None) -> LazyWeights:
    shapes = _dense_shapes(config)

    def fetch(name: str) -> WeightLike:
        tensor = _checked(raw, name, shapes)
        if quantization and name.endswith(".weight") and name.split(".")[-2] in _PROJECTIONS:
            return quantize_rtn(tensor, quantization)
        return tensor

    return LazyWeights(list(raw), fetch)


def _quantized_weights(
    raw: SafetensorsTensors, config: ModelConfig, fmt: QuantFormat, path: Path
) -> LazyWeights:
    shapes = linear_shapes(config)
    modules = fmt.quantized_modules(raw.index.keys(), shapes.keys())
    for module in modules:
        if module not in shapes:
            raise ValueError(
                f"{path}: {fmt.method} tensors for {module!r}, which is not a linear layer of this model"
            )
        for name in fmt.required_names(module):
            if name not in raw:
                raise ValueError(f"{path}: missing tensor {name!r} of the {fmt.method} linear {module!r}")
    quantized = set(modules)
    hidden = {name for module in modules for name in fmt.component_names(module)}
    names = list(dict.fromkeys([f"{m}.weight" for m in modules] + [n for n in raw if n not in hidden]))
    dense_shapes = _dense_shapes(config)

    def fetch(name: str) -> WeightLike:
        module = name.removesuffix(".weight")
        if module not in quantized:
            return _checked(raw, name, dense_shapes)
        try:
            return fmt.read(raw, module, shapes[module])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    return LazyWeights(names, fetch)
