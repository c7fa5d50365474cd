"""lowbit: an inference runtime for quantized LLMs.

from lowbit import LLM, SamplingParams
llm = LLM()  # SmolLM2-135M-Instruct Q4_1 GGUF
print(llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]

if TYPE_CHECKING:
    from lowbit.runtime.llm import LLM
    from lowbit.runtime.sampling_params import SamplingParams


def _log_level_from_environment() -> None:
    """LOWBIT_LOG=debug|info|warning|error sets the level of lowbit's loggers and prints their records
    to stderr, whoever configured logging (or nobody). `LOWBIT_LOG=debug` shows, among others, the
    backend each op chose when a model was built and why those before it were refused."""
    level = os.environ.get("LOWBIT_LOG")
    if not level:
        return
    logger = logging.getLogger(__name__)
    try:
        logger.setLevel(level.upper())
    except ValueError:
        logger.warning("LOWBIT_LOG=%s is not a logging level (debug, info, warning, error): ignored", level)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # the CLI's root handler would print each record a second time


_log_level_from_environment()


def __getattr__(name: str) -> Any:
    # Lazy, so that `lowbit --help` and other light imports do not pay for torch.
    if name == "LLM":
        from lowbit.runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from lowbit.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
