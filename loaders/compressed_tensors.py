"""compressed-tensors checkpoints (llm-compressor / vLLM) <-> canonical W4A16, W8A16 and W8A8.

config.json's `quantization_config` = {"quant_method": "compressed-tensors", "format": ...,
"config_groups": {name: scheme | [targets] of a preset}, "ignore": [...]}; a scheme has "targets"
(module names, "re:" regexes, or the class name "Linear"), "weights" and "input_activations"
argument dicts and optionally its own "format". Per linear of N outputs, K inputs:

- `pack-quantized` (weight-only, b = 4 or 8 bits): `weight_packed` int32 [N, ceil(K b / 32)] holds
  x_q + 2^(b-1) (x_q the signed integer in [-2^(b-1), 2^(b-1))) densely, element k in bits
  k*b .. of the row's bit stream (word k*b // 32, little end first); `weight_scale` [N, G]
  (G = K / g, or 1 per channel); `weight_shape` [2] = (N, K); asymmetric adds `weight_zero_point`,
  the signed zero points packed the same way along the output dim: int32 [ceil(N b / 32), G].
  w = (x_q - zp) * scale. In canonical W4A16 terms q = x_q + 8 and z = zp + 8 (z = 8 symmetric).
- `int-quantized` W8A8: `weight` int8 [N, K], `weight_scale` [N, 1], input activations quantized
  per token, dynamically, symmetric int8 (vLLM's scale is max|x| / 127, as our kernel's).

The compressed-tensors package is a test-only dependency: packing is implemented here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.kernels.w4a16_matmul import pack_int4, unpack_int4
from lowbit.runtime.quant import QuantizedWeight, W4A16Config, W8A8Config, W8A16Config

from .gptq import group_size_of, integer_zeros, pack_int32, take, tensor_name, unpack_int32

PACKED, INT, NAIVE = "pack-quantized", "int-quantized", "naive-quantized"
FORMATS = (PACKED, INT, NAIVE)

_TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
_PRESETS: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128}},
    "W4A16_ASYM": {"weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128}},
    "W8A16": {"weights": {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 128}},
    "W8A8": {
        "weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"},
        "input_activations": _TOKEN_INT8,
    },
}
_PRESETS["INT8"] = _PRESETS["W8A8"]


@dataclass(frozen=True)
class Scheme:
    """One config group, reduced to what lowbit can run."""

    format: str
    num_bits: int
    symmetric: bool
    group_size: int | None  # None: one scale per output channel (strategy channel or tensor)
    per_tensor: bool  # strategy tensor: one weight scale for the whole matrix
    activations: bool  # inputs quantized to int8 per token (W8A8)

    @property
    def scheme(self) -> str:
        return "w8a8" if self.activations else f"w{self.num_bits}a16"


def _strategy(args: Mapping[str, Any]) -> str:
    """The argument's strategy, inferred from group_size as the package does when it is absent."""
    group = args.get("group_size")
    inferred = "group" if group and group > 0 else "channel" if group == -1 else "tensor"
    return str(args.get("strategy") or inferred).lower()


def _weights_args(args: Mapping[str, Any], where: str) -> tuple[int, bool, int | None, bool]:
    """(num_bits, symmetric, group_size, per_tensor) of a weights argument dict."""
    if str(args.get("type", "int")).lower() != "int":
        raise ValueError(f"{where}: {args.get('type')!r} weights are not supported (supported: int)")
    bits = int(args.get("num_bits", 8))
    group = args.get("group_size")
    strategy = _strategy(args)
    if args.get("dynamic"):
        raise ValueError(f"{where}: dynamic weight quantization is not supported")
    if args.get("actorder") not in (None, "weight"):
        raise ValueError(f"{where}: actorder {args.get('actorder')!r} (g_idx) is not supported")
    if strategy not in ("group", "channel", "tensor"):
        raise ValueError(f"{where}: weight strategy {strategy!r} is not supported (group, channel, tensor)")
    if strategy == "group" and not (group and group > 0):
        raise ValueError(f"{where}: strategy group needs a positive group_size, got {group!r}")
    return (
        bits,
        bool(args.get("symmetric", True)),
        group if strategy == "group" else None,
        strategy == "tensor",
    )


def _activation_args(args: Mapping[str, Any] | None, where: str) -> bool:
    """True for dynamic per-token symmetric int8 inputs, False for none; anything else is an error."""
    if not args:
        return False
    found = {
        "num_bits": args.get("num_bits", 8),
        "type": str(args.get("type", "int")).lower(),
        "symmetric": args.get("symmetric", True),
        "strategy": _strategy(args),
        "dynamic": args.get("dynamic", False),
    }
    if found != _TOKEN_INT8:
        raise ValueError(
            f"{where}: input activations {json.dumps(dict(args), sort_keys=True)} are not supported "
            "(supported: none, or dynamic per-token symmetric int8)"
        )
    return True


def parse_scheme(group: Mapping[str, Any], default_format: str, where: str) -> Scheme:
    if not group.get("weights"):
        raise ValueError(f"{where}: a config group without weight quantization is not supported")
    bits, symmetric, group_size, per_tensor = _weights_args(group["weights"], where)
    activations = _activation_args(group.get("input_activations"), where)
    # without a format of its own under "mixed-precision": what the package would infer for it
    fmt = group.get("format") or default_format or (INT if activations else PACKED)
    if group.get("output_activations"):
        raise ValueError(f"{where}: output activation quantization is not supported")
    scheme = Scheme(fmt, bits, symmetric, group_size, per_tensor, activations)
    _check_supported(scheme, where)
    return scheme


def _check_supported(s: Scheme, where: str) -> None:
    if s.format not in FORMATS:
        raise ValueError(f"{where}: format {s.format!r} is not supported (supported: {FORMATS})")
    supported = (
        (s.format == PACKED and s.num_bits == 4 and not s.activations and not s.per_tensor)
        or (s.format == PACKED and s.num_bits == 8 and s.symmetric and not s.activations and not s.per_tensor)
        or (s.format in (INT, NAIVE) and s.num_bits == 8 and s.symmetric)
    )
    if s.activations and s.group_size is not None:
        supported = False
    if not supported:
        symmetry = "symmetric" if s.symmetric else "asymmetric"
        layout = "per tensor" if s.per_tensor else f"group {s.group_size}" if s.group_size else "per channel"
        inputs = " and int8 activations" if s.activations else ""
        raise ValueError(
            f"{where}: {s.format} with {s.num_bits}-bit {symmetry} weights ({layout}){inputs} is not "
            "supported (supported: pack-quantized 4-bit W4A16, pack-quantized 8-bit symmetric W8A16, "
            "int-quantized symmetric int8 W8A8)"
        )


@dataclass(frozen=True)
class CtConfig:
    groups: tuple[tuple[tuple[str, ...], Scheme], ...]  # (targets, scheme)
    ignore: tuple[str, ...]

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> CtConfig:
        default_format = cfg.get("format") or NAIVE
        if default_format == "mixed-precision":
            default_format = ""
        groups = []
        for name, group in (cfg.get("config_groups") or {}).items():
            where = f"compressed-tensors config group {name!r}"
            if isinstance(group, list):  # a preset scheme named by the group, applied to these targets
                if name.upper() not in _PRESETS:
                    raise ValueError(
                        f"{where}: preset {name!r} is not supported (supported: {sorted(_PRESETS)})"
                    )
                group = {"targets": group, **_PRESETS[name.upper()]}
            groups.append((tuple(group.get("targets") or ()), parse_scheme(group, default_format, where)))
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        return cls(tuple(groups), tuple(cfg.get("ignore") or ()))

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme of a linear module (all of ours are `Linear`s), or None if it stays dense."""
        if any(_matches(module, target) for target in self.ignore):
            return None
        for rank in (0, 1, 2):  # exact names win over regexes, regexes over the class name
            for targets, scheme in self.groups:
                if any(_match_rank(module, t) == rank for t in targets):
                    return scheme
        return None


def _match_rank(module: str, target: str) -> int | None:
    if target == module:
        return 0
    if target.startswith("re:") and re.match(target.removeprefix("re:"), module):
        return 1
    if target == "Linear":
        return 2
    return None


def _matches(module: str, target: str) -> bool:
    return _match_rank(module, target) is not None


# ---------------------------------------------------------------------- read


def _scales(raw, name: str, out_features: int, in_features: int, scheme: Scheme, why: str) -> torch.Tensor:
    """weight_scale -> fp32 [N, G]."""
    if scheme.per_tensor:
        if name not in raw:
            raise ValueError(f"missing tensor {name!r}")
        scale = take(raw, name, tuple(raw[name].shape), "float", why)
        if scale.numel() != 1:
            raise ValueError(
                f"tensor {name!r}: a per-tensor scale must have one element, got {tuple(scale.shape)}"
            )
        return scale.float().reshape(1, 1).expand(out_features, 1).contiguous()
    groups = 1 if scheme.group_size is None else in_features // scheme.group_size
    return take(raw, name, (out_features, groups), "float", why).float()


def ct_to_canonical(
    raw: Mapping[str, torch.Tensor], prefix: str, scheme: Scheme, out_features: int, in_features: int
) -> QuantizedWeight:
    """The tensors `<prefix>.weight_packed` etc. of `raw` -> a canonical weight."""
    group = scheme.group_size or in_features
    why = f"a {out_features}x{in_features} linear, {scheme.format} {scheme.scheme} group size {group}"
    if in_features % group:
        raise ValueError(f"{prefix}: in_features {in_features} is not a multiple of the group size {group}")
    scale_name = tensor_name(prefix, "weight_scale")
    if scheme.format != PACKED:
        q = take(raw, tensor_name(prefix, "weight"), (out_features, in_features), "int8", why)
        scales = _scales(raw, scale_name, out_features, in_features, scheme, why)  # [N, G]
        config = W8A8Config() if scheme.activations else W8A16Config(scheme.group_size)
        return QuantizedWeight(config, out_features, in_features, {"qweight": q, "scales": scales})
    bits = scheme.num_bits
    packed_cols = -(-in_features * bits // 32)
    packed = take(raw, tensor_name(prefix, "weight_packed"), (out_features, packed_cols), "int32", why)
    _check_weight_shape(raw, tensor_name(prefix, "weight_shape"), out_features, in_features, why)
    scales = _scales(raw, scale_name, out_features, in_features, scheme, why)  # [N, G]
    q = unpack_int32(packed, bits, dim=1, length=in_features)  # [N, K], x_q + 2^(b-1)
    if bits == 8:
        tensors = {"qweight": (q - 128).to(torch.int8), "scales": scales}
        return QuantizedWeight(W8A16Config(scheme.group_size), out_features, in_features, tensors)
    if scheme.symmetric:
        zeros = torch.full_like(scales, 8.0)
    else:
        zp_rows = -(-out_features * bits // 32)
        zp = take(raw, tensor_name(prefix, "weight_zero_point"), (zp_rows, scales.shape[1]), "int32", why)
        zeros = unpack_int32(zp, bits, dim=0, length=out_features).float()  # [N, G], zp + 8
    tensors = {"qweight": pack_int4(q), "scales": scales, "mins": -zeros * scales}
    return QuantizedWeight(W4A16Config(group), out_features, in_features, tensors)


def _check_weight_shape(raw, name: str, out_features: int, in_features: int, why: str) -> None:
    shape = take(raw, name, (2,), "int", why)
    if shape.tolist() != [out_features, in_features]:
        raise ValueError(
            f"tensor {name!r} says {shape.tolist()}, expected [{out_features}, {in_features}] ({why})"
        )


class CompressedTensorsFormat:
    """Reads compressed-tensors linears out of a safetensors directory's tensors."""

    method = "compressed-tensors"

    def __init__(self, quantization_config: Mapping[str, Any]):
        self.config = CtConfig.from_dict(quantization_config)

    def quantized_modules(self, names: Collection[str], linear_modules: Collection[str]) -> list[str]:
        present = [m for m in linear_modules if f"{m}.weight" in names or f"{m}.weight_packed" in names]
        return [m for m in present if self.config.scheme_for(m) is not None]

    def component_names(self, module: str) -> list[str]:
        suffixes = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        return [f"{module}.{s}" for s in suffixes]

    def required_names(self, module: str) -> list[str]:
        scheme = self.config.scheme_for(module)
        assert scheme is not None
        if scheme.format != PACKED:
            suffixes = ["weight", "weight_scale"]
        else:
            suffixes = ["weight_packed", "weight_scale", "weight_shape"]
            suffixes += [] if scheme.symmetric else ["weight_zero_point"]
        return [f"{module}.{s}" for s in suffixes]

    def read(self, raw: Mapping[str, torch.Tensor], module: str, shape: tuple[int, int]) -> QuantizedWeight:
        scheme = self.config.scheme_for(module)
        assert scheme is not None
        return ct_to_canonical(raw, module, scheme, *shape)


# ---------------------------------------------------------------------- write


def _scheme_dict(weight: QuantizedWeight, symmetric: bool) -> dict[str, Any]:
    group = group_size_of(weight)
    weights: dict[str, Any] = {
        "num_bits": 8 if not isinstance(weight.config, W4A16Config) else 4,
        "type": "int",
    }
    weights["symmetric"] = symmetric
    weights["group_size"] = None if group == -1 else group
    weights["strategy"] = "channel" if group == -1 else "group"
    weights["dynamic"] = False
    activations = dict(_TOKEN_INT8) if isinstance(weight.config, W8A8Config) else None
    fmt = INT if isinstance(weight.config, W8A8Config) else PACKED
    return {"weights": weights, "input_activations": activations, "output_activations": None, "format": fmt}


def canonical_to_ct(
    weight: QuantizedWeight, scale_dtype: torch.dtype, what: str = "weight"
) -> tuple[dict, dict]:
    """A canonical weight -> (compressed-tensors tensors by suffix, its scheme dict)."""
    t, config = weight.tensors, weight.config
    scales = t["scales"].to(scale_dtype)
    if isinstance(config, W8A8Config):
        return {"weight": t["qweight"].to(torch.int8), "weight_scale": scales}, _scheme_dict(weight, True)
    shape = torch.tensor([weight.out_features, weight.in_features], dtype=torch.int64)
    if isinstance(config, W8A16Config):
        packed = pack_int32(t["qweight"].to(torch.int64) + 128, 8, dim=1, pad=True)
        tensors = {"weight_packed": packed, "weight_scale": scales, "weight_shape": shape}
        return tensors, _scheme_dict(weight, True)
    if not isinstance(config, W4A16Config):
        raise ValueError(f"{what}: compressed-tensors here holds W4A16, W8A16 or W8A8, not {config.name}")
    if config.act_order:
        raise ValueError(f"{what}: compressed-tensors cannot hold act-order (GPTQ desc_act) weights")
    zeros = integer_zeros(t["scales"], t["mins"], what)  # [N, G]
    if bool((zeros < 0).any()) or bool((zeros > 15).any()):
        raise ValueError(
            f"{what}: zero points must lie in [0, 15], got [{int(zeros.min())}, {int(zeros.max())}]"
        )
    packed = pack_int32(unpack_int4(t["qweight"]), 4, dim=1, pad=True)  # [N, ceil(K/8)]
    tensors = {"weight_packed": packed, "weight_scale": scales, "weight_shape": shape}
    symmetric = bool((zeros == 8).all())
    if not symmetric:
        tensors["weight_zero_point"] = pack_int32(zeros, 4, dim=0, pad=True)  # [ceil(N/8), G]
    return tensors, _scheme_dict(weight, symmetric)


class CompressedTensorsWriter:
    """Collects each quantized linear's tensors and scheme; dense linears go to `ignore`."""

    def __init__(self, scale_dtype: torch.dtype = torch.float16):
        self.scale_dtype = scale_dtype
        self.schemes: dict[str, list[str]] = {}  # scheme (json) -> modules
        self.ignore: list[str] = ["lm_head"]  # also when tied: transformers' lm_head is a Linear

    def add(self, module: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        tensors, scheme = canonical_to_ct(weight, self.scale_dtype, module)
        self.schemes.setdefault(json.dumps(scheme, sort_keys=True), []).append(module)
        return {f"{module}.{suffix}": t for suffix, t in tensors.items()}

    def dense(self, module: str) -> None:
        if module not in self.ignore:
            self.ignore.append(module)

    def quantization_config(self) -> dict[str, Any]:
        if not self.schemes:
            raise ValueError("no quantized weights to write as compressed-tensors")
        single = len(self.schemes) == 1
        groups = {
            f"group_{i}": {"targets": ["Linear"] if single else modules, **json.loads(scheme)}
            for i, (scheme, modules) in enumerate(self.schemes.items())
        }
        formats = {g["format"] for g in groups.values()}
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
        }

    def extra_files(self) -> dict[str, dict[str, Any]]:
        return {}
