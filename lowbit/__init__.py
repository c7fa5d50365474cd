"""lowbit: an inference runtime for quantized LLMs.

from lowbit import LLM, SamplingParams
llm = LLM()  # SmolLM2-135M-Instruct Q4_1 GGUF
print(llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]

if TYPE_CHECKING:
    from lowbit.runtime.llm import LLM
    from lowbit.runtime.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so that `lowbit --help` and other light imports do not pay for torch.
    if name == "LLM":
        from lowbit.runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lowbit.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
