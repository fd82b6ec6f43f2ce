"""Attention over a paged KV cache in Triton: a flat batch of decode and prefill sequences, one launch.

`paged_attention_triton` is the drop-in for `attention.paged_attention` (same arguments, same
result) and is checked against it in tests/test_attention.py.

Design
- GQA: a program owns one KV head and BLOCK_T consecutive query tokens of one sequence, with all
  GROUP query heads that share that KV head. Its ROWS = BLOCK_T x GROUP rows (row = token * GROUP_P
  + head) are the M of both tl.dots, so each K/V tile is read once per KV head, not once per query
  head. Prefill: 128 rows (16 tokens x 8 heads). Decode: one token's 8 heads, padded to 16 rows
  (the smallest M of a Hopper tensor-core dot); the padding costs nothing that matters, since
  decode is bound by the KV bytes.
- A flat batch with no host sync: the grid's first axis is an upper bound on the query tiles,
  N // BLOCK_T + S, where sequence s's tiles start at cu_q[s] // BLOCK_T + s (each sequence owns
  at most one spare slot). A program finds its sequence by binary search over cu_q; spare slots exit.
- Only the visible keys: a tile reads keys from its first query's oldest visible key (0, or
  t - W + 1 on sliding layers) through its last query, so only block-table entries covering that
  range are dereferenced (older pages of a sliding layer may be freed), causal tiles stop at the
  diagonal, and sliding layers cost O(W + BLOCK_T) keys per tile instead of O(context). In prefill
  tiles, key tiles that every row sees whole (below the diagonal, inside the window) skip all
  masks; only the tiles on the diagonal, at the window's edge and at the ragged end are masked.
- Online softmax in fp32 and base 2 (sm_scale * log2(e) applied in the exponent); the sink is one
  more term of the denominator, exp2(sink * log2(e) - m), added at the end. It has no value.
- The cache may be float8 e4m3 (kv_cache_dtype=fp8): K and V tiles are loaded as stored, half the
  bytes, and widened exactly before the dots, which then take fp16 operands (q rounded once a program).
- Split-K (flash-decoding): when tiles x KV heads are fewer than the SMs (decode of a few long
  sequences), every tile's key range is cut into num_splits slices, each a program writing its
  (max, sum, unnormalised accumulator) in fp32; `_merge_splits_kernel` merges the slices and adds the sink.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from runtime.kernels import pdl
from runtime.kernels.step_kernel import step_kernel
from runtime.options import options

# The interpreter computes bf16 dots wrongly (docs/environment.md); it gets fp32 operands instead,
# except over a float8 cache, whose dots take fp16 operands (right in the interpreter too), so that
# the CPU tests run the GPU's route there.
INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined
FP16_MAX = tl.constexpr(65504.0)

# Split-K sizing: aim for SPLIT_PROGRAMS_PER_SM programs per SM, so each SM has several streams of
# loads in flight, but never slice a key range thinner than MIN_KEYS_PER_SPLIT (two 128-key tiles),
# below which the per-program fixed cost (finding the sequence, loading q, writing 16 x D fp32
# partials) stops being small next to the 64 KiB of bf16 K/V the slice reads per KV head.
SPLIT_PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 128
H100_SMS = 132  # what the split heuristic assumes where there is no GPU to ask (the interpreter)
# Prefill tiles of full layers: the fastest of a sweep (a 128 x 128 fp32 score tile, 128 registers a
# thread at 4 warps); docs/performance.md, "Attention and dense GEMV constants".
PREFILL_FULL_TILE = {"block_n": 128, "num_stages": 2}


@triton.jit
def _find_sequence(cu_q_ptr, tile, num_seqs, BLOCK_T: tl.constexpr):
    """The sequence that owns tile slot `tile`: the last s with cu_q[s] // BLOCK_T + s <= tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs  # annotated: num_seqs == 1 may arrive as a constexpr
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_T + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(q, q_pos, acc, l_i, m_i, start, k_end, window, qk_scale, pages_row, k_head, v_head,
                 stride_kp, stride_ks, stride_vp, stride_vs, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE: tl.constexpr, MASKED: tl.constexpr, SLIDING: tl.constexpr, DOT_FP32: tl.constexpr):
    """Keys [start, start + BLOCK_N) into the online softmax of every row. MASKED applies k < k_end,
    causality and the window; without it the caller vouches that every key is visible to every row."""
    k_pos = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    # One block-table read per key (cached; PAGE is a power of two, so // and % are shifts).
    if MASKED:  # so entries past the visible range are never touched
        k_ok = k_pos < k_end
        page = tl.load(pages_row + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
    else:
        page = tl.load(pages_row + k_pos // PAGE).to(tl.int64)
    slot = k_pos % PAGE
    # [BLOCK_N, 1] row addresses; the columns are added at each load, which keeps the compiler from
    # holding a [BLOCK_N, HEAD_DIM] pointer tensor for V live across K's load (175 -> 252 registers
    # a thread in a decode tile, compiled for sm_90, and a 2.9% slower batch-1 step).
    k_rows = k_head + page[:, None] * stride_kp + slot[:, None] * stride_ks
    v_rows = v_head + page[:, None] * stride_vp + slot[:, None] * stride_vs
    if MASKED:
        k = tl.load(k_rows + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_rows + d[None, :], mask=k_ok[:, None],
                    other=0.0)  # zeros, not stale NaN: 0 * NaN is NaN
    else:
        k = tl.load(k_rows + d[None, :])
        v = tl.load(v_rows + d[None, :])
    # K and V are widened to q's dtype (a float8 cache: exactly; a cache of q's dtype: nothing to do).
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    if MASKED:
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    # qk_scale (sm_scale * log2 e) stays out of q: q is bf16, and scaling it there would round the
    # scores differently. It is applied to the fp32 scores inside the exponent instead, where
    # s * qk_scale - m is one FMA a score (the row max scales exactly: the scale is positive).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
    return acc, l_i, m_new


@step_kernel("num_seqs", "num_splits")
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, cu_q_ptr, q_start_ptr, sinks_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    num_seqs, num_heads, qk_scale, window, num_splits,
    stride_qn, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_on, stride_oh,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr,
    SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, PDL: tl.constexpr,
):
    # Slots in reverse: the last tiles of a causal sequence see the most keys, so they start first
    # and the short ones fill the tail of the schedule. (KV heads as the first grid axis, so that a
    # tile's heads read the same key rows side by side, was within 2.5% at batch 1,024 and 256:
    # docs/performance.md, "Offline throughput".)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    pdl.wait_for_previous_kernel(PDL)
    seq = _find_sequence(cu_q_ptr, tile, num_seqs, BLOCK_T)
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    t0 = (tile - q_begin // BLOCK_T - seq) * BLOCK_T  # this tile's first query, within the sequence
    if t0 >= q_len:  # a spare slot
        return
    n_tok = tl.minimum(q_len - t0, BLOCK_T)
    pos0 = tl.load(q_start_ptr + seq) + t0  # absolute position of the tile's first query

    r = tl.arange(0, ROWS)
    tok = r // GROUP_P
    head = kv_head * GROUP + r % GROUP_P
    row_ok = (tok < n_tok) & (r % GROUP_P < GROUP)
    q_row = (q_begin + t0 + tok).to(tl.int64)
    q_pos = pos0 + tok
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_row[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    elif k_ptr.dtype.element_ty == tl.float8e4nv:
        # A float8 cache: the dots in fp16, where one packed conversion widens two e4m3 values exactly
        # (bf16 would take one more scalar conversion a value, as many as the tile's exponentials: see
        # docs/performance.md, "A float8 KV cache"). q rounds to fp16 exactly within its range (bf16's
        # 8 significant bits fit fp16's 11), clamped at its largest value; p in fp16 is finer than bf16.
        q = tl.minimum(tl.maximum(q.to(tl.float32), -FP16_MAX), FP16_MAX).to(tl.float16)

    # Keys [lo, hi) are visible to some query of the tile; this split takes whole BLOCK_N tiles of it.
    hi = pos0 + n_tok
    if SLIDING:
        lo = tl.maximum(pos0 - window + 1, 0)
    else:
        lo = pos0 * 0
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits) * BLOCK_N
    k_begin = lo + split * per_split
    k_end = tl.minimum(hi, k_begin + per_split)

    # A finite floor, not -inf: a row can see no key of a tile (padding, or a window edge), and
    # -inf - -inf would be NaN in the rescale.
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    pages_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    # Decode tiles (one query) keep the single masked loop: their masks cost little next to the K/V
    # bytes, and a split's few key tiles keep one software pipeline.
    if BLOCK_T == 1:
        b = k_begin
    else:
        # Tiles in [a, b) are visible to every row of the tile: their keys are at most the first query's
        # position, inside this split, and (sliding) within the last query's window. They skip every
        # mask (padding rows, q = 0, see them too: finite, never stored); the masked loops take the
        # tiles before a (the sliding window's edge) and from b on (the diagonal and the ragged end).
        # All three step over the same BLOCK_N grid from k_begin, so a split still covers whole tiles
        # of [lo, hi). Operands are clamped before // (it truncates).
        if SLIDING:
            a = tl.minimum(k_begin + tl.cdiv(tl.maximum(hi - window - k_begin, 0), BLOCK_N) * BLOCK_N, k_end)
        else:
            a = k_begin
        b = a + tl.maximum(tl.minimum(k_end, pos0 + 1) - a, 0) // BLOCK_N * BLOCK_N
        if SLIDING:
            for start in range(k_begin, a, BLOCK_N):
                acc, l_i, m_i = _attend_tile(
                    q, q_pos, acc, l_i, m_i, start, k_end, window, qk_scale, pages_row, k_head, v_head,
                    stride_kp, stride_ks, stride_vp, stride_vs, BLOCK_N, HEAD_DIM, PAGE, True, SLIDING,
                    DOT_FP32)
        for start in range(a, b, BLOCK_N):  # plain, so Triton's pipeliner prefetches the next tiles
            acc, l_i, m_i = _attend_tile(
                q, q_pos, acc, l_i, m_i, start, k_end, window, qk_scale, pages_row, k_head, v_head,
                stride_kp, stride_ks, stride_vp, stride_vs, BLOCK_N, HEAD_DIM, PAGE, False, SLIDING, DOT_FP32)
    for start in range(b, k_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            q, q_pos, acc, l_i, m_i, start, k_end, window, qk_scale, pages_row, k_head, v_head,
            stride_kp, stride_ks, stride_vp, stride_vs, BLOCK_N, HEAD_DIM, PAGE, True, SLIDING, DOT_FP32)

    if not SPLIT:
        sink = tl.load(sinks_ptr + head, mask=row_ok,
                       other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
        m_all = tl.maximum(m_i, sink)
        keep = tl.exp2(m_i - m_all)
        denom = l_i * keep + tl.exp2(sink - m_all)
        o = acc * (keep / denom)[:, None]
        tl.store(out_ptr + q_row[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Partials [N, H, num_splits] (m, l) and [N, H, num_splits, D] (acc). An empty slice still
        # writes (floor, 0, 0), so the combine reads every slot.
        part = (q_row * num_heads + head) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])


@step_kernel("num_splits")
def _merge_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, sinks_ptr, out_ptr, num_heads, num_splits,
                    stride_on, stride_oh, SPLITS_P: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    """One (query row, head): merge the split partials and add the sink to the denominator."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P)
    sp_ok = sp < num_splits
    part = (row * num_heads + head) * num_splits + sp
    d = tl.arange(0, HEAD_DIM)
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634  # log2(e); a weight: before the wait
    pdl.wait_for_previous_kernel(PDL)
    m = tl.load(part_m_ptr + part, mask=sp_ok, other=-1.0e30)
    l = tl.load(part_l_ptr + part, mask=sp_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None], other=0.0)
    m_all = tl.maximum(tl.max(m, 0), sink)
    w = tl.exp2(m - m_all)
    denom = tl.sum(l * w, 0) + tl.exp2(sink - m_all)
    o = tl.sum(acc * w[:, None], 0) / denom
    tl.store(out_ptr + row * stride_on + head * stride_oh + d, o.to(out_ptr.dtype.element_ty))


def choose_num_splits(programs: int, keys: int, sms: int) -> int:
    """Key-range slices per tile: none once the unsplit programs cover every SM, else enough for
    SPLIT_PROGRAMS_PER_SM per SM, each slice keeping at least MIN_KEYS_PER_SPLIT keys."""
    if programs >= sms:
        return 1
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else H100_SMS


def paged_attention_triton(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, cu_q: torch.Tensor, q_start: torch.Tensor,
                           sinks: torch.Tensor, *, sm_scale: float, window: int | None,
                           out: torch.Tensor | None = None, max_q_len: int | None = None,
                           max_k_len: int | None = None, num_splits: int | None = None, block_m: int = 128,
                           block_n: int | None = None, num_warps: int = 4,
                           num_stages: int | None = None, decodes: int = 0) -> torch.Tensor:
    """`attention.paged_attention` in Triton: q [N, H, D] over the paged cache, returns [N, H, D].

    max_q_len (longest query run in the step) and max_k_len (largest q_start[s] + n_s) pick the tile
    shape and the split count; a caller that knows them on the host passes them to spare a device
    sync. They only steer performance: any positive values give the same result. num_splits forces
    the split count (1 = never split). block_m: rows per program for prefill
    (tokens x group heads); block_n: keys per tile and num_stages: the pipeline's depth (defaults:
    128 keys and 3 stages for decode-shaped tiles of 16 rows; for 128-row prefill tiles 128 keys and
    2 stages on full layers, 64 keys and 3 stages on sliding ones, see PREFILL_FULL_TILE).

    decodes: the first `decodes` sequences have one query each (the scheduler plans decodes first).
    Beside prompt chunks they get a launch of their own with decode-shaped tiles (one query's GROUP
    heads), where one launch would give each a prefill tile of BLOCK_T queries, nearly all padding,
    and so about BLOCK_T times the tensor-core work its keys need.
    """
    n_rows, num_heads, head_dim = q.shape
    _, page_size, num_kv, _ = k_pages.shape
    group = num_heads // num_kv
    assert num_heads == group * num_kv and head_dim == triton.next_power_of_2(head_dim), \
        (q.shape, k_pages.shape)
    assert q.stride(2) == 1 and k_pages.stride(3) == 1 and v_pages.stride(3) == 1 \
        and block_table.stride(1) == 1
    assert block_table.dtype == cu_q.dtype == q_start.dtype == torch.int32
    assert cu_q.is_contiguous() and q_start.is_contiguous() and sinks.is_contiguous()
    if out is None:
        out = torch.empty_like(q)
    num_seqs = q_start.numel()
    if n_rows == 0:
        return out
    if max_q_len is None:  # one host sync each; model.py knows both from its step plan
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max())
    if max_k_len is None:
        max_k_len = int((q_start + cu_q[1:] - cu_q[:-1]).max())

    if 0 < decodes < num_seqs and max_q_len > 1:  # a mixed step: decodes, then the prompt chunks
        settings = dict(sm_scale=sm_scale, window=window, max_k_len=max_k_len, num_splits=num_splits,
                        block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        paged_attention_triton(q[:decodes], k_pages, v_pages, block_table[:decodes], cu_q[:decodes + 1],
                               q_start[:decodes], sinks, out=out[:decodes], max_q_len=1, **settings)
        paged_attention_triton(q[decodes:], k_pages, v_pages, block_table[decodes:], cu_q[decodes:] - decodes,
                               q_start[decodes:], sinks, out=out[decodes:], max_q_len=max_q_len, **settings)
        return out

    group_p = triton.next_power_of_2(group)
    block_t = min(triton.next_power_of_2(max_q_len), max(1, block_m // group_p))
    rows = max(16, block_t * group_p)  # tl.dot needs M >= 16 on the GPU
    if block_n is None:
        block_n = 128 if rows < 128 else PREFILL_FULL_TILE["block_n"] if window is None else 64
    if num_stages is None:
        num_stages = PREFILL_FULL_TILE["num_stages"] if rows >= 128 and window is None else 3
    slots = n_rows // block_t + num_seqs
    if num_splits is None:
        programs = min(slots, num_seqs * triton.cdiv(max_q_len, block_t)) * num_kv
        keys = max_k_len if window is None else min(max_k_len, window + block_t - 1)
        num_splits = choose_num_splits(programs, keys, _sm_count(q.device))

    if num_splits > 1:
        part_m = torch.empty((n_rows, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((n_rows, num_heads, num_splits, head_dim), dtype=torch.float32,
                               device=q.device)
    else:
        part_m = part_l = part_acc = out  # never touched: SPLIT=False compiles the direct epilogue
    _paged_attention_kernel[(slots, num_kv, num_splits)](
        q, k_pages, v_pages, block_table, cu_q, q_start, sinks, out, part_m, part_l, part_acc,
        num_seqs, num_heads, sm_scale * 1.4426950408889634, window or 0, num_splits,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_P=group_p, BLOCK_T=block_t, ROWS=rows, BLOCK_N=block_n, HEAD_DIM=head_dim,
        PAGE=page_size, SLIDING=window is not None, SPLIT=num_splits > 1,
        DOT_FP32=q.dtype == torch.float32 or (INTERPRET and k_pages.dtype != torch.float8_e4m3fn),
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_args(q.device),
    )
    if num_splits > 1:
        _merge_splits_kernel[(n_rows, num_heads)](
            part_m, part_l, part_acc, sinks, out, num_heads, num_splits, out.stride(0), out.stride(1),
            SPLITS_P=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            num_warps=4, **pdl.launch_args(q.device),
        )
    return out
