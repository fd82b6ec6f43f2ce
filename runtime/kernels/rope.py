"""Rotary position embedding with YaRN scaling (docs/gpt-oss-spec.md §4.4).

Half-split pairing (component i rotates with i + d/2), frequencies blended between the original and
the 32x-stretched ones by YaRN's linear ramp, and cos/sin scaled by the concentration
0.1 * ln(factor) + 1, which multiplies every attention logit by its square.
"""

from __future__ import annotations

import math

import torch


def yarn_frequencies(head_dim: int, base: float, factor: float, original_context: int,
                     ntk_alpha: float, ntk_beta: float) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in fp32, concentration)."""
    half = head_dim // 2
    freq = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    concentration = 0.1 * math.log(factor) + 1.0
    # Dimensions whose wavelength fits beta times into the original context keep their frequency;
    # those fitting fewer than alpha times are interpolated (divided by the factor); linear between.
    low = half * math.log(original_context / (ntk_beta * 2 * math.pi)) / math.log(base)
    high = half * math.log(original_context / (ntk_alpha * 2 * math.pi)) / math.log(base)
    interpolation = 1.0 / (factor * freq)
    extrapolation = 1.0 / freq
    ramp = ((torch.arange(half, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp
    inv_freq = interpolation * (1 - mask) + extrapolation * mask
    return inv_freq, concentration


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [N, head_dim / 2] for absolute positions, rounded to the activation dtype."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return (angles.cos() * concentration).to(dtype), (angles.sin() * concentration).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by per-token cos/sin [N, head_dim / 2] (half-split pairs)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rope_qk(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float,
            num_q_heads: int, num_kv_heads: int,
            head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the QKV projection [N, (Hq + 2 Hkv) * D] into q [N, Hq, D], k, v [N, Hkv, D] and rotate
    q and k. New tensors for q and k (qkv is left as it is); v is a view of qkv."""
    cos, sin = cos_sin(positions, inv_freq, concentration, qkv.dtype)
    q, k, v = qkv.unflatten(-1, (-1, head_dim)).split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
