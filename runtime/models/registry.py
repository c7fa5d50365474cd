"""Architecture registry: architecture name (as `ModelConfig.architecture` gives it) -> model class."""

from __future__ import annotations

from torch import nn

from .gemma import GemmaForCausalLM
from .llama import LlamaForCausalLM

# The families' differences are ModelConfig data (runtime/models/llama.py), except Gemma's norms
# and embedding scale, which are code (runtime/models/gemma.py).
MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3": GemmaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r} (supported: {sorted(MODELS)})") from None
