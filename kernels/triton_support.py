"""Where the Triton kernels run: on CUDA devices, and on CPU tensors under Triton's interpreter.

The engine picks the Triton path for CUDA devices only. Tests run the same kernels on CPU with
TRITON_INTERPRET=1 (set by tests/conftest.py before anything imports triton: `triton.jit` reads it
at decoration time). LOWBIT_TRITON_ON_CPU=1 together with TRITON_INTERPRET=1 makes the engine pick
the Triton path for a CPU model too, so a whole model can be checked through the interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """None if the engine should run Triton kernels on `device`, else why not."""
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting() and os.environ.get("LOWBIT_TRITON_ON_CPU") == "1":
        return None
    return "Triton kernels run on CUDA (on CPU only with TRITON_INTERPRET=1 and LOWBIT_TRITON_ON_CPU=1)"


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def use_triton(device: torch.device) -> bool:
    return triton_unavailable(device) is None


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: nothing to fill


def split_k_plan(programs: int, k_blocks: int, device: torch.device, split_k: int | None) -> tuple[int, int]:
    """(splits, blocks per split) for a split-K launch of `programs` tiles over `k_blocks` blocks of
    the input dim: by default enough programs for ~4 per SM (split_k: at most that many splits);
    never an empty split."""
    if split_k is None:
        target = 4 * num_sms(device)
        split_k = 1 if programs >= target else -(-target // programs)
    if split_k < 1:
        raise ValueError(f"triton: split_k must be >= 1, got {split_k}")
    per_split = -(-k_blocks // min(split_k, k_blocks))
    return -(-k_blocks // per_split), per_split


def check_window_and_cap(window: int, softcap: float) -> None:
    """The attention kernels' sliding window and logit cap: 0 for none, else positive."""
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: none), got {window!r}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0: none), got {softcap!r}")
