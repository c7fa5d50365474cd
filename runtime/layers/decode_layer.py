"""How a step runs the model's decoder layers: the eager DecoderLayers, or, for decode steps on CPU,
one compiled call per layer (kernels/cpu/decode_layer.cpp). The model picks its decode path once,
at build, from an ordered list (runtime/models/llama.py); prompts always take the eager layers.

At one token per sequence the eager layer spends almost as long between its ops (Python frames,
torch dispatch, small allocations) as in them: measured ~180 us a layer for the default model's 30
layers on 2 threads, against ~250 us in its GEMMs. The compiled layer runs the same ops as the
eager DecoderLayer with the compiled-cpu attention and norm backends, with the same roundings
(tests/model/test_cpu_ops_engine.py compares the two). It can run a model whose every projection is
computed by kernels that hand it their packed tensors (`LinearKernel.compiled_layer_operands`:
the group-quantized CPU GEMMs of kernels/cpu/gemm.py, which GGUF, GPTQ and AWQ int4 and Q8_0
weights pick on CPU, and the GGUF block GEMM of kernels/cpu/ggml.py). A projection whose parts
could not be fused (a K-quant mix such as Q4_K q/k with a Q6_K v) runs as several GEMMs inside the
compiled layer.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from lowbit.kernels.cpu import extension
from lowbit.runtime.backends.attention import CompiledCPUAttention
from lowbit.runtime.backends.base import Backend
from lowbit.runtime.kv_cache import LayerKVCache

from .attention_metadata import AttentionMetadata
from .linear import joint_bias

Rope = tuple[torch.Tensor, torch.Tensor]


class LayerPath(Backend):
    """Runs a step through all decoder layers of a model."""

    @classmethod
    def can_implement(cls, layers: Sequence[Any], device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @abstractmethod
    def __call__(
        self, hidden: torch.Tensor, rope: Rope, kv_caches: Sequence[LayerKVCache], meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the embeddings fp32 [T, hidden]; rope: the step's (cos, sin).
        Returns (the last layer's output, the residual fp32)."""


class EagerLayers(LayerPath):
    """Each DecoderLayer in turn: any step, any model."""

    name = "eager-layers"

    def __init__(self, layers: Sequence[Any], device: torch.device, dtype: torch.dtype) -> None:
        self.layers = layers

    def __call__(self, hidden, rope, kv_caches, meta):
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, cache, meta)
        return hidden, residual


def _operands(projection: Any) -> list[tuple[list[torch.Tensor], int]] | str:
    """(packed tensors, code) of each GEMM of a Linear/FusedLinear, else why it cannot run in the
    compiled layer."""
    operands = []
    for part in getattr(projection, "parts", [projection]):
        packed = part.packed
        found = packed.kernel.compiled_layer_operands(packed.tensors, packed.in_features)
        if found is None:
            return f"its {packed.kernel.name} weights"
        operands.append(found)
    return operands


def _bias(projection: Any, dtype: torch.dtype) -> torch.Tensor:
    """The bias of a Linear/FusedLinear's whole output in the compute dtype, or an empty tensor
    where no part has one (decode_layer.cpp's "none")."""
    parts = getattr(projection, "parts", [projection])
    bias = joint_bias([part.bias for part in parts], [part.packed.out_features for part in parts])
    return torch.empty(0) if bias is None else bias.to(dtype)


def _projections(layer: Any) -> dict[str, Any]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": attn.qkv, "o_proj": attn.o_proj, "gate_up": mlp.gate_up, "down_proj": mlp.down_proj}


class CompiledCPULayers(LayerPath):
    """Decode steps (one token per sequence) as one compiled call per layer."""

    name = "compiled-cpu-layers"

    @classmethod
    def can_implement(cls, layers, device, dtype):
        if device.type != "cpu":
            return "CPU only"
        if extension.load() is None:
            return "compiled CPU ops unavailable"
        for i, layer in enumerate(layers):
            if layer.not_compiled:
                return layer.not_compiled
            if not isinstance(layer.self_attn.backend, CompiledCPUAttention):
                return f"layer {i}'s attention runs on {layer.self_attn.backend.name}"
            if layer.input_layernorm.quantize_output or layer.post_attention_layernorm.quantize_output:
                return f"layer {i} quantizes a norm's output"
            for name, projection in _projections(layer).items():
                if isinstance(operands := _operands(projection), str):
                    return f"layer {i}'s {name} cannot run in the compiled layer ({operands})"
        return None

    def __init__(self, layers: Sequence[Any], device: torch.device, dtype: torch.dtype) -> None:
        ops = extension.load()
        self.layers = []
        for layer in layers:
            attn, norms = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
            projections = [_operands(p) for p in _projections(layer).values()]
            parts = [part for projection in projections for part in projection]
            biases = [_bias(p, dtype) for p in _projections(layer).values()]
            q_norm, k_norm = (n.weight for n in attn.qk_norm) if attn.qk_norm else (torch.empty(0),) * 2
            self.layers.append(ops.DecodeLayer(
                norms[0].weight, norms[1].weight, norms[0].eps, [t for t, _ in parts], [c for _, c in parts],
                [len(p) for p in projections], biases, q_norm, k_norm, attn.num_heads, attn.num_kv_heads,
                attn.spec.scale, attn.spec.window, attn.spec.softcap, dtype,
            ))  # fmt: skip

    def __call__(self, hidden, rope, kv_caches, meta):
        residual, x = hidden, None
        cos, sin = rope
        tables, lens = meta.decode_block_tables, meta.context_lens
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(
                x, residual, cos, sin, cache.k, cache.v, cache.k_scale, cache.v_scale,
                meta.slot_mapping, tables, lens,
            )  # fmt: skip
        return x, residual
