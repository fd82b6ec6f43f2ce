"""Attention with GQA, a learned per-head sink logit, and causal or sliding-window masks
(docs/gpt-oss-spec.md §4.5).

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


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                    cu_q: torch.Tensor, q_start: torch.Tensor, sinks: torch.Tensor, *, sm_scale: float,
                    window: int | None) -> torch.Tensor:
    """A flat batch of sequences over a paged KV cache: `attention` per sequence. Returns [N, H, D].

    k_pages, v_pages [num_pages, page_size, KVH, D]; key position p of sequence s is at
    k_pages[block_table[s, p // page_size], p % page_size]. Sequence s owns q rows cu_q[s]:cu_q[s+1]
    at positions q_start[s]..., and its keys 0 .. q_start[s] + n_s - 1 are in the cache. Only the
    block-table entries covering the visible keys are read: a sliding layer's older pages may be freed.
    """
    page_size = k_pages.shape[1]
    out = torch.empty_like(q)
    bounds, starts = cu_q.tolist(), q_start.tolist()
    for s, start in enumerate(starts):
        rows = slice(bounds[s], bounds[s + 1])
        end = start + bounds[s + 1] - bounds[s]  # one past the last key
        if end == start:
            continue
        first = 0 if window is None else max(0, start - window + 1)  # the first query's oldest key
        pages = block_table[s, first // page_size:(end - 1) // page_size + 1].long()
        offset = first % page_size
        k = k_pages[pages].flatten(0, 1)[offset:offset + end - first]
        v = v_pages[pages].flatten(0, 1)[offset:offset + end - first]
        out[rows] = attention(q[rows], k, v, sinks, q_start=start, k_start=first, sm_scale=sm_scale,
                              window=window)
    return out
