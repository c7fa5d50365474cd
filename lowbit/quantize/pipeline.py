"""Quantize a whole model: load it dense (dequantizing a GGUF if need be), calibrate layer by layer
on the transformers model of its family (Llama, Mistral, Qwen2, Qwen3), and return a `Checkpoint`
whose decoder projections are canonical `QuantizedWeight`s, ready for
`loaders.writer.write_checkpoint` or for the engine.

Methods: rtn (no calibration), gptq, awq (4-bit weight-only) and smoothquant (W8A8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.loaders.base import Checkpoint
from lowbit.loaders.hf_config import to_hf_config
from lowbit.loaders.registry import load_checkpoint
from lowbit.runtime.models.config import ModelConfig
from lowbit.runtime.quant import QuantizedWeight, method_for
from lowbit.runtime.quant.rtn import quantize_w4a16_rtn, quantize_w8a8_rtn, quantize_w8a16_rtn

from .awq import MAX_SEARCH_TOKENS, scaled_error, search_scales
from .calibration import calibration_samples, first_layer_inputs, run_layer, watch_inputs
from .gptq import ACT_ORDERS, Hessian, InverseHessian, gptq_quantize, inverse_hessian
from .holdout import SplitRows, held_out_windows, output_error
from .smoothquant import search_alpha, smoothing_factors

METHODS = ("rtn", "gptq", "awq", "smoothquant")
# Measured on the default model against RTN and llm-compressor (docs/accuracy.md): columns in
# Hessian order with groups kept on the original columns won at every calibration size.
DEFAULT_ACT_ORDER = "weight"
GUARDED = ("gptq", "awq")  # the methods whose codes the held-out check can replace with RTN's
MIN_TOKENS_PER_DIM = 16  # calibration tokens per input dimension below which quantize warns
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOptions:
    """bits/activations pick the scheme: 4/16 -> W4A16, 8/16 -> W8A16 (rtn), 8/8 -> W8A8."""

    method: str = "rtn"
    bits: int = 4
    activations: int = 16
    group_size: int = 128
    symmetric: bool = False
    act_order: str | None = None  # GPTQ column order (gptq.ACT_ORDERS); None: DEFAULT_ACT_ORDER
    alpha: float | None = None  # smoothquant migration strength; None: searched per layer
    guard: bool = True  # per linear, keep RTN's codes where the method does worse on held-out rows
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    damp: float = 0.01  # gptq dampening, share of the mean Hessian diagonal
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        scheme = (self.bits, self.activations)
        allowed = {
            "rtn": {(4, 16), (8, 16), (8, 8)},
            "gptq": {(4, 16)},
            "awq": {(4, 16)},
            "smoothquant": {(8, 8)},
        }
        if scheme not in allowed[self.method]:
            raise ValueError(
                f"{self.method} supports bits/activations {sorted(allowed[self.method])}, got {scheme}"
            )
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be -1 or an even number >= 2, got {self.group_size}")
        if self.act_order is not None and self.method != "gptq":
            raise ValueError("act_order is a GPTQ option")
        if self.act_order is not None and self.act_order not in ACT_ORDERS:
            raise ValueError(f"act_order must be one of {ACT_ORDERS}, got {self.act_order!r}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.alpha}")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("num_samples, seq_len and batch_size must be positive (seq_len >= 2)")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    @property
    def gptq_act_order(self) -> str:
        return self.act_order or DEFAULT_ACT_ORDER


# ---------------------------------------------------------------------- the dense model


def hf_model(checkpoint: Checkpoint) -> nn.Module:
    """An fp32 transformers model of the checkpoint's family (LlamaForCausalLM, Qwen2ForCausalLM,
    ...: the class its config.json names) holding the checkpoint's weights, dequantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "rope_freqs" in checkpoint.weights:
        raise ValueError("models with GGUF rope_freqs factors cannot be re-quantized yet")
    fields = to_hf_config(checkpoint.config, "float32")
    model_type = fields.pop("model_type")
    unused = ("rope_scaling", "architectures")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k not in unused})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = {name: _dense(w) for name, w in checkpoint.weights.items()}
    if checkpoint.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    rotary = model.model.rotary_emb  # built on meta: rebuild its buffers on the CPU
    model.model.rotary_emb = type(rotary)(config=config)
    embed = model.model.embed_tokens
    if hasattr(embed, "embed_scale"):  # Gemma's scaled embedding keeps sqrt(hidden) as a buffer
        embed.embed_scale = torch.tensor(config.hidden_size**0.5)
    if left := [name for name, b in model.named_buffers() if b.is_meta]:
        raise ValueError(f"cannot rebuild the float model: buffers {left} were not restored")
    return model.float().eval()


def _dense(weight) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return weight.float()
    return method_for(weight.config).dequantize(weight.tensors).float()


# ---------------------------------------------------------------------- per-layer methods


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: linear for linears in _groups(layer).values() for name, linear in linears}


def _groups(layer: nn.Module) -> dict[str, list[tuple[str, nn.Linear]]]:
    """The layer's linears by shared input, each group named by its first unfused member: q/k/v
    (or Phi-3's qkv_proj), o, gate/up (or gate_up_proj), down."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = ("qkv_proj",) if hasattr(attn, "qkv_proj") else ATTENTION
    gate_up = ("gate_up_proj",) if hasattr(mlp, "gate_up_proj") else MLP_IN
    return {
        "q_proj": [(n, getattr(attn, n)) for n in qkv],
        "o_proj": [("o_proj", attn.o_proj)],
        "gate_proj": [(n, getattr(mlp, n)) for n in gate_up],
        "down_proj": [("down_proj", mlp.down_proj)],
    }


def _rtn(weight: torch.Tensor, opts: QuantizeOptions) -> QuantizedWeight:
    if opts.activations == 8:
        return quantize_w8a8_rtn(weight)
    if opts.bits == 8:
        return quantize_w8a16_rtn(weight)
    return quantize_w4a16_rtn(weight, opts.group_size, opts.symmetric)


@dataclass
class _LayerResult:
    """A layer's quantized linears, and what the held-out check compared and replaced."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    checked: int = 0
    fell_back: list[str] = field(default_factory=list)


def _quantize_rtn(
    layer: nn.Module, inputs, kwargs, opts: QuantizeOptions, held: torch.Tensor
) -> _LayerResult:
    return _LayerResult({name: _rtn(linear.weight.data, opts) for name, linear in _linears(layer).items()})


def _quantize_gptq(
    layer: nn.Module, inputs, kwargs, opts: QuantizeOptions, held: torch.Tensor
) -> _LayerResult:
    """GPTQ fitted without the held-out windows is checked on them; where it beats RTN, the codes
    kept are GPTQ's refitted on every window (no calibration row is lost to the check)."""
    groups = _groups(layer)
    # The linears of a group see the same inputs, so they share one Hessian.
    watched = {key: linears[0][1] for key, linears in groups.items()}
    holding_out = bool(held.any())
    fit = {key: Hessian(m.in_features) for key, m in watched.items()}
    every = {key: Hessian(m.in_features) for key, m in watched.items()} if holding_out else fit
    split = SplitRows(held, opts.batch_size, lambda key, x: fit[key].add(x))

    def observe(key: str, x: torch.Tensor) -> None:
        if holding_out:
            every[key].add(x)
        split(key, x)

    with watch_inputs(watched, observe):
        run_layer(layer, inputs, kwargs)
    result = _LayerResult()
    for key, linears in groups.items():
        x = split.held_rows(key)  # [rows, in]; None when nothing is held out (no guard)
        fitted, refit = _inverse(fit[key], opts), None
        for name, linear in linears:
            w = linear.weight.data
            qw = _no_worse_than_rtn(
                name, gptq_quantize(w, fitted, opts.group_size, opts.symmetric), w, x, opts, result
            )
            if x is not None and name not in result.fell_back:
                refit = refit or _inverse(every[key], opts)  # once per group, when first needed
                qw = gptq_quantize(w, refit, opts.group_size, opts.symmetric)
            result.weights[name] = qw
    return result


def _inverse(hessian: Hessian, opts: QuantizeOptions) -> InverseHessian:
    return inverse_hessian(hessian.matrix, opts.gptq_act_order, opts.damp)


def _no_worse_than_rtn(
    name: str, qw: QuantizedWeight, weight: torch.Tensor, x: torch.Tensor | None, opts, result: _LayerResult
) -> QuantizedWeight:
    """qw, or RTN's codes where those reproduce the held-out rows x [rows, in] better."""
    if x is None:
        return qw
    result.checked += 1
    rtn = _rtn(weight, opts)
    if output_error(weight, _dense(qw), x) <= output_error(weight, _dense(rtn), x):
        return qw
    result.fell_back.append(name)
    return rtn


class _Samples:
    """Keeps the first `limit` input rows each watched module sees, and their per-channel abs max."""

    def __init__(self, limit: int):
        self.limit = limit
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.absmax: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        kept = self.rows.setdefault(name, [])
        room = self.limit - sum(len(r) for r in kept)
        if room > 0:
            kept.append(x[:room].clone())
        top = x.abs().amax(dim=0)
        self.absmax[name] = torch.maximum(self.absmax[name], top) if name in self.absmax else top

    def x(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])


def _collect(
    layer: nn.Module, inputs, kwargs, limit: int, held, batch_size: int
) -> tuple[_Samples, SplitRows]:
    """The first `limit` fitting rows (and every row's abs max) of each input group but o_proj's,
    and the rows of the held-out windows."""
    samples = _Samples(limit)
    watched = {key: linears[0][1] for key, linears in _groups(layer).items() if key != "o_proj"}
    split = SplitRows(held, batch_size, samples)
    with watch_inputs(watched, split):
        run_layer(layer, inputs, kwargs)
    return samples, split


@torch.no_grad()
def _fold(layer: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Divide each input group's producer by s and multiply its consumers' columns by s: the float
    layer computes exactly the same function afterwards."""
    mlp, linears = layer.mlp, _groups(layer)
    # Gemma's layers (the only ones with a pre-feedforward norm) scale by 1 + w: fold into that.
    gemma = hasattr(layer, "pre_feedforward_layernorm")
    mlp_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    norms = {"q_proj": layer.input_layernorm.weight, "gate_proj": mlp_norm.weight}
    for key, norm_weight in norms.items():
        s = scales[key]
        if gemma:
            norm_weight.copy_((1 + norm_weight) / s - 1)
        else:
            norm_weight.div_(s)
        for _, linear in linears[key]:
            linear.weight.mul_(s)
    s = scales["down_proj"]  # down's input is act(gate) * up: linear in up's output rows
    up = mlp.gate_up_proj if hasattr(mlp, "gate_up_proj") else mlp.up_proj
    rows = slice(up.out_features - s.numel(), None)  # Phi-3's fused gate_up: up is the second half
    up.weight[rows].div_(s[:, None])
    if up.bias is not None:  # Llama's mlp_bias: the bias is part of those rows
        up.bias[rows].div_(s)
    mlp.down_proj.weight.mul_(s)


def _group_weights(layer: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The weights whose input columns each folded scale multiplies (o_proj has none: its input
    comes from attention, which no scale can pass through)."""
    return {
        key: [linear.weight.data for _, linear in linears]
        for key, linears in _groups(layer).items()
        if key != "o_proj"
    }


def _quantize_awq(
    layer: nn.Module, inputs, kwargs, opts: QuantizeOptions, held: torch.Tensor
) -> _LayerResult:
    samples, split = _collect(layer, inputs, kwargs, MAX_SEARCH_TOKENS, held, opts.batch_size)
    group = opts.group_size if opts.group_size != -1 else None
    scales, checked, fell_back = {}, 0, []
    for key, weights in _group_weights(layer).items():
        size = group or weights[0].shape[1]
        s = search_scales(samples.x(key), weights, size, opts.symmetric)
        x = split.held_rows(key)
        if x is not None:  # the check, per input group: its scale is one fold for all its linears
            checked += 1
            if scaled_error(x, weights, s, size, opts.symmetric) > scaled_error(
                x, weights, torch.ones_like(s), size, opts.symmetric
            ):
                s = torch.ones_like(s)
                fell_back.append(key)
        scales[key] = s
    _fold(layer, scales)
    return replace(_quantize_rtn(layer, inputs, kwargs, opts, held), checked=checked, fell_back=fell_back)


def _quantize_smoothquant(
    layer: nn.Module, inputs, kwargs, opts: QuantizeOptions, held: torch.Tensor
) -> _LayerResult:
    samples, _ = _collect(layer, inputs, kwargs, MAX_SEARCH_TOKENS, held, opts.batch_size)
    scales = {
        key: smoothing_factors(samples.absmax[key], weights, opts.alpha)
        if opts.alpha is not None
        else search_alpha(samples.x(key), samples.absmax[key], weights)
        for key, weights in _group_weights(layer).items()
    }
    _fold(layer, scales)
    return _quantize_rtn(layer, inputs, kwargs, opts, held)


_LAYER_METHODS: dict[str, Callable] = {
    "rtn": _quantize_rtn,
    "gptq": _quantize_gptq,
    "awq": _quantize_awq,
    "smoothquant": _quantize_smoothquant,
}


# ---------------------------------------------------------------------- the whole model


@torch.no_grad()
def _set_quantized(layer: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Put the quantized weights, dequantized, into the float layer, so the next layer is
    calibrated on the outputs it will really get."""
    for name, linear in _linears(layer).items():
        qw = quantized[name]
        linear.weight.copy_(method_for(qw.config).dequantize(qw.tensors))


def projection_input_sizes(config: ModelConfig) -> list[int]:
    """The in_features of every decoder projection (q/k/v/gate/up read hidden, o reads the heads,
    down reads the intermediate)."""
    return sorted({config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim})


def fitting_group_sizes(config: ModelConfig) -> list[int]:
    """Power-of-two group sizes from 256 down to 16 that divide every projection's input, largest first."""
    sizes = projection_input_sizes(config)
    return [g for g in (256, 128, 64, 32, 16) if all(k % g == 0 for k in sizes)]


def _check_group_size(checkpoint: Checkpoint, opts: QuantizeOptions) -> None:
    """Fail before any calibration work, naming sizes that would work."""
    if opts.bits != 4 or opts.group_size == -1:
        return
    sizes = projection_input_sizes(checkpoint.config)
    if any(k % opts.group_size for k in sizes):
        fits = fitting_group_sizes(checkpoint.config)
        raise ValueError(
            f"group size {opts.group_size} does not divide this model's projection input sizes {sizes}; "
            f"use one of {[*fits, -1]} (-1 is per channel)"
        )


@dataclass(frozen=True)
class QuantizeReport:
    """What the held-out check did: `checked` linears (AWQ: input groups) compared with RTN on
    held-out calibration windows, `fell_back` those (full names) that kept RTN's codes."""

    method: str
    checked: int
    fell_back: tuple[str, ...]

    def summary(self) -> str:
        if not self.checked:
            return f"{self.method}: no held-out check (one calibration window, or --no-guard)"
        return (
            f"{self.method}: {len(self.fell_back)} of {self.checked} checked "
            f"{'input groups' if self.method == 'awq' else 'linears'} kept round-to-nearest codes "
            "(those did better on the held-out calibration windows)"
            + (f": {', '.join(self.fell_back)}" if self.fell_back else "")
        )


def quantize_model(
    source: str | Checkpoint,
    opts: QuantizeOptions,
    calibration_text: str | None = None,
    progress: bool = True,
) -> Checkpoint:
    """The model at `source` (GGUF or HF dir, or a loaded Checkpoint) quantized by `opts`; the
    held-out check's summary is logged."""
    checkpoint, report = quantize_model_with_report(source, opts, calibration_text, progress)
    log.info(report.summary())
    return checkpoint


def quantize_model_with_report(
    source: str | Checkpoint,
    opts: QuantizeOptions,
    calibration_text: str | None = None,
    progress: bool = True,
) -> tuple[Checkpoint, QuantizeReport]:
    from tqdm.auto import tqdm

    checkpoint = load_checkpoint(source) if not isinstance(source, Checkpoint) else source
    _check_group_size(checkpoint, opts)
    model = hf_model(checkpoint)
    layers = model.model.layers
    inputs, kwargs = [], [{} for _ in layers]
    held = torch.zeros(opts.num_samples, dtype=torch.bool)
    if opts.needs_calibration:
        _warn_if_few_tokens(checkpoint.config, opts)
        if calibration_text is None:
            from .text_data import standard_text

            calibration_text = standard_text("c4")
        samples = calibration_samples(
            checkpoint.tokenizer, calibration_text, opts.num_samples, opts.seq_len, opts.seed
        )
        inputs, kwargs = first_layer_inputs(model, samples, opts.batch_size)
        if opts.guard and opts.method in GUARDED:
            held = held_out_windows(opts.num_samples)
    quantized: dict[str, QuantizedWeight] = {}
    checked, fell_back = 0, []
    method = _LAYER_METHODS[opts.method]
    for i, layer in enumerate(tqdm(layers, desc=f"{opts.method} layers", disable=not progress)):
        result = method(layer, inputs, kwargs[i], opts, held)
        _set_quantized(layer, result.weights)
        if opts.needs_calibration:
            inputs = run_layer(layer, inputs, kwargs[i])
        prefix = f"model.layers.{i}."
        checked += result.checked
        fell_back += [f"{prefix}{_part(name)}.{name}" for name in result.fell_back]
        for name, qw in result.weights.items():
            quantized[f"{prefix}{_part(name)}.{name}.weight"] = qw
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and checkpoint.config.tie_word_embeddings:
            continue
        kept = quantized.get(name)
        weights[name] = kept if kept is not None else _unquantized(checkpoint.weights[name], tensor)
    quantized_checkpoint = replace(checkpoint, weights=weights, source=f"{checkpoint.source} ({opts.method})")
    return quantized_checkpoint, QuantizeReport(opts.method, checked, tuple(fell_back))


def _part(name: str) -> str:
    """The module a projection (or AWQ input group, named by its first member) sits in."""
    return "self_attn" if name in (*ATTENTION, "qkv_proj", "o_proj") else "mlp"


def _warn_if_few_tokens(config: ModelConfig, opts: QuantizeOptions) -> None:
    """GPTQ fits each linear to its calibration rows: with few rows per input dimension it fits
    them at the expense of other text (docs/accuracy.md: tokens per Hessian dimension)."""
    widest = max(projection_input_sizes(config))
    per_dim = opts.num_samples * opts.seq_len / widest
    if per_dim < MIN_TOKENS_PER_DIM:
        log.warning(
            "calibration has %d tokens, %.1f per input dimension of the widest projection (%d): "
            "below %d, calibrated methods fit the calibration text more than text in general; "
            "use more samples (--num-samples) or longer ones (--seq-len)",
            opts.num_samples * opts.seq_len, per_dim, widest, MIN_TOKENS_PER_DIM,
        )  # fmt: skip


def _unquantized(source, current: torch.Tensor):
    """A weight the method does not quantize, as the source stored it: a GGUF's Q8_0 embedding
    stays Q8_0 and fp16 stays fp16 (the fp32 copy only served calibration). Norms that AWQ or
    SmoothQuant folded scales into come from `current`, in the source dtype."""
    if not isinstance(source, torch.Tensor):
        return source  # quantized in the source (embeddings): no method changes it
    return current.detach().to(source.dtype).clone()
