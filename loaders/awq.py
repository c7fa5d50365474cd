"""AutoAWQ "GEMM" checkpoints <-> canonical W4A16.

Per linear layer of N outputs and K inputs, group size g (-1: g = K), G = K / g:
  qweight int32 [K, N/8]  packed along the output dim, interleaved: nibble j (bits 4j..4j+3) of
                          qweight[i, c] holds q[i, 8c + AWQ_ORDER[j]], AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7
  qzeros  int32 [G, N/8]  the integer zero points, packed the same way
  scales  fp16  [G, N]
  w[n, i] = (q[i, n] - z[i // g, n]) * scales[i // g, n]
(AutoAWQ's `WQLinear_GEMM.from_linear` packs with this order; its `dequantize_gemm` undoes it.)
Config: {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true, "version": "gemm"}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.kernels.w4a16_matmul import pack_int4, unpack_int4
from lowbit.runtime.quant import QuantizedWeight, W4A16Config

from .gptq import (
    group_size_of,
    integer_zeros,
    modules_with_qweight,
    pack_int32,
    take,
    tensor_name,
    to_fp16,
    unpack_int32,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SUFFIXES = ("qweight", "qzeros", "scales")


def _interleave(out_features: int) -> torch.Tensor:
    """index such that packed column 8c + j holds output index[8c + j] (= 8c + AWQ_ORDER[j])."""
    base = torch.arange(0, out_features, 8)[:, None]
    return (base + torch.tensor(AWQ_ORDER)[None, :]).flatten()


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Nibbles [R, N] (N outputs) -> int32 [R, N/8] in AWQ's interleaved order."""
    return pack_int32(values[:, _interleave(values.shape[1])], 4, dim=1)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> nibbles [R, N] in output order."""
    packed_order = unpack_int32(words, 4, dim=1)  # [R, N], column 8c + j is nibble j
    out = torch.empty_like(packed_order)
    out[:, _interleave(packed_order.shape[1])] = packed_order
    return out


@dataclass(frozen=True)
class AwqConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> AwqConfig:
        bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ bits {bits} is not supported (supported: 4)")
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (supported: 'gemm')")
        if not cfg.get("zero_point", True):
            raise ValueError("AWQ without zero points (zero_point: false) is not supported")
        group = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        if group != -1 and group < 1:
            raise ValueError(f"AWQ group_size must be -1 or positive, got {group}")
        return cls(bits, group)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": True,
            "version": "gemm",
        }


def awq_to_canonical(
    raw: Mapping[str, torch.Tensor], prefix: str, config: AwqConfig, out_features: int, in_features: int
) -> QuantizedWeight:
    group = in_features if config.group_size == -1 else config.group_size
    why = f"a {out_features}x{in_features} linear with 4-bit group size {group}"
    if in_features % group or out_features % 8:
        raise ValueError(
            f"{prefix}: {why} does not fit AWQ packing (in_features must be a multiple of the group size, "
            "out_features of 8)"
        )
    groups = in_features // group
    qweight = take(raw, tensor_name(prefix, "qweight"), (in_features, out_features // 8), "int32", why)
    qzeros = take(raw, tensor_name(prefix, "qzeros"), (groups, out_features // 8), "int32", why)
    scales = (
        take(raw, tensor_name(prefix, "scales"), (groups, out_features), "float", why).float().T.contiguous()
    )  # [N, G]
    q = unpack_awq(qweight).T  # [N, K]
    zeros = unpack_awq(qzeros).T.float()  # [N, G]
    tensors = {"qweight": pack_int4(q), "scales": scales, "mins": -zeros * scales}
    return QuantizedWeight(W4A16Config(group), out_features, in_features, tensors)


def canonical_to_awq(weight: QuantizedWeight, what: str = "weight") -> dict[str, torch.Tensor]:
    """A canonical W4A16 weight (no act-order) -> AWQ tensors by suffix."""
    if not isinstance(weight.config, W4A16Config):
        raise ValueError(f"{what}: AWQ holds W4A16 weights, not {weight.config.name}")
    if weight.config.act_order:
        raise ValueError(f"{what}: AWQ cannot hold act-order (GPTQ desc_act) weights")
    if weight.out_features % 8:
        raise ValueError(f"{what}: AWQ packs 8 outputs per int32; out_features {weight.out_features}")
    t = weight.tensors
    zeros = integer_zeros(t["scales"], t["mins"], what)  # [N, G]
    if bool((zeros < 0).any()) or bool((zeros > 15).any()):
        raise ValueError(
            f"{what}: AWQ zero points must lie in [0, 15], got [{int(zeros.min())}, {int(zeros.max())}]"
        )
    q = unpack_int4(t["qweight"])  # [N, K]
    return {
        "qweight": pack_awq(q.T),  # [K, N/8]
        "qzeros": pack_awq(zeros.T),  # [G, N/8]
        "scales": to_fp16(t["scales"].float().T.contiguous(), what),  # [G, N]
    }


class AwqFormat:
    """Reads AWQ linears out of a safetensors directory's tensors."""

    method = "awq"

    def __init__(self, quantization_config: Mapping[str, Any]):
        self.config = AwqConfig.from_dict(quantization_config)

    def quantized_modules(self, names: Iterable[str], linear_modules: Iterable[str] = ()) -> list[str]:
        return modules_with_qweight(names)

    def component_names(self, module: str) -> list[str]:
        return [f"{module}.{s}" for s in SUFFIXES]

    def required_names(self, module: str) -> list[str]:
        return self.component_names(module)

    def read(self, raw: Mapping[str, torch.Tensor], module: str, shape: tuple[int, int]) -> QuantizedWeight:
        return awq_to_canonical(raw, module, self.config, *shape)


class AwqWriter:
    def __init__(self) -> None:
        self.groups: set[int] = set()

    def add(self, module: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        tensors = canonical_to_awq(weight, module)
        self.groups.add(group_size_of(weight))
        return {f"{module}.{suffix}": t for suffix, t in tensors.items()}

    def dense(self, module: str) -> None:
        if module.startswith("model.layers."):
            raise ValueError(
                f"{module}: an AWQ checkpoint quantizes every decoder projection; this one is dense"
            )

    def quantization_config(self) -> dict[str, Any]:
        if len(self.groups) != 1:
            raise ValueError(f"AWQ needs one group size for all layers, got {sorted(self.groups) or 'none'}")
        return AwqConfig(4, next(iter(self.groups))).to_dict()

    def extra_files(self) -> dict[str, dict[str, Any]]:
        return {}
