"""GGUF block types kept as the file stores them (K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS), and the
kernels that run group-32 W4A16/W8A16 weights as GGUF blocks.

Layout: kernels/ggml_blocks_ref.py (uint8 [out, row_bytes], the tensor's bytes in the file), run by
kernels/cpu/ggml.py on CPU and kernels/triton_ggml.py on CUDA, both on those bytes as they are. GGUF's
Q4_0, Q4_1 and Q8_0 load as W4A16/W8A16, whose layouts hold them exactly (loaders/gguf_blocks.py);
on CPUs without AVX-512 their kernels below rebuild the same blocks at load (CpuGGMLInt4Kernel,
CpuGGMLInt8Kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import ggml_blocks_ref as ref
from lowbit.kernels.cpu import extension
from lowbit.kernels.cpu import ggml as cpu_ggml
from lowbit.kernels.triton_support import triton_unavailable

from .base import DequantizedKernel, LinearKernel, QuantConfig, QuantLinearMethod, TensorSpec, TritonKernel

TYPES = cpu_ggml.TYPES


@dataclass(frozen=True)
class GGMLConfig(QuantConfig):
    """qtype: the ggml type's name (gguf.GGMLQuantizationType), one of TYPES."""

    qtype: str = "Q4_K"
    name = "ggml"

    def __post_init__(self) -> None:
        if self.qtype not in TYPES:
            raise ValueError(f"ggml type {self.qtype!r} is not supported (supported: {', '.join(TYPES)})")


class _FileBlockRows:
    """Kernels that keep the file's blocks as they are: a row gather is a row copy (a tied
    embedding reads its rows there)."""

    keeps_rows = True

    def gather_rows(self, packed, rows):
        return {"blocks": packed["blocks"][rows]}


class _Q8_0Rows:
    """Kernels that hold W8A16 groups of 32 as the exact Q8_0 blocks: they need fp16 scales, and
    rows read back as canonical W8A16."""

    keeps_rows = True

    def can_pack(self, tensors):
        return None if cpu_ggml.fp16_exact(tensors["scales"]) else "scales are not fp16 values"

    def gather_rows(self, packed, rows):
        return cpu_ggml.q8_0_rows(packed["blocks"][rows])


class CpuGGMLKernel(_FileBlockRows, LinearKernel):
    """kernels/cpu/ggml_blocks.cpp on the file's blocks."""

    name = "cpu-ggml"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if device.type != "cpu":
            return "CPU only"
        return cpu_ggml.supports(config.qtype)

    def pack(self, tensors):
        return {"blocks": tensors["blocks"].contiguous()}

    def apply(self, x, packed):
        return cpu_ggml.gemm(x, packed["blocks"], self.config.qtype)

    def compiled_layer_operands(self, packed, in_features):
        return [packed["blocks"]], -cpu_ggml.type_id(self.config.qtype)


def group_kernel_refusal(config, device: torch.device) -> str | None:
    """Why W4A16/W8A16 group-32 weights should not run as GGUF blocks here (None: they should).
    Only on CPUs without AVX-512: there the group GEMMs of kernels/cpu/gemm.py run portable fp32
    loops, measured on an AMD EPYC (AVX2, 2 threads, 8192x2048, one bf16 row) at 10.9 ms (Q4_0)
    and 7.8 ms (Q8_0) against 1.7 and 1.6 ms here; with AVX-512 and AMX they have paths of their own."""
    if device.type != "cpu":
        return "CPU only"
    if config.group_size != 32 or getattr(config, "act_order", False):
        return "GGUF blocks hold groups of 32 in input order"
    if (reason := cpu_ggml.supports("Q4_0")) is not None:
        return reason
    if extension.load().has_avx512():
        return "this CPU has the AVX-512 group GEMMs"
    return None


class CpuGGMLInt4Kernel(LinearKernel):
    """W4A16 group-32 weights with fp16 scales and mins (GGUF Q4_0/Q4_1) as the exact Q4_0/Q4_1
    blocks, through kernels/cpu/ggml.py (see group_kernel_refusal for where)."""

    name = "cpu-ggml-int4"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        return group_kernel_refusal(config, device)

    def can_pack(self, tensors):
        return (
            None
            if cpu_ggml.fp16_exact(tensors["scales"], tensors["mins"])
            else "scales or mins not fp16 values"
        )

    def pack(self, tensors):
        blocks, self.qtype = cpu_ggml.int4_blocks(tensors["qweight"], tensors["scales"], tensors["mins"])
        return {"blocks": blocks}

    def apply(self, x, packed):
        return cpu_ggml.gemm(x, packed["blocks"], self.qtype)

    def compiled_layer_operands(self, packed, in_features):
        return [packed["blocks"]], -cpu_ggml.type_id(self.qtype)


class CpuGGMLInt8Kernel(_Q8_0Rows, LinearKernel):
    """W8A16 group-32 weights with fp16 scales (GGUF Q8_0) as the exact Q8_0 blocks, through
    kernels/cpu/ggml.py (see group_kernel_refusal for where)."""

    name = "cpu-ggml-int8"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if config.group_size is None:
            return "GGUF blocks hold groups of 32"
        return group_kernel_refusal(config, device)

    def pack(self, tensors):
        return {"blocks": cpu_ggml.int8_blocks(tensors["qweight"], tensors["scales"])}

    def apply(self, x, packed):
        return cpu_ggml.gemm(x, packed["blocks"], "Q8_0")

    def compiled_layer_operands(self, packed, in_features):
        return [packed["blocks"]], -cpu_ggml.type_id("Q8_0")


class TritonGGMLKernel(_FileBlockRows, TritonKernel):
    """kernels/triton_ggml.py on the file's blocks (every block decoded in registers)."""

    name = "triton-ggml"
    module = "triton_ggml"

    def pack(self, tensors):
        return {"blocks": tensors["blocks"].to(self.device).contiguous()}

    def apply(self, x, packed):
        return self.ops.ggml_matmul_triton(x, packed["blocks"], self.config.qtype)


class TritonGGMLInt8Kernel(_Q8_0Rows, TritonKernel):
    """W8A16 group-32 weights with fp16 scales (GGUF Q8_0) on CUDA, as the exact Q8_0 blocks
    through kernels/triton_ggml.py (W8A16 has no Triton GEMM of its own)."""

    name = "triton-ggml-int8"
    module = "triton_ggml"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype):
        if config.group_size != 32:
            return "GGUF Q8_0 blocks hold groups of 32"
        return super().can_implement(config, out_features, in_features, device, dtype)

    def pack(self, tensors):
        blocks = cpu_ggml.int8_blocks(tensors["qweight"].cpu(), tensors["scales"].cpu())
        return {"blocks": blocks.to(self.device)}

    def apply(self, x, packed):
        return self.ops.ggml_matmul_triton(x, packed["blocks"], "Q8_0")


class GGMLMethod(QuantLinearMethod):
    kernels = (TritonGGMLKernel, CpuGGMLKernel, DequantizedKernel)

    def create_weights(self, in_features, out_features):
        return {
            "blocks": TensorSpec((out_features, ref.row_bytes(self.config.qtype, in_features)), torch.uint8)
        }

    def dequantize(self, tensors):
        """fp32 [out, in], gguf-py's values; computed where the blocks are: the compiled CPU
        dequantizer, the Triton one on CUDA (an embedding lookup per step stays on the GPU), else
        gguf-py itself."""
        blocks = tensors["blocks"]
        if blocks.device.type == "cpu" and cpu_ggml.supports(self.config.qtype) is None:
            in_features = ref.in_features(self.config.qtype, blocks.shape[1])
            return cpu_ggml.dequantize(blocks, in_features, self.config.qtype)
        if blocks.device.type == "cuda" and triton_unavailable(blocks.device) is None:
            from lowbit.kernels import triton_ggml  # imports triton: only where a GPU has the blocks

            return triton_ggml.dequantize_ggml_triton(blocks.contiguous(), self.config.qtype).contiguous()
        return ref.dequantize_ref(blocks, self.config.qtype).to(blocks.device)
