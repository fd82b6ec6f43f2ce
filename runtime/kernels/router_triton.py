"""The MoE router in one Triton kernel: gate projection, top-k, softmax over the chosen k.

`route_triton(h, weight, bias, k)` is `moe.route(linear(h, weight, bias), k)`: the same experts and
weights (ties between equal logits go to the lower expert index). In a decode step the reference
costs a split-K GEMV, its reduction, a sort-based top-k and a softmax, about 15 us a layer of
launches that each move a few KiB. Here, up to FEW_TOKENS tokens (decode), a GEMV kernel spreads the
gate weight (E x d: 180 KiB for gpt-oss-20b, 720 KiB for 120b) over one program per expert and a
second launch picks the top k; for more tokens one kernel takes 16 tokens a program, streams the
whole weight through tl.dot and picks the top k from the logits in registers.

`route_and_plan` also sorts the (token, expert) rows by expert (the MoE GEMMs' plan) in the top-k
program. `norm_route_and_plan` goes further for a decode step on a rank holding every expert: the
residual add after attention, the MoE's RMSNorm, the gate, the top-k and the sort in ONE launch,
where each (token, expert) program normalizes its row and takes one logit, and the last program to
finish (an atomic counter) does the rest.

The logits are rounded to the activation dtype before the top-k, as the reference's bf16 linear
rounds its output, so both compare the same numbers.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from runtime.kernels import compile_ahead, pdl
from runtime.kernels.rmsnorm_triton import MAX_WIDTH, add_rms_norm_triton, rms_norm_rows
from runtime.kernels.moe_triton_details.routing import Plan, count_sort, count_sort_sizes, empty_plan, plan
from runtime.kernels.step_kernel import step_kernel
from runtime.options import options

# The interpreter computes bf16 dots wrongly (docs/environment.md): fp32 operands there.
INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined
FEW_TOKENS = 64  # up to here the gate is a GEMV split over experts; beyond, one tl.dot kernel per 16 tokens
FUSED_PLAN_TOKENS = 16  # up to here route_and_plan sorts the rows by expert in the top-k program


@triton.jit
def _top_k_softmax(logits, t, t_ok, e, e_ok, ids_ptr, weights_ptr, K: tl.constexpr, K_POW2: tl.constexpr,
                   BLOCK_T: tl.constexpr, E_POW2: tl.constexpr):
    """Store the top K of logits [BLOCK_T, E_POW2] (ids, then softmax weights) for tokens t."""
    logits = tl.where(e_ok[None, :], logits, float("-inf"))
    # K rounds of (max, lowest index holding it): descending, as torch.topk(sorted=True) returns them.
    kk = tl.arange(0, K_POW2)
    top = tl.full((BLOCK_T, K_POW2), float("-inf"), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(logits, 1)
        index = tl.min(tl.where(logits == best[:, None], e[None, :], E_POW2), 1)
        tl.store(ids_ptr + t * K + j, index.to(ids_ptr.dtype.element_ty), mask=t_ok)
        top = tl.where(kk[None, :] == j, best[:, None], top)
        logits = tl.where(e[None, :] == index[:, None], float("-inf"), logits)
    p = tl.exp(top - tl.max(top, 1)[:, None])  # the padding columns are -inf: exp gives 0
    p = p / tl.sum(p, 1)[:, None]
    tl.store(weights_ptr + t[:, None] * K + kk[None, :], p, mask=t_ok[:, None] & (kk < K)[None, :])


@step_kernel("T")
def _gate_gemv_kernel(h_ptr, w_ptr, b_ptr, logits_ptr, T, D, E, stride_h, stride_w,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Logits [T, E] (rounded to h's dtype, stored fp32) for few tokens: a program per (BLOCK_T
    tokens, expert), so the E x d weight is read by E programs at once, not by one."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    expert = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    pdl.wait_for_previous_kernel(PDL)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + d) < D
        x = tl.load(h_ptr + t[:, None].to(tl.int64) * stride_h + d0 + d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + expert * stride_w + d0 + d, mask=d_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    logit = tl.sum(acc, 1) + tl.load(b_ptr + expert).to(tl.float32)
    logit = logit.to(h_ptr.dtype.element_ty).to(tl.float32)  # the reference's linear rounds its output
    tl.store(logits_ptr + t * E + expert, logit, mask=t_ok)


@step_kernel("T")
def _top_k_kernel(logits_ptr, ids_ptr, weights_ptr, T, E, K: tl.constexpr, K_POW2: tl.constexpr,
                  E_POW2: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    e = tl.arange(0, E_POW2)
    e_ok = e < E
    pdl.wait_for_previous_kernel(PDL)
    logits = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
    _top_k_softmax(logits, t, t_ok, e, e_ok, ids_ptr, weights_ptr, K, K_POW2, BLOCK_T, E_POW2)


@triton.jit
def _plan_from_logits(logits_ptr, ids_ptr, weights_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, T,
                      E, K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
                      M_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """Every token's top K of logits [T <= BLOCK_T, E] (in the calling program), then its (token,
    expert) rows sorted by expert: the MoE's plan, without a launch of its own."""
    t = tl.arange(0, BLOCK_T)
    t_ok = t < T
    e = tl.arange(0, E_POW2)
    e_ok = e < E
    # .cg reads L2, never this SM's L1: in the fused kernel other programs wrote these logits in the
    # same launch (L1 is not coherent between SMs); after a kernel boundary it costs nothing.
    logits = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0,
                     cache_modifier=".cg")
    _top_k_softmax(logits, t, t_ok, e, e_ok, ids_ptr, weights_ptr, K, K_POW2, BLOCK_T, E_POW2)
    tl.debug_barrier()  # the ids just stored are visible to every thread of this program
    count_sort(ids_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, T * K, E, M_POW2, E_POW2, CHUNK)


@step_kernel("T")
def _top_k_plan_kernel(logits_ptr, ids_ptr, weights_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr,
                       T, E, K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                       BLOCK_T: tl.constexpr, M_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """_plan_from_logits in one program, of logits an earlier launch wrote."""
    pdl.wait_for_previous_kernel(PDL)
    _plan_from_logits(logits_ptr, ids_ptr, weights_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, T,
                      E, K, K_POW2, E_POW2, BLOCK_T, M_POW2, CHUNK)


@step_kernel("T")
def _norm_route_plan_kernel(x_ptr, delta_ptr, gain_ptr, w_ptr, b_ptr, res_ptr, h_ptr, logits_ptr, counter_ptr,
                            ids_ptr, weights_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr,
                            T, D, E, stride_x, stride_d, stride_r, stride_h, stride_w, eps,
                            K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, M_POW2: tl.constexpr,
                            CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Program (token t, expert e): token t's residual add and RMSNorm (stored by expert 0's
    programs), its gate logit for expert e; the last program to finish routes every token and
    sorts the rows (_plan_from_logits). Grid (T, E), T <= BLOCK_T."""
    t = tl.program_id(0) + tl.arange(0, 1)  # [1, BLOCK_D] tiles: the layout add_rms_norm_triton's rows have
    expert = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    # Weights only before the wait (pdl.py): the norm's gain, this expert's gate row and bias.
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + expert * stride_w + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + expert).to(tl.float32)
    pdl.wait_for_previous_kernel(PDL)
    mask = col_ok[None, :]
    x = tl.load(x_ptr + t[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    d = tl.load(delta_ptr + t[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
    # add_rms_norm_triton's arithmetic, step for step (so its outputs are this kernel's, bit for bit):
    # fp32 sum rounded once to the residual's dtype, the norm of that rounded residual in fp32.
    r = (x.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
    h = rms_norm_rows(r.to(tl.float32), gain, D, eps).to(h_ptr.dtype.element_ty)
    # every expert's program computes the row; one stores it
    first = (cols < tl.where(expert == 0, D, 0))[None, :]
    tl.store(res_ptr + t[:, None] * stride_r + cols[None, :], r, mask=first)
    tl.store(h_ptr + t[:, None] * stride_h + cols[None, :], h, mask=first)
    logit = tl.sum(h.to(tl.float32) * w[None, :], axis=1) + bias
    logit = logit.to(h_ptr.dtype.element_ty).to(tl.float32)  # the reference's linear rounds its output
    tl.store(logits_ptr + t * E + expert, logit)
    if _last_to_finish(counter_ptr, T * E):
        _plan_from_logits(logits_ptr, ids_ptr, weights_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr,
                          T, E, K, K_POW2, E_POW2, BLOCK_T, M_POW2, CHUNK)


@triton.jit
def _last_to_finish(counter_ptr, num_programs):
    """Whether this program is the last of the grid past this point (every other program's earlier
    global stores are then visible to it); that program also resets the counter for the next launch.

    Ordering, in the PTX memory model: each program's stores -> bar.sync (orders every thread's
    stores before thread 0's atomic, CTA scope) -> atom.acq_rel.gpu, whose release half makes them
    visible at gpu scope (release is cumulative) before the count moves. The last program's acquire
    half reads the final count, so it synchronizes with every earlier program's release; the
    bar.sync after it extends that to all its threads, and the compiler cannot hoist the caller's
    loads above a barrier or an acquire. Those loads are .cg (L2, the gpu-scope coherence point),
    so no line of another launch's logits that this SM's L1 may still hold can be read."""
    tl.debug_barrier()
    count = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = count == num_programs - 1
    if last:
        # Every program has counted: nothing else touches the counter in this launch, and the next
        # launch (a later layer, a graph replay) sees this store, as kernels end by flushing theirs.
        tl.store(counter_ptr, 0)
    tl.debug_barrier()
    return last


@step_kernel("T")
def _router_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, weights_ptr, T, D, E, stride_h, stride_w,
                   K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    e = tl.arange(0, E_POW2)
    e_ok = e < E
    d = tl.arange(0, BLOCK_D)
    pdl.wait_for_previous_kernel(PDL)
    acc = tl.zeros((BLOCK_T, E_POW2), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + d) < D
        x = tl.load(h_ptr + t[:, None].to(tl.int64) * stride_h + d0 + d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + e[:, None] * stride_w + d0 + d[None, :], mask=e_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    logits = acc.to(h_ptr.dtype.element_ty).to(tl.float32)  # the reference's linear rounds its output
    _top_k_softmax(logits, t, t_ok, e, e_ok, ids_ptr, weights_ptr, K, K_POW2, BLOCK_T, E_POW2)


def route_triton(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                 ids_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts [T, k] (ids_dtype) and their weights [T, k] (fp32) of h [T, d] under the gate
    (weight [E, d], bias [E])."""
    return _route(h, weight, bias, k, ids_dtype)


def _route(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
           ids_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """route_triton's body: route_and_plan calls it too (tests record each public call once)."""
    T, D = h.shape
    E = weight.shape[0]
    assert weight.shape == (E, D) and bias.shape == (E,) and h.stride(1) == 1 and weight.stride(1) == 1
    ids = torch.empty((T, k), dtype=ids_dtype, device=h.device)
    weights = torch.empty((T, k), dtype=torch.float32, device=h.device)
    if T == 0:
        return ids, weights
    e_pow2, k_pow2 = max(16, triton.next_power_of_2(E)), triton.next_power_of_2(k)
    if T <= FEW_TOKENS:  # decode: the weight split over E programs, then one small top-k launch
        _top_k_kernel[(triton.cdiv(T, 16),)](_gate_logits(h, weight, bias), ids, weights, T, E, K=k,
                                             K_POW2=k_pow2, E_POW2=e_pow2, BLOCK_T=16, num_warps=4,
                                             **pdl.launch_args(h.device))
        return ids, weights
    _router_kernel[(triton.cdiv(T, 16),)](  # prefill: 16 tokens a program (tl.dot's smallest M on Hopper)
        h, weight, bias, ids, weights, T, D, E, h.stride(0), weight.stride(0),
        K=k, K_POW2=k_pow2, E_POW2=e_pow2, BLOCK_T=16,
        BLOCK_D=128 if e_pow2 <= 32 else 64, DOT_FP32=INTERPRET or h.dtype == torch.float32, num_warps=4,
        **pdl.launch_args(h.device))
    return ids, weights


def _gate_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, E] of few tokens (rounded to h's dtype), the weight split over E programs."""
    (T, D), E = h.shape, weight.shape[0]
    logits = torch.empty((T, E), dtype=torch.float32, device=h.device)
    block_t = min(8, triton.next_power_of_2(T))
    _gate_gemv_kernel[(triton.cdiv(T, block_t), E)](h, weight, bias, logits, T, D, E, h.stride(0),
                                                    weight.stride(0), BLOCK_T=block_t, BLOCK_D=256,
                                                    num_warps=4, **pdl.launch_args(h.device))
    return logits


def route_and_plan(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """route_triton (int32 ids) and the rows sorted by expert (moe_triton.plan) for a rank holding
    every expert. Up to FUSED_PLAN_TOKENS tokens the sort runs in the top-k launch (one program
    sees all of them), which saves a launch a layer in decode steps."""
    return _route_and_plan(h, weight, bias, k)


def _route_and_plan(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """route_and_plan's body: norm_route_and_plan calls it too (tests record each public call once)."""
    T, E = h.shape[0], weight.shape[0]
    if T == 0 or T > FUSED_PLAN_TOKENS:
        ids, weights = _route(h, weight, bias, k, torch.int32)
        return ids, weights, plan(ids, E)
    ids = torch.empty((T, k), dtype=torch.int32, device=h.device)
    weights = torch.empty((T, k), dtype=torch.float32, device=h.device)
    rows = empty_plan(T * k, E, h.device)
    _top_k_plan_kernel[(1,)](_gate_logits(h, weight, bias), ids, weights, rows.order, rows.position,
                             rows.counts, rows.offsets, T, E, K=k, K_POW2=triton.next_power_of_2(k),
                             E_POW2=max(16, triton.next_power_of_2(E)),
                             BLOCK_T=max(1, triton.next_power_of_2(T)),
                             **count_sort_sizes(T * k), num_warps=4, **pdl.launch_args(h.device))
    return ids, weights, rows


# One "programs finished" counter per device, zero between launches (each launch's last program
# resets it): persistent, so CUDA graphs capture its address. Launches sharing it must not overlap,
# which holds for the launches of one stream (a PDL launch touches it only after its wait).
_DONE_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _done_counter(device: torch.device) -> torch.Tensor:
    counter = _DONE_COUNTERS.get(device)
    if counter is None:
        if compile_ahead.active():  # a dry pass runs nothing: a stand-in, the warm-ups make the real one
            return torch.zeros(1, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Made inside a capture, it would be zeroed only by the replays: run one step eagerly first.
            raise RuntimeError("norm_route_and_plan's counter must exist before CUDA graph capture")
        counter = _DONE_COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def norm_route_and_plan(x: torch.Tensor, delta: torch.Tensor, gain: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Plan]:
    """(x + delta, h = its RMSNorm times gain, then route_and_plan(h, weight, bias, k)): the residual
    add after attention, the MoE's norm and its router, for a rank holding every expert.

    Up to FUSED_PLAN_TOKENS tokens (decode) one launch does it all, with a program per (token,
    expert): each normalizes its token's row (a few KiB, read by E programs at once from L2) and
    takes one gate logit; the last program to finish picks every token's top k and sorts the rows.
    Unfused, that is three launches (add_rms_norm_triton, the gate GEMV, the top-k). Outputs equal
    add_rms_norm_triton's and route_and_plan's (the logits up to their summation order)."""
    (T, D), E = x.shape, weight.shape[0]
    if T == 0 or T > FUSED_PLAN_TOKENS or D > MAX_WIDTH:
        x, h = add_rms_norm_triton(x, delta, gain, eps)
        return (x, h) + _route_and_plan(h, weight, bias, k)
    assert delta.shape == x.shape and gain.shape == (D,) and weight.shape == (E, D) and bias.shape == (E,)
    assert x.stride(1) == 1 and delta.stride(1) == 1 and gain.is_contiguous() and weight.stride(1) == 1
    residual = torch.empty((T, D), dtype=x.dtype, device=x.device)
    h = torch.empty_like(residual)
    ids = torch.empty((T, k), dtype=torch.int32, device=x.device)
    weights = torch.empty((T, k), dtype=torch.float32, device=x.device)
    logits = torch.empty((T, E), dtype=torch.float32, device=x.device)  # written and read within the launch
    rows = empty_plan(T * k, E, x.device)
    block_d = triton.next_power_of_2(D)
    _norm_route_plan_kernel[(T, E)](
        x, delta, gain, weight, bias, residual, h, logits, _done_counter(x.device), ids, weights, rows.order,
        rows.position, rows.counts, rows.offsets, T, D, E, x.stride(0), delta.stride(0), residual.stride(0),
        h.stride(0), weight.stride(0), float(eps), K=k, K_POW2=triton.next_power_of_2(k),
        E_POW2=max(16, triton.next_power_of_2(E)), BLOCK_T=max(1, triton.next_power_of_2(T)), BLOCK_D=block_d,
        **count_sort_sizes(T * k),
        num_warps=min(16, max(4, block_d // 512)),  # 8 at d = 2880, as add_rms_norm_triton's rows
        **pdl.launch_args(x.device))
    return residual, h, ids, weights, rows
