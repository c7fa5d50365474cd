"""Gemma 2's attention logit cap inside the Triton attention kernels (decode and prefill)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def soft_cap(s, cap):
    """cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1): one exp2 and no libdevice call,
    so the interpreter runs it too. Its absolute error is a few fp32 ulps of `cap` (the cancellation
    near 0 is absolute, not relative), far inside the scores' own rounding. Scores and cap share the
    kernels' exp2 domain (both scaled by log2(e)), where the cap means the same thing."""
    e = tl.exp2(s * (2.8853900817779268 / cap))  # exp(2 s / cap) in base 2: 2 / ln 2 = 2.885...
    return cap - 2.0 * cap / (e + 1.0)
