"""What a checkpoint looks like after a round trip through a directory that stores dense weights and
scales in fp16 (GPTQ, AWQ, compressed-tensors): the expected side of the round-trip tests."""

from __future__ import annotations

import torch

from lowbit.kernels.w4a16_matmul import pack_int4, unpack_int4
from lowbit.loaders.base import Checkpoint
from lowbit.runtime.quant import QuantizedWeight


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def _sorted_within_groups(weight: QuantizedWeight) -> QuantizedWeight:
    """GPTQ's g_idx says which group each input column is in, not the order GPTQ took them in:
    the same weight with the columns of each group in increasing input-feature order."""
    t = dict(weight.tensors)
    group = weight.config.group_size
    perm = t["perm"].reshape(-1, group)
    order = perm.argsort(dim=1)
    codes = unpack_int4(t["qweight"]).reshape(weight.out_features, -1, group)
    codes = codes.gather(2, order[None].expand_as(codes))
    t["perm"] = perm.gather(1, order).flatten()
    t["qweight"] = pack_int4(codes.reshape(weight.out_features, -1))
    return QuantizedWeight(weight.config, weight.out_features, weight.in_features, t)


def as_stored_fp16(checkpoint: Checkpoint) -> Checkpoint:
    """What a directory written with fp16 dense weights and fp16 scales holds: the same integer codes
    and zero points, fp16-rounded scales (mins = -zero * scale), fp16-rounded dense tensors."""
    weights = {}
    for name, weight in checkpoint.weights.items():
        if isinstance(weight, torch.Tensor):
            weights[name] = _fp16(weight)
            continue
        t = dict(weight.tensors)
        if "mins" in t:
            zeros = torch.round(-t["mins"] / t["scales"])
            t["mins"] = -zeros * _fp16(t["scales"])
        t["scales"] = _fp16(t["scales"])
        weight = QuantizedWeight(weight.config, weight.out_features, weight.in_features, t)
        weights[name] = _sorted_within_groups(weight) if "perm" in t else weight
    return Checkpoint(checkpoint.config, weights, checkpoint.tokenizer, "expected")
