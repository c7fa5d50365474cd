"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout) <-> canonical W4A16 (and symmetric 8-bit <-> W8A16).

Per linear layer of N outputs and K inputs, group size g (-1 in the config: g = K), G = K / g groups,
b bits (4 or 8), p = 32 / b values per int32 word, value j of a word in bits j*b .. j*b + b - 1:
  qweight int32 [K/p, N]  q[p*i + j, n] is value j of qweight[i, n]   (packed along the input dim)
  qzeros  int32 [G, N/p]  z[k, p*c + j] is value j of qzeros[k, c]    (packed along the output dim)
  scales  fp16  [G, N]
  g_idx   int32 [K]       group of input feature i: i // g, or any order under desc_act (act-order)
  w[n, i] = (q[i, n] - z[g_idx[i], n]) * scales[g_idx[i], n]
checkpoint_format "gptq" (v1, AutoGPTQ) stores z - 1 modulo 2^b, so z = stored + 1 lies in
[1, 2^b]; "gptq_v2" (GPTQModel) stores z itself, in [0, 2^b - 1].

Act-order maps onto the canonical `perm`: stored column j is input feature perm[j] with perm the
stable argsort of g_idx, so each group is contiguous, which needs exactly g features per group.

The int32 packing helpers and `integer_zeros` here are shared with the AWQ and compressed-tensors
formats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.kernels.w4a16_matmul import pack_int4, unpack_int4
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, W8A16Config

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
SUPPORTED_BITS = (4, 8)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_FP16_MAX = torch.finfo(torch.float16).max

# ---------------------------------------------------------------------- shared helpers


def pack_int32(values: torch.Tensor, bits: int, dim: int, pad: bool = False) -> torch.Tensor:
    """Integers in [0, 2^bits) -> int32 words holding 32 / bits consecutive values along `dim`, value j
    of a word in bits j*bits and up. `pad` zero-fills a ragged tail; otherwise it is an error."""
    per_word = 32 // bits
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"cannot pack values in [{int(values.min())}, {int(values.max())}] into {bits} bits")
    v = values.to(torch.int64).movedim(dim, -1)  # [..., L]
    if v.shape[-1] % per_word:
        if not pad:
            raise ValueError(f"cannot pack {v.shape[-1]} values {per_word} to an int32 word")
        v = torch.nn.functional.pad(v, (0, per_word - v.shape[-1] % per_word))
    v = v.reshape(*v.shape[:-1], -1, per_word)  # [..., L/p, p]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (v << shifts).sum(dim=-1)  # [..., L/p] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, length: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> int32 values in [0, 2^bits), `length` of them along
    `dim` (all by default)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).movedim(dim, -1)  # [..., W]
    # >> is arithmetic on int32, so the top value of a negative word comes sign-extended: the mask fixes it
    v = ((w[..., None] >> shifts) & (2**bits - 1)).flatten(-2)  # [..., W * p]
    if length is not None:
        v = v[..., :length]
    return v.movedim(-1, dim).contiguous()


def integer_zeros(scales: torch.Tensor, mins: torch.Tensor, what: str) -> torch.Tensor:
    """The integer zero points z with mins = -z * scales (canonical W4A16), or a ValueError if
    `mins` are not such multiples (e.g. GGUF Q4_1's float minimums)."""
    scales, mins = scales.float(), mins.float()
    zeros = torch.round(-mins / torch.where(scales == 0, 1.0, scales))
    err = (mins + zeros * scales).abs()
    if not bool((err <= 1e-5 * scales.abs() + 1e-30).all()):
        worst = float((err / scales.abs()).max())
        raise ValueError(
            f"{what}: mins are not integer multiples of the scales (off by up to {worst:.3g} scale); "
            "this format stores integer zero points (w = (q - z) * s), e.g. GGUF Q4_1 cannot be written"
        )
    return zeros.to(torch.int64)


def take(
    raw: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], kind: str, why: str
) -> torch.Tensor:
    """raw[name], checked: present, of `shape`, and of `kind` ("int32", "int8", "int" or "float")."""
    if name not in raw:
        raise ValueError(f"missing tensor {name!r}")
    tensor = raw[name]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} ({why})")
    ok = {
        "int32": tensor.dtype == torch.int32,
        "int8": tensor.dtype == torch.int8,
        "int": not tensor.dtype.is_floating_point and tensor.dtype != torch.bool,
        "float": tensor.dtype.is_floating_point,
    }[kind]
    if not ok:
        raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, expected {kind}")
    return tensor


def to_fp16(scales: torch.Tensor, what: str) -> torch.Tensor:
    if not bool((scales.abs() <= _FP16_MAX).all()):
        raise ValueError(f"{what}: scales exceed the float16 range this format stores them in")
    return scales.to(torch.float16)


def group_size_of(weight: QuantizedWeight) -> int:
    """The weight's group size as these formats write it: -1 for one group per output channel."""
    group = getattr(weight.config, "group_size", None)
    return -1 if group is None or group == weight.in_features else group


def tensor_name(prefix: str, suffix: str) -> str:
    """`prefix.suffix`, or `suffix` alone for an empty prefix."""
    return f"{prefix}.{suffix}" if prefix else suffix


# ---------------------------------------------------------------------- config


@dataclass(frozen=True)
class GptqConfig:
    """The `quantization_config` of a GPTQ checkpoint (also written as quantize_config.json)."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits {self.bits} is not supported (supported: {SUPPORTED_BITS})")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"GPTQ group_size must be -1 or positive, got {self.group_size}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported "
                f"(supported: {CHECKPOINT_FORMATS})"
            )

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> GptqConfig:
        return cls(
            bits=int(cfg.get("bits", 4)),
            group_size=int(cfg.get("group_size", 128)),
            desc_act=bool(cfg.get("desc_act", False)),
            sym=bool(cfg.get("sym", True)),
            checkpoint_format=cfg.get("checkpoint_format") or cfg.get("format") or "gptq",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
        }

    @property
    def stored_zero_offset(self) -> int:
        """What is subtracted from z before it is stored: 1 for v1, 0 for v2."""
        return 1 if self.checkpoint_format == "gptq" else 0


# ---------------------------------------------------------------------- read


def _act_order_perm(g_idx: torch.Tensor, group: int, name: str) -> torch.Tensor | None:
    """None if g_idx is the trivial i // group, else the column order that makes groups contiguous."""
    in_features = g_idx.shape[0]
    groups = in_features // group
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, torch.arange(in_features) // group):
        return None
    if bool((g_idx < 0).any()) or bool((g_idx >= groups).any()):
        raise ValueError(f"tensor {name!r}: group indices must lie in [0, {groups})")
    counts = torch.bincount(g_idx, minlength=groups)
    if bool((counts != group).any()):
        bad = int(torch.nonzero(counts != group)[0])
        raise ValueError(
            f"tensor {name!r}: group {bad} has {int(counts[bad])} input features, expected the group "
            f"size {group} (act-order needs equal groups)"
        )
    return torch.argsort(g_idx, stable=True)


def gptq_to_canonical(
    raw: Mapping[str, torch.Tensor], prefix: str, config: GptqConfig, out_features: int, in_features: int
) -> QuantizedWeight:
    """The tensors `<prefix>.qweight` etc. of `raw` -> canonical W4A16 (4-bit) or W8A16 (8-bit)."""
    bits, per_word = config.bits, 32 // config.bits
    group = in_features if config.group_size == -1 else config.group_size
    why = f"a {out_features}x{in_features} linear with {bits}-bit group size {group}"
    if in_features % group or in_features % per_word or out_features % per_word:
        raise ValueError(
            f"{prefix}: {why} does not fit GPTQ packing (in_features must be a multiple of the group size "
            f"and of {per_word}, out_features of {per_word})"
        )
    groups = in_features // group
    qweight = take(raw, tensor_name(prefix, "qweight"), (in_features // per_word, out_features), "int32", why)
    qzeros = take(raw, tensor_name(prefix, "qzeros"), (groups, out_features // per_word), "int32", why)
    scales = take(raw, tensor_name(prefix, "scales"), (groups, out_features), "float", why).float()  # [G, N]
    perm = None
    g_idx_name = tensor_name(prefix, "g_idx")
    if g_idx_name in raw:
        perm = _act_order_perm(take(raw, g_idx_name, (in_features,), "int", why), group, g_idx_name)
    elif config.desc_act:
        raise ValueError(f"missing tensor {g_idx_name!r} (desc_act is set)")
    q = unpack_int32(qweight, bits, dim=0).T  # [N, K], original column order
    zeros = (unpack_int32(qzeros, bits, dim=1) + config.stored_zero_offset).T.float()  # [N, G]
    if perm is not None:
        q = q[:, perm]
    if bits == 4:
        tensors = {"qweight": pack_int4(q), "scales": scales.T.contiguous(), "mins": -zeros * scales.T}
        if perm is not None:
            tensors["perm"] = perm
        return QuantizedWeight(W4A16Config(group, perm is not None), out_features, in_features, tensors)
    return _w8a16(q, zeros, scales.T.contiguous(), group, perm, prefix)


def _w8a16(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    perm: torch.Tensor | None,
    prefix: str,
) -> QuantizedWeight:
    """Symmetric 8-bit GPTQ (z = 128 everywhere) -> W8A16 with int8 q - 128."""
    if perm is not None:
        raise ValueError(f"{prefix}: 8-bit GPTQ with act-order is not supported")
    if bool((zeros != 128).any()):
        raise ValueError(f"{prefix}: asymmetric 8-bit GPTQ (zero points other than 128) is not supported")
    out_features, in_features = q.shape
    config = W8A16Config(None if group == in_features else group)
    tensors = {"qweight": (q - 128).to(torch.int8), "scales": scales}
    return QuantizedWeight(config, out_features, in_features, tensors)


def modules_with_qweight(names: Iterable[str]) -> list[str]:
    """Every module with a `qweight` (whatever its name; the loader checks it is a linear): how GPTQ
    and AWQ directories mark their quantized linears."""
    return [n.removesuffix(".qweight") for n in names if n.endswith(".qweight")]


class GptqFormat:
    """Reads GPTQ linears out of a safetensors directory's tensors."""

    method = "gptq"

    def __init__(self, quantization_config: Mapping[str, Any]):
        self.config = GptqConfig.from_dict(quantization_config)

    def quantized_modules(self, names: Iterable[str], linear_modules: Iterable[str] = ()) -> list[str]:
        return modules_with_qweight(names)

    def component_names(self, module: str) -> list[str]:
        return [f"{module}.{s}" for s in SUFFIXES]

    def required_names(self, module: str) -> list[str]:
        suffixes = SUFFIXES if self.config.desc_act else SUFFIXES[:3]
        return [f"{module}.{s}" for s in suffixes]

    def read(self, raw: Mapping[str, torch.Tensor], module: str, shape: tuple[int, int]) -> QuantizedWeight:
        return gptq_to_canonical(raw, module, self.config, *shape)


# ---------------------------------------------------------------------- write


def _stored_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str, what: str) -> torch.Tensor:
    offset = 1 if checkpoint_format == "gptq" else 0
    low, high = offset, 2**bits - 1 + offset
    if bool((zeros < low).any()) or bool((zeros > high).any()):
        raise ValueError(
            f"{what}: zero points must lie in [{low}, {high}] for checkpoint_format "
            f"{checkpoint_format!r}, got [{int(zeros.min())}, {int(zeros.max())}]"
            + (" (v1 stores zero - 1; use gptq_v2)" if offset and bool((zeros < low).any()) else "")
        )
    return zeros - offset


def _gptq_tensors(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, what: str
) -> dict[str, torch.Tensor]:
    """q [N, K] original column order, stored zeros/scales [N, G] -> the GPTQ tensors."""
    return {
        "qweight": pack_int32(q.T, bits, dim=0),  # [K/p, N]
        "qzeros": pack_int32(zeros.T, bits, dim=1),  # [G, N/p]
        "scales": to_fp16(scales.T.contiguous(), what),  # [G, N]
        "g_idx": g_idx.to(torch.int32),
    }


def canonical_to_gptq(weight: QuantizedWeight, checkpoint_format: str = "gptq", what: str = "weight") -> dict:
    """A canonical W4A16 or W8A16 weight -> GPTQ tensors by suffix (qweight, qzeros, scales, g_idx)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"GPTQ checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}"
        )
    in_features, t = weight.in_features, weight.tensors
    if isinstance(weight.config, W4A16Config):
        group = weight.config.group_size
        q = unpack_int4(t["qweight"]).to(torch.int64)  # [N, K], stored column order
        zeros = integer_zeros(t["scales"], t["mins"], what)  # [N, G]
        g_idx = torch.arange(in_features) // group
        if weight.config.act_order:
            perm = t["perm"].to(torch.int64)
            unpermuted = torch.empty_like(q)
            unpermuted[:, perm] = q
            q = unpermuted
            g_idx = torch.empty_like(g_idx)
            g_idx[perm] = torch.arange(in_features) // group
        stored = _stored_zeros(zeros, 4, checkpoint_format, what)
        return _gptq_tensors(q, stored, t["scales"].float(), g_idx, 4, what)
    if isinstance(weight.config, W8A16Config):
        group = weight.config.group_size or in_features
        q = t["qweight"].to(torch.int64) + 128  # [N, K] in [0, 255]
        zeros = torch.full(t["scales"].shape, 128, dtype=torch.int64)
        stored = _stored_zeros(zeros, 8, checkpoint_format, what)
        return _gptq_tensors(q, stored, t["scales"].float(), torch.arange(in_features) // group, 8, what)
    raise ValueError(f"{what}: GPTQ holds W4A16 or W8A16 weights, not {weight.config.name}")


def _is_symmetric(weight: QuantizedWeight) -> bool:
    if isinstance(weight.config, W8A16Config):
        return True
    zeros = integer_zeros(weight.tensors["scales"], weight.tensors["mins"], "weight")
    return bool((zeros == 8).all())


@dataclass(frozen=True)
class _Written:
    """What the shared config needs to know of one written weight."""

    bits: int
    group_size: int
    act_order: bool
    symmetric: bool


class GptqWriter:
    """Collects the GPTQ tensors of each quantized linear, then the config they share."""

    def __init__(self, checkpoint_format: str = "gptq"):
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format must be one of {CHECKPOINT_FORMATS}")
        self.checkpoint_format = checkpoint_format
        self.written: list[_Written] = []

    def add(self, module: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        tensors = canonical_to_gptq(weight, self.checkpoint_format, module)
        bits = 8 if isinstance(weight.config, W8A16Config) else 4
        act_order = bool(getattr(weight.config, "act_order", False))
        self.written.append(_Written(bits, group_size_of(weight), act_order, _is_symmetric(weight)))
        return {f"{module}.{suffix}": t for suffix, t in tensors.items()}

    def dense(self, module: str) -> None:
        """A linear left unquantized: fine for lm_head, not for a decoder projection."""
        if module.startswith("model.layers."):
            raise ValueError(
                f"{module}: a GPTQ checkpoint quantizes every decoder projection; this one is dense"
            )

    def quantization_config(self) -> dict[str, Any]:
        if not self.written:
            raise ValueError("no quantized weights to write as GPTQ")
        bits = {w.bits for w in self.written}
        groups = {w.group_size for w in self.written}
        if len(bits) > 1 or len(groups) > 1:
            raise ValueError(
                f"GPTQ needs one bit width and group size for all layers, got bits {sorted(bits)}, "
                f"group sizes {sorted(groups)}"
            )
        config = GptqConfig(
            bits=bits.pop(),
            group_size=groups.pop(),
            desc_act=any(w.act_order for w in self.written),
            sym=all(w.symmetric for w in self.written),
            checkpoint_format=self.checkpoint_format,
        )
        return config.to_dict()

    def extra_files(self) -> dict[str, dict[str, Any]]:
        return {"quantize_config.json": self.quantization_config()}
