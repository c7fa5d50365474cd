"""The quantization interfaces: a scheme says what is stored, a kernel says how it is computed.

- `QuantConfig`: one frozen dataclass per scheme (dense, W4A16, W8A16, ...).
- `QuantizedWeight`: a linear weight in the scheme's canonical layout, as loaders produce it.
  The layouts are documented at the top of each `kernels/<scheme>_matmul.py`.
- `LinearKernel`: one way to compute a scheme on a device. `can_implement` says whether it can;
  `pack` turns the canonical tensors into the layout it wants, once, at load.
- `QuantLinearMethod`: per scheme. `create_weights` names the canonical tensors and their shapes,
  `load` validates a `QuantizedWeight` and packs it for the best kernel, `apply` runs it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.kernels.triton_support import triton_unavailable


@dataclass(frozen=True)
class QuantConfig:
    """Base of all scheme configs. `name` is the scheme's user-facing name."""

    name: ClassVar[str] = "base"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a canonical tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype


# Canonical tensors indexed by input feature rather than output row (GPTQ act-order's column order):
# row selection keeps them whole, and fusing needs them equal.
COLUMN_TENSORS = frozenset({"perm"})


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A linear weight [out_features, in_features] in the canonical layout of `config`'s scheme.

    Every canonical tensor but those in COLUMN_TENSORS is row-major over output features, so
    selecting or concatenating output rows is exact on packed data (used to undo GGUF's q/k
    permutation and to fuse q/k/v).
    """

    config: QuantConfig
    out_features: int
    in_features: int
    tensors: Mapping[str, torch.Tensor]

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        tensors = {
            name: t if name in COLUMN_TENSORS else t[index].contiguous() for name, t in self.tensors.items()
        }
        return QuantizedWeight(self.config, len(index), self.in_features, tensors)

    @staticmethod
    def can_concat(weights: Sequence[QuantizedWeight]) -> bool:
        """Same scheme, same inputs, and the same per-input-column tensors (e.g. act-order)."""
        first = weights[0]
        return all(
            w.config == first.config
            and w.in_features == first.in_features
            and all(torch.equal(w.tensors[n], first.tensors[n]) for n in COLUMN_TENSORS & set(first.tensors))
            for w in weights
        )

    @staticmethod
    def concat_rows(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
        if not QuantizedWeight.can_concat(weights):
            raise ValueError("only weights with the same scheme, inputs and column order can be fused")
        first = weights[0]
        tensors = {
            name: first.tensors[name]
            if name in COLUMN_TENSORS
            else torch.cat([w.tensors[name] for w in weights])
            for name in first.tensors
        }
        return QuantizedWeight(first.config, sum(w.out_features for w in weights), first.in_features, tensors)


class LinearKernel(ABC):
    """One way of computing `x @ W.T` for one scheme on one kind of device."""

    name: ClassVar[str]
    # True if `apply` also takes a `QuantizedActivation` (int8 rows + scales from a fused norm).
    takes_quantized_input: ClassVar[bool] = False
    # True if `gather_rows` reads weight rows back from the packed tensors.
    keeps_rows: ClassVar[bool] = False

    def __init__(self, method: QuantLinearMethod, device: torch.device, dtype: torch.dtype) -> None:
        self.method = method
        self.config = method.config
        self.device = device
        self.dtype = dtype

    @classmethod
    @abstractmethod
    def can_implement(
        cls,
        config: QuantConfig,
        out_features: int,
        in_features: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> str | None:
        """None if this kernel can run the weight, else a short reason why not."""

    @abstractmethod
    def pack(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors -> the tensors `apply` reads, on `self.device`."""

    @abstractmethod
    def apply(self, x: torch.Tensor, packed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x [..., in_features] in `self.dtype` -> [..., out_features] in `self.dtype`."""

    def can_pack(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """None if `pack` can hold these particular tensors, else why not (a layout may need the
        scales to be exact in fp16, which only the values tell)."""
        return None

    def gather_rows(self, packed: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The canonical tensors of some weight rows, read back exactly from the packed ones (then
        a tied embedding table needs no copy of its own). Only kernels with `keeps_rows`."""
        raise NotImplementedError(f"{self.name} does not keep weight rows readable")

    def compiled_layer_operands(
        self, packed: Mapping[str, torch.Tensor], in_features: int
    ) -> tuple[list[torch.Tensor], int] | None:
        """(packed tensors, code) in the order the compiled CPU decode layer reads a projection
        (kernels/cpu/decode_layer.cpp: [q, scales] for int8 and [q, scales, mins] for int4 with the
        group size as code; [blocks] with -ggml_type for GGUF blocks), or None where it cannot
        compute this kernel's weights (runtime/layers/decode_layer.py)."""
        return None


def cpu_bf16_only(device: torch.device, dtype: torch.dtype) -> str | None:
    """torch's packed int4/int8 CPU kernels are fast only with bf16 activations. Measured (torch
    2.13, 1536x576): int4pack fp32 808 us at M=1 and 30 ms at M=37, against 107 us and 485 us for a
    dense fp32 matmul of the dequantized weight; int8pack fp32 546 us against 43 us in bf16."""
    if device.type != "cpu":
        return "CPU only"
    if dtype != torch.bfloat16:
        return "fast only with bf16 activations"
    return None


class TritonKernel(LinearKernel):
    """A GEMM from one `kernels/triton_*.py` module, on CUDA (or the interpreter in tests)."""

    module: ClassVar[str]  # e.g. "triton_w4a16", imported as `self.ops` when the kernel is chosen
    DTYPES: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, method: QuantLinearMethod, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(method, device, dtype)
        # Imported here, not at module level: a CPU engine never loads Triton.
        self.ops = importlib.import_module(f"lowbit.kernels.{self.module}")

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype) -> str | None:
        if (reason := triton_unavailable(device)) is not None:
            return reason
        return None if dtype in cls.DTYPES else f"Triton GEMMs take {cls.DTYPES}, not {dtype}"


class DequantizedKernel(LinearKernel):
    """Any scheme on any device: dequantize once at load, then a dense matmul.

    The fallback when no packed kernel fits (e.g. block-scaled int8 on CPU, where torch only has a
    per-channel int8 kernel). Costs dense memory for that weight; nothing is dequantized per call.
    """

    name = "dequantized"

    @classmethod
    def can_implement(cls, config, out_features, in_features, device, dtype) -> str | None:
        return None

    # Rows dequantized at a time: bounds the fp32 temporary (a 49k-row vocabulary projection would
    # otherwise need its whole fp32 copy next to the result).
    ROWS_PER_CHUNK = 4096

    def pack(self, tensors):
        rows = next(iter(tensors.values())).shape[0]
        weight = None
        for start in range(0, rows, self.ROWS_PER_CHUNK):
            part = {name: t[start : start + self.ROWS_PER_CHUNK] for name, t in tensors.items()}
            chunk = self.method.dequantize(part)  # fp32 [<=ROWS_PER_CHUNK, K]
            if weight is None:
                weight = torch.empty((rows, chunk.shape[1]), device=self.device, dtype=self.dtype)
            weight[start : start + len(chunk)] = chunk
        return {"weight": weight}

    def apply(self, x, packed):
        return torch.nn.functional.linear(x, packed["weight"])


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """A weight packed for its kernel; what a linear layer holds."""

    kernel: LinearKernel
    tensors: dict[str, torch.Tensor]
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(x, self.tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class QuantLinearMethod(ABC):
    """Per scheme: the canonical tensors it stores, and the kernels that can compute it."""

    kernels: ClassVar[tuple[type[LinearKernel], ...]]

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @abstractmethod
    def create_weights(self, in_features: int, out_features: int) -> dict[str, TensorSpec]:
        """The canonical tensors a loader must provide for a weight of this shape."""

    @abstractmethod
    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """fp32 [out, in]: the reference meaning of the canonical tensors."""

    def select_kernel(
        self, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype
    ) -> LinearKernel:
        reasons = []
        for kernel_cls in self.kernels:
            reason = kernel_cls.can_implement(self.config, out_features, in_features, device, dtype)
            if reason is None:
                return kernel_cls(self, device, dtype)
            reasons.append(f"{kernel_cls.name}: {reason}")
        raise ValueError(f"no kernel for {self.config} on {device} in {dtype}: " + "; ".join(reasons))

    def load(self, weight: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> PackedLinear:
        """Packed for the first kernel that can run this weight's shape and hold its values."""
        self.check(weight)
        reasons = []
        for kernel_cls in self.kernels:
            reason = kernel_cls.can_implement(
                self.config, weight.out_features, weight.in_features, device, dtype
            )
            if reason is None:
                kernel = kernel_cls(self, device, dtype)
                if (reason := kernel.can_pack(weight.tensors)) is None:
                    return PackedLinear(
                        kernel, kernel.pack(weight.tensors), weight.out_features, weight.in_features
                    )
            reasons.append(f"{kernel_cls.name}: {reason}")
        raise ValueError(f"no kernel for {self.config} on {device} in {dtype}: " + "; ".join(reasons))

    def apply(self, x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
        return packed.kernel.apply(x, packed.tensors)

    def check(self, weight: QuantizedWeight) -> None:
        """Raise ValueError unless `weight` has exactly the canonical tensors for its shape."""
        expected = self.create_weights(weight.in_features, weight.out_features)
        if set(expected) != set(weight.tensors):
            raise ValueError(
                f"{self.config.name} weight needs tensors {sorted(expected)}, got {sorted(weight.tensors)}"
            )
        for name, spec in expected.items():
            tensor = weight.tensors[name]
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"{self.config.name} tensor {name!r}: expected shape {spec.shape}, "
                    f"got {tuple(tensor.shape)}"
                )
            if tensor.dtype != spec.dtype and not (
                spec.dtype.is_floating_point and tensor.dtype.is_floating_point
            ):
                raise ValueError(
                    f"{self.config.name} tensor {name!r}: expected {spec.dtype}, got {tensor.dtype}"
                )
