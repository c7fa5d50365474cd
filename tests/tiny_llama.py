"""A tiny random Llama made by transformers itself, saved as an HF directory: the independent
reference model of the quantizer and CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.runtime.quant import method_for
from lowbit.runtime.quant.rtn import quantize_rtn

VOCAB = 49152  # the default model's tokenizer is reused, so the vocabulary must match it
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_tiny_llama(path: Path, hf_tokenizer) -> LlamaForCausalLM:
    """hidden 128, intermediate 256, 2 layers, GQA 4/2; returns the transformers model."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves norms at 1; perturb them so they matter too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    return model


def with_rtn_weights(model: LlamaForCausalLM, scheme: str) -> LlamaForCausalLM:
    """A copy of `model` whose projections hold RTN-quantized-then-dequantized weights: what our
    engine computes after `quantization=scheme` on load, run by transformers."""
    clone = LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name.split(".")[-2] in PROJECTIONS:
                q = quantize_rtn(p.data, scheme)
                p.copy_(method_for(q.config).dequantize(q.tensors))
    return clone
