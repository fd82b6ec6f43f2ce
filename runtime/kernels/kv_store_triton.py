"""Keys and values as the paged KV cache stores them, in Triton: the kernels that fill the cache
(rope_triton's launch, linear_triton's fused QKV epilogue) pass each value through `to_cache`, which
rounds exactly as kv_cache.to_cache_dtype does on the reference path.

A float8 e4m3 cache saturates at +-448 and rounds to nearest, ties to even. The GPU's conversion
(cvt.rn) does that after the clamp; Triton's interpreter rounds ties away from zero and flushes
values under the smallest normal, so there `_e4m3_code` rounds with integer and fp32 arithmetic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime import kv_cache
from runtime.options import options

_INTERPRET = tl.constexpr(options.interpret)  # fixed for the process: Triton reads it when compiling
FP8_E4M3_MAX = tl.constexpr(kv_cache.FP8_E4M3_MAX)
SMALLEST_NORMAL = tl.constexpr(2.0 ** -6)  # e4m3: below it, multiples of 2^-9


@triton.jit
def _e4m3_code(x):
    """fp32 values, already within +-448, as float8 e4m3fn bit patterns (int32 0..255)."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(x)
    magnitude = a.to(tl.int32, bitcast=True)
    # Normal: the fp32 mantissa rounded to 3 bits, ties to even (a carry lands in the exponent, as it
    # should); then the exponent rebased from fp32's bias 127 to e4m3's 7.
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal: the nearest multiple of 2^-9, ties to even by an fp32 add at 2^23 (code 8 is the
    # smallest normal, as it should be).
    subnormal = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(a < SMALLEST_NORMAL, subnormal, normal) | (sign << 7)


@triton.jit
def to_cache(value, cache_ptr):
    """value (fp32, bf16 or fp16) in the element type of cache_ptr, the KV pages it is stored to."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.minimum(tl.maximum(value.to(tl.float32), -FP8_E4M3_MAX), FP8_E4M3_MAX)
        if _INTERPRET:
            return _e4m3_code(x).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        else:
            return x.to(tl.float8e4nv)
    else:
        return value.to(cache_ptr.dtype.element_ty)
