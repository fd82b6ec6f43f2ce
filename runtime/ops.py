"""One function per operation the model calls, each choosing its kernel or its reference here.

The model (runtime/model.py) reads as math and calls these; which code runs is decided in this file
alone. The Triton kernels run on CUDA tensors (and on CPU tensors through Triton's interpreter with
`options.kernels_on_cpu`); the pure-torch references run everywhere else, or everywhere with
`options.reference` (runtime/options.py). Both paths read and write the same paged KV cache through
the same step description (runtime/step.py), so they differ only in arithmetic order.

Each function, its kernel path, and its reference path:
- `linear_for(ways)`, a linear layer's matmul: at one row of an unsplit layer the bf16 GEMV
  (`linear_triton`), else torch | torch.
- `add_rms_norm`, the residual add + RMSNorm: `rmsnorm_triton` | `rmsnorm.add_rms_norm`.
- `rms_norm`, the final norm of the sampled rows: torch on both paths (a few rows a step).
- `qkv_rope_store`, the QKV projection, RoPE on q and k, k and v into the cache: at one row of an
  unsplit layer one GEMV launch doing all three, else the projection and `rope_triton` (which also
  stores) | the projection, `rope.rope_qk` and a scatter into the pages.
- `attention`, paged attention with sinks: `attention_triton` | `attention.paged_attention`.
- `route`, add + RMSNorm, gate, top-4, softmax: with every expert on this rank one launch that also
  sorts the rows by expert (`router_triton`), else the add + norm and `route_triton` |
  `rmsnorm.add_rms_norm`, the gate's linear and `router.route`.
- `local_experts`, the experts, weighted combine and residual add (+ the next norm): `moe_triton`,
  only after `route` sorted the rows | not taken (the reference goes through the exchange).
- `expert_rows`, rows through their experts (the exchange's rows): `moe_triton.expert_rows_triton`
  | `moe.expert_rows`.
- `greedy_into`, argmax and logprob inside the decode graphs: `greedy_triton` | `greedy.greedy`;
  `masked_greedy_into`, the same for the rows a grammar constrains: torch only (see there).
- `sample`, temperature, top-k, top-p, seeds: torch (`sampling.sample_on_device`) on both paths.

Kernel modules are imported inside the functions: triton is a test extra, and the base install
imports the engine without it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.nn.functional import linear as torch_linear

from parallel.layers import ColumnParallelLinear, Matmul
from runtime.kernels import rmsnorm
from runtime.kernels.attention import paged_attention
from runtime.kernels.greedy import greedy, logprobs_of
from runtime.kernels.moe import expert_rows as expert_rows_reference
from runtime.kernels.rope import rope_qk
from runtime.kernels.router import route as route_reference
from runtime.kv_cache import to_cache_dtype
from runtime.options import options
from runtime.sampling import SamplingParams, SeededNoise, sample_on_device
from runtime.step import PagedLayers, PagedStep


def use_kernels(t: torch.Tensor) -> bool:
    """The Triton kernels for tensors on t's device: on CUDA unless forced to the references, and on
    CPU through Triton's interpreter when asked (how the CPU tests check the kernel path)."""
    if options.reference:
        return False
    return t.is_cuda or options.kernels_on_cpu


# ----------------------------------------------------------------------------------- dense layers
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b; at one row on the kernel path the Triton GEMV, which beats cuBLAS there for the
    projections of an unsplit layer (docs/performance.md, "Coordinator, fourth step": 388.0 against
    368.8 tok/s at batch 1 of 20b)."""
    if x.dim() == 2 and x.shape[0] == 1 and use_kernels(x):
        from runtime.kernels.linear_triton import fits, linear_gemv

        if fits(x, weight):
            return linear_gemv(x, weight, bias)
    return torch_linear(x, weight, bias)


def linear_for(ways: int) -> Matmul:
    """The matmul of a linear layer split `ways` ways: the GEMV route only for unsplit layers (at 4
    rows, and at the tp=2 output projection's shape, it lost to cuBLAS: torch there)."""
    return linear if ways == 1 else torch_linear


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, gain: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta rounded to x's dtype, its RMSNorm); with delta None, (x, RMSNorm of x)."""
    if use_kernels(x):
        from runtime.kernels.rmsnorm_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, delta, gain, eps)
    return rmsnorm.add_rms_norm(x, delta, gain, eps)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """The final norm before the LM head, over the rows whose logits are wanted: torch on both paths."""
    return rmsnorm.rms_norm(x, gain, eps)


# -------------------------------------------------------------------------------------- attention
@dataclasses.dataclass
class Rotary:
    """A step's RoPE inputs: each token's position and the YaRN frequencies and concentration."""
    positions: torch.Tensor  # [N] int64
    inv_freq: torch.Tensor  # [head_dim / 2] fp32
    concentration: float


def qkv_rope_store(h: torch.Tensor, qkv: ColumnParallelLinear, heads: int, kv_heads: int, head_dim: int,
                   rotary: Rotary, kv: PagedLayers, layer: int) -> torch.Tensor:
    """q [N, heads, head_dim] of the QKV projection of h, rotated; the rotated k and v are stored at
    the step's slots of `layer` in kv's pool."""
    keys, values = kv.pool.keys[layer], kv.pool.values[layer]
    if use_kernels(h):
        from runtime.kernels.linear_triton import Rope, fits, linear_gemv
        from runtime.kernels.rope_triton import rope_qk_triton

        rope = Rope(rotary.positions, rotary.inv_freq, rotary.concentration, head_dim, heads, kv_heads)
        cache = (keys, values, kv.slots)
        if h.shape[0] == 1 and qkv.group.size == 1 and fits(h, qkv.weight, rope):
            # Batch-1 decode, where the projection would run the GEMV anyway (`linear`): its epilogue
            # also rotates q and k and fills the cache, one launch instead of two.
            out = linear_gemv(h, qkv.weight, getattr(qkv, "bias", None), rope=rope, cache=cache)
            return out.unflatten(-1, (-1, head_dim))[:, :heads]
        q, _, _ = rope_qk_triton(qkv(h), rotary.positions, rotary.inv_freq, rotary.concentration, heads,
                                 kv_heads, head_dim, cache=cache)
        return q
    q, k, v = rope_qk(qkv(h), rotary.positions, rotary.inv_freq, rotary.concentration,
                      heads, kv_heads, head_dim)
    keys.flatten(0, 1)[kv.slots] = to_cache_dtype(k, keys.dtype)
    values.flatten(0, 1)[kv.slots] = to_cache_dtype(v, values.dtype)
    return q


def attention(q: torch.Tensor, step: PagedStep, kv: PagedLayers, layer: int, sinks: torch.Tensor,
              sm_scale: float, window: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, heads, head_dim]: each token's attention over its sequence's keys in the paged cache
    (causal, or the last `window` keys), with one learned sink logit per head; written into `out`
    where given (a CUDA graph's fixed buffer)."""
    keys, values = kv.pool.keys[layer], kv.pool.values[layer]
    if use_kernels(q):
        from runtime.kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(q, keys, values, kv.block_table, step.cu_q, step.q_start, sinks,
                                      sm_scale=sm_scale, window=window, max_q_len=step.max_q_len,
                                      max_k_len=step.max_k_len, decodes=step.decodes, out=out)
    result = paged_attention(q, keys, values, kv.block_table, step.cu_q, step.q_start, sinks,
                             sm_scale=sm_scale, window=window)
    return result if out is None else out.copy_(result)


# --------------------------------------------------------------------------- mixture of experts
@dataclasses.dataclass
class ExpertWeights:
    """This rank's experts, MXFP4 packed: blocks [E, N, K / 32, 16] in kernel order (mxfp4.quad_transpose)
    and scales [E, N, K / 32] (uint8)."""
    mlp1_blocks: torch.Tensor
    mlp1_scales: torch.Tensor
    mlp1_bias: torch.Tensor
    mlp2_blocks: torch.Tensor
    mlp2_scales: torch.Tensor
    mlp2_bias: torch.Tensor
    swiglu_limit: float


@dataclasses.dataclass
class Routing:
    residual: torch.Tensor  # x + delta, the residual after attention
    h: torch.Tensor  # its RMSNorm, the experts' input
    expert_ids: torch.Tensor  # [N, k]
    weights: torch.Tensor  # [N, k] fp32, softmax over the chosen
    plan: object | None  # the rows sorted by expert (moe_triton's Plan): `local_experts` may run


def route(x: torch.Tensor, delta: torch.Tensor, norm_gain: torch.Tensor, eps: float,
          gate_weight: torch.Tensor, gate_bias: torch.Tensor, k: int, all_experts_here: bool) -> Routing:
    """The residual add after attention, the MoE's RMSNorm, the gate and each token's top-k experts.
    With every expert on this rank, the kernel path does it all in one launch that also sorts the
    rows by expert (the plan `local_experts` needs); otherwise the add and norm, then the router."""
    if use_kernels(x):
        if all_experts_here:
            from runtime.kernels.router_triton import norm_route_and_plan

            return Routing(*norm_route_and_plan(x, delta, norm_gain, eps, gate_weight, gate_bias, k))
        from runtime.kernels.router_triton import route_triton

        residual, h = add_rms_norm(x, delta, norm_gain, eps)
        return Routing(residual, h, *route_triton(h, gate_weight, gate_bias, k), None)
    residual, h = rmsnorm.add_rms_norm(x, delta, norm_gain, eps)
    return Routing(residual, h, *route_reference(torch_linear(h, gate_weight, gate_bias), k), None)


def local_experts(routing: Routing, w: ExpertWeights, reduce: Callable | None, first: bool,
                  next_norm: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(residual + sum_k weight * expert_k(h), its RMSNorm under next_norm = (gain, eps) or None) for
    a routing that `route` planned (every expert on this rank): one kernel call, the combine fused.
    `reduce` sums partial mlp2 outputs over ranks splitting each expert (`first`: this rank adds the
    bias)."""
    from runtime.kernels.moe_triton import moe_triton

    out = moe_triton(routing.h, routing.expert_ids, routing.weights, w.mlp1_blocks, w.mlp1_scales,
                     w.mlp1_bias, w.mlp2_blocks, w.mlp2_scales, w.mlp2_bias, w.swiglu_limit,
                     residual=routing.residual,
                     reduce=reduce, first=first, rows=routing.plan, next_norm=next_norm)
    return out if next_norm is not None else (out, None)


def shared_token_experts(routing: Routing, expert_ids: torch.Tensor, weights: torch.Tensor, w: ExpertWeights,
                         reduce: Callable, bias_here: bool, next_norm: tuple[torch.Tensor, float] | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """residual + sum_k weight * expert_k(h) for tokens that every rank of a group holds, each rank
    holding some experts (or a slice of each): this rank runs its own on the pairs routed to them
    (parallel.experts.held_here: the others carry id E, one past its last, and weight 0), and
    `reduce` sums the partial outputs (fp32) over the group; the residual is added after the sum.
    bias_here: this rank adds mlp2's bias (the first rank of each expert's slices). Returns (output,
    its RMSNorm under next_norm = (gain, eps), or None)."""
    if use_kernels(routing.h):
        from runtime.kernels.moe_triton import moe_triton

        out = moe_triton(routing.h, expert_ids, weights, w.mlp1_blocks, w.mlp1_scales, w.mlp1_bias,
                         w.mlp2_blocks, w.mlp2_scales, w.mlp2_bias, w.swiglu_limit, residual=routing.residual,
                         reduce=reduce, first=bias_here, next_norm=next_norm)
        return out if next_norm is not None else (out, None)
    n, k = expert_ids.shape
    bias = w.mlp2_bias if bias_here else torch.zeros_like(w.mlp2_bias)
    y = expert_rows_reference(routing.h.repeat_interleave(k, dim=0), expert_ids.reshape(-1), w.mlp1_blocks,
                              w.mlp1_scales, w.mlp1_bias, w.mlp2_blocks, w.mlp2_scales, bias, w.swiglu_limit)
    partial = (y.view(n, k, -1) * weights.unsqueeze(-1).float()).sum(dim=1)
    return routing.residual + reduce(partial).to(routing.residual.dtype), None


def expert_rows(rows: torch.Tensor, experts: torch.Tensor, w: ExpertWeights,
                reduce: Callable | None) -> torch.Tensor:
    """Row i through expert experts[i] (this rank's index): [m, d] fp32, unweighted, bias included."""
    fn = expert_rows_reference
    if use_kernels(rows):
        from runtime.kernels.moe_triton import expert_rows_triton as fn
    return fn(rows, experts, w.mlp1_blocks, w.mlp1_scales, w.mlp1_bias, w.mlp2_blocks, w.mlp2_scales,
              w.mlp2_bias, w.swiglu_limit, reduce)


# --------------------------------------------------------------------------------------- sampling
def greedy_into(logits: torch.Tensor, tokens: torch.Tensor, pairs: torch.Tensor) -> None:
    """Each row's argmax into tokens [M] (int64) and (token, logprob) into pairs [M, 2] (fp64), in
    place: what the decode CUDA graphs run after the forward."""
    if use_kernels(logits):
        from runtime.kernels.greedy_triton import greedy_into as kernel

        kernel(logits, tokens, pairs)
        return
    chosen, logprobs = greedy(logits)
    tokens.copy_(chosen)
    pairs.copy_(torch.stack([chosen.double(), logprobs.double()], dim=1))


def masked_greedy_into(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor,
                       tokens: torch.Tensor, pairs: torch.Tensor) -> None:
    """Rows `rows` of the logits again, each choosing greedily among the tokens its bitmask allows
    (structured outputs): their tokens and (token, logprob) pairs overwrite theirs in `tokens` and
    `pairs` (what greedy_into wrote), the logprobs still the model's own. Torch on every device, over
    the constrained rows only: about 0.1 ms a step for 32 rows on an H100, so a one-pass kernel was not
    worth its place (docs/performance.md, structured outputs)."""
    from runtime.structured import apply_bitmask

    chosen = logits[rows]
    apply_bitmask(chosen, bitmask)
    chosen = torch.argmax(chosen, dim=-1)
    tokens[rows] = chosen
    pairs[rows] = torch.stack([chosen.double(), logprobs_of(logits[rows], chosen).double()], dim=1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[SeededNoise],
           allowed: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [M] and their logprobs [M] of fp32 logits [M, vocab], row i under params[i] drawing from
    generators[i] (and the `allowed` rows only among their allowed tokens), without a host sync: torch
    on every path."""
    return sample_on_device(logits, params, generators, allowed)
