"""What the hardware allows and what the model needs: the ceilings measured on this device (copy
bandwidth, bf16 matmul rate) and the model's bytes and FLOPs per token, from its shapes alone.

The benchmarks (launch/bench.py, launch/throughput.py) report every speed as a ratio to a limit built
from these: batch-1 decode to copy bandwidth over the weight bytes a token reads, prefill and offline
throughput to the matmul rate over the FLOPs their tokens need.
"""

from __future__ import annotations

import statistics
import time

import torch

from runtime.checkpoint import tensor_specs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written by a 2 GiB device copy) and bf16 matmul FLOP/s (8192^3),
    medians of 10 after 3 warm-ups; empty off CUDA."""
    if device.type != "cuda":
        return {}

    def median_seconds(fn) -> float:
        times = []
        for i in range(13):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    src = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / median_seconds(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul = 2 * 8192**3 / median_seconds(lambda: a @ a)
    return {"copy_bytes_per_s": copy, "matmul_flops": matmul}


def weight_bytes_per_token(cfg) -> int:
    """Weights one decoded token reads at batch 1: all but the unused experts and embedding rows."""
    total = 0
    for name, spec in tensor_specs(cfg).items():
        n = 1
        for s in spec.shape:
            n *= s
        size = n if spec.kind == "uint8" else 2 * n
        if ".mlp.mlp" in name:  # experts: only experts_per_token of num_experts are read
            size = size * cfg.experts_per_token // cfg.num_experts
        if name == "embedding.weight":
            size = 2 * cfg.hidden_size
        total += size
    return total


def flops_per_token(cfg) -> int:
    """Matmul FLOPs of one prompt token, attention scores excluded (they grow with the context)."""
    d, heads, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attention = 2 * d * (heads + 2 * kv) * hd + 2 * heads * hd * d
    experts = 2 * cfg.experts_per_token * 3 * d * cfg.intermediate_size
    return cfg.num_hidden_layers * (attention + experts + 2 * d * cfg.num_experts)


def head_flops(cfg) -> int:
    """FLOPs of the LM head for one row whose logits are computed."""
    return 2 * cfg.hidden_size * cfg.vocab_size


def _sum_of_counts(start: int, end: int) -> int:
    """sum of p + 1 over positions start .. end - 1 (the keys a causal query at p sees)."""
    return (end * (end + 1) - start * (start + 1)) // 2 if end > start else 0


def attention_score_flops(cfg, start: int, end: int) -> int:
    """FLOPs of attention scores and the weighted value sum (2 + 2 per key, head and dimension) for
    the queries at positions start .. end - 1 of one sequence: a full layer's query at position p
    sees p + 1 keys, a sliding layer's min(p + 1, window)."""
    per_key = 4 * cfg.num_attention_heads * cfg.head_dim
    sliding_layers = len(cfg.layers(sliding=True))
    keys = len(cfg.layers(sliding=False)) * _sum_of_counts(start, end)
    if sliding_layers:
        w = cfg.sliding_window
        windowed = _sum_of_counts(start, min(end, w)) + w * max(0, end - max(start, w))
        keys += sliding_layers * windowed
    return per_key * keys


def sequence_flops(cfg, prompt: int, generated: int) -> int:
    """FLOPs a request of `prompt` tokens that generated `generated` tokens needs, done once: every
    token but the last generated one runs through the layers (matmuls and attention at its position),
    and each generated token's logits come from the head."""
    positions = prompt + max(generated, 1) - 1
    return (positions * flops_per_token(cfg) + attention_score_flops(cfg, 0, positions)
            + generated * head_flops(cfg))
