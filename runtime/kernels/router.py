"""The MoE router (docs/gpt-oss-spec.md §4.6): each token's top-k experts by the gate's logits,
weighted by a softmax over the k chosen logits only. The reference of
runtime/kernels/router_triton.py."""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights: softmax over the k chosen logits only."""
    top_logits, experts = torch.topk(logits, k, dim=-1, sorted=True)
    weights = torch.softmax(top_logits.float(), dim=-1)
    return experts, weights
