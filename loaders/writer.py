"""Write a `Checkpoint` as an HF directory in one of the formats we read: GPTQ (v1 or v2), AWQ,
compressed-tensors, or plain dense safetensors.

out_dir gets config.json (with the format's quantization_config), model.safetensors, the tokenizer
files, generation_config.json (the eos ids) and, for GPTQ, quantize_config.json. Decoder projections
are written in the format's tensors; every other weight (embeddings, norms, lm_head) dense in
`dense_dtype`, dequantized if it was quantized (a GGUF's Q8_0 embedding, say). With
tie_word_embeddings there is no lm_head. Scales are stored as each format usually stores them: fp16
for GPTQ and AWQ, `dense_dtype` for compressed-tensors. The "safetensors" format dequantizes every
weight; it has no way to say that W8A8 also quantizes activations, so W8A8 weights are refused there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from lowbit.runtime.quant import DenseConfig, QuantizedWeight, W8A8Config, method_for

from .awq import AwqWriter
from .base import Checkpoint
from .compressed_tensors import CompressedTensorsWriter
from .gptq import GptqWriter
from .hf_config import to_hf_config

WRITE_FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors", "safetensors")
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
)  # fmt: skip


class FormatWriter(Protocol):
    def add(self, module: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]: ...

    def dense(self, module: str) -> None: ...

    def quantization_config(self) -> dict[str, Any]: ...

    def extra_files(self) -> dict[str, dict[str, Any]]: ...


def _format_writer(format: str, dense_dtype: torch.dtype) -> FormatWriter | None:
    if format in ("gptq", "gptq_v2"):
        return GptqWriter(format)
    if format == "awq":
        return AwqWriter()
    if format == "compressed-tensors":
        return CompressedTensorsWriter(dense_dtype)
    return None


def _is_projection(name: str) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in _PROJECTIONS


def _dense(name: str, weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype).contiguous()
    if isinstance(weight.config, W8A8Config):
        raise ValueError(
            f"{name}: a W8A8 weight cannot be written dense (its activations are quantized too); "
            "write compressed-tensors"
        )
    return method_for(weight.config).dequantize(weight.tensors).to(dtype).contiguous()


def _tensors(
    checkpoint: Checkpoint, writer: FormatWriter | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint under the names the format gives it."""
    out: dict[str, torch.Tensor] = {}
    tied = checkpoint.config.tie_word_embeddings
    for name in checkpoint.weights:
        if name == "rope_freqs" or (tied and name == "lm_head.weight"):
            continue  # rope scaling is in config.json; a tied head is the embedding
        weight = checkpoint.weights[name]
        if isinstance(weight, QuantizedWeight) and isinstance(weight.config, DenseConfig):
            weight = weight.tensors["weight"]
        module = name.removesuffix(".weight")
        if writer is not None and _is_projection(name) and isinstance(weight, QuantizedWeight):
            out.update(writer.add(module, weight))
            continue
        if writer is not None and (_is_projection(name) or name == "lm_head.weight"):
            writer.dense(module)
        out[name] = _dense(name, weight, dtype)
    return out


def _generation_config(checkpoint: Checkpoint) -> dict[str, Any]:
    eos = sorted(checkpoint.tokenizer.eos_token_ids)
    config: dict[str, Any] = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    bos = checkpoint.tokenizer.hf.bos_token_id
    if bos is not None:
        config["bos_token_id"] = bos
    return config


def _prepare(out: Path, extra: dict[str, dict[str, Any]]) -> None:
    """Create `out`; refuse other weight files there (loaders read every *.safetensors) and drop a
    quantize_config.json this format does not write (it would make the directory read as GPTQ)."""
    stale = sorted(f.name for f in out.glob("*.safetensors") if f.name != "model.safetensors")
    if stale:
        raise ValueError(f"{out}: holds other weight files {stale}; write to an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    if "quantize_config.json" not in extra:
        (out / "quantize_config.json").unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(
    checkpoint: Checkpoint,
    out_dir: str | os.PathLike,
    format: str,
    dense_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write `checkpoint` to `out_dir` in `format` (one of WRITE_FORMATS); returns the directory.

    A weight the format cannot hold (W8A8 in GPTQ, act-order in AWQ, GGUF Q4_1's float minimums
    anywhere but dense) is a ValueError, raised before anything is written.
    """
    if format not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {WRITE_FORMATS}, got {format!r}")
    if dense_dtype not in _DTYPE_NAMES:
        raise ValueError(f"dense_dtype must be one of {list(_DTYPE_NAMES)}, got {dense_dtype}")
    writer = _format_writer(format, dense_dtype)
    tensors = _tensors(checkpoint, writer, dense_dtype)
    config = to_hf_config(checkpoint.config, _DTYPE_NAMES[dense_dtype])
    extra: dict[str, dict[str, Any]] = {}
    if writer is not None:
        config["quantization_config"] = writer.quantization_config()
        extra = writer.extra_files()
    out = Path(out_dir)
    _prepare(out, extra)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    for file_name, data in extra.items():
        _write_json(out / file_name, data)
    checkpoint.tokenizer.hf.save_pretrained(str(out))
    _write_json(out / "generation_config.json", _generation_config(checkpoint))
    return out
