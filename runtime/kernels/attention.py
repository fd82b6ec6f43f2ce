"""Attention with GQA, a learned per-head sink logit, and causal or sliding-window masks (§4.5).

The sink is one extra logit per head in the softmax's denominator, with no value vector: the
probabilities over real keys sum to less than one. It is not scaled by sm_scale.
"""

from __future__ import annotations

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
              q_start: int, k_start: int, sm_scale: float, window: int | None) -> torch.Tensor:
    """One sequence: queries q [n, H, D] at positions q_start.., keys/values [L, KVH, D] at k_start...

    Key j is visible to query t iff j <= t and, with a window W, j > t - W. Returns [n, H, D] in
    q's dtype; scores, softmax and the value sum are computed in fp32.
    """
    n, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv  # query head h reads KV head h // group
    qf = q.float().view(n, num_kv, group, head_dim)
    scores = torch.einsum("nkgd,lkd->kgnl", qf, k.float()) * sm_scale
    q_pos = torch.arange(q_start, q_start + n, device=q.device)[:, None]
    k_pos = torch.arange(k_start, k_start + k.shape[0], device=q.device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().view(num_kv, group, 1, 1).expand(num_kv, group, n, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("kgnl,lkd->nkgd", probs, v.float())
    return out.reshape(n, num_heads, head_dim).to(q.dtype)
