"""Architecture registry: architecture name (as `ModelConfig.architecture` gives it) -> model class."""

from __future__ import annotations

from torch import nn

from .llama import LlamaForCausalLM

# One class: the families' differences are ModelConfig data (runtime/models/llama.py).
MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r} (supported: {sorted(MODELS)})") from None
