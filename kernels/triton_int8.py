"""Device helpers shared by the Triton kernels that quantize to int8 (activations, KV cache)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(y):
    """torch.round for fp32 y with |y| < 2^23, from floor and compares only (libdevice's rint
    does not run under the interpreter). a - floor(a) is exact for a >= 0, so ties are exact and no
    tie is invented or lost the way floor(y + 0.5) can."""
    a = tl.abs(y)
    r = tl.floor(a)
    frac = a - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    r = r + up.to(tl.float32)
    return tl.where(y < 0, -r, r)
