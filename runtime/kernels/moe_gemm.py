"""The experts in Triton: grouped MXFP4 GEMMs with the weights decoded in registers.

Layout of the work. The (token, expert) pairs are sorted by expert on the GPU (`plan`: one sort, one
histogram, one cumsum, no host sync). Each program of the GEMM owns one tile of up to BLOCK_T rows of
one expert and BLOCK_N of that expert's output features; it finds its tile from the per-expert counts
itself, so the grid has a fixed upper bound and nothing is planned on the host.

Operands are swapped: the program computes out^T = W x^T, with the decoded weight tile [BLOCK_N,
BLOCK_K] as the MMA's left operand and the few token rows as the right one. Weights are the big
operand at decode (1 to 64 tokens per expert), and as the left operand they stay in registers from
decode to MMA; the token dimension only needs to be a multiple of 8.

Decode. On the GPU, an inline-PTX routine turns 4 packed bytes (8 E2M1 values) and their scale
bytes into 8 bfloat16 values with byte permutes, shifts and masks that drop each value's sign and
exponent/mantissa bits into a bf16's sign and lowest exponent/highest mantissa bits (which is the
value times 2^-126, exactly, subnormal for the smallest codes), then two packed bf16 multiplies: by
2^126 and by the block's scale 2^(s-127) (bf16 bits s << 7). Low and high nibbles become two tiles
that meet the even and odd input columns in two half-depth dots, so nothing is interleaved. The
interpreter (CPU tests) cannot run PTX: it uses an integer-only decode of the same values.

Epilogues: mlp1 adds the bias and applies the clamped SwiGLU over interleaved (gate, linear) rows,
writing only the activation; mlp2 adds the bias and writes fp32 rows in sorted order, and
`combine` sums each token's four rows with their routing weights onto the residual, in a fixed order
(deterministic: no atomics).

`moe_triton` is the single-rank MoE (gather, both GEMMs, weighted combine + residual); `expert_rows_triton`
is the drop-in for `moe.expert_rows` used with expert parallelism. Both are checked against the
references in tests/test_moe_gemm.py (CPU, interpreter) and tests/test_gpu.py (real shapes).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from runtime.kernels.moe import SWIGLU_ALPHA

# The interpreter computes bf16 dots wrongly and runs no PTX (environment.md): fp32 operands and the
# integer decode there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

def _decode_ptx(fold: bool) -> str:
    """PTX turning 4 packed bytes b0..b3 ($4) and their scale ($5; the 4 bytes lie in one 16-byte
    block, so they share a scale and only its byte 0 is read) into 8 bf16 values.

    Nibble i of the word (bits 4i..4i+3) and nibble i + 4 share their shifts into the two 16-bit
    halves of a bf16x2: exponent/mantissa bits to 6-8, sign to 15, giving the value times 2^-126. So
    each output register pairs byte j with byte j + 2: $0 = low nibbles of (b0, b2), $1 = (b1, b3),
    $2 = high nibbles of (b0, b2), $3 = (b1, b3). The output tiles therefore list bytes in the order
    0, 2, 1, 3 within every 4, and the kernel reads x in that order too (`_split_x`)."""
    lines = ["{", ".reg .b32 s, a, b, big;", "mov.b32 big, 0x7E807E80;",  # 2^126 in both halves
             "prmt.b32 s, $5, 0, 0x4040;"]  # scale byte 0 into both halves
    if fold:  # 2^126 * 2^(s-127) = 2^(s-1): bf16 exponent field s + 126 (needs s <= 128)
        lines.append("add.u32 s, s, 0x007E007E;")
    lines.append("shl.b32 s, s, 7;")
    # (output, payload shift, sign shift): a negative shift is to the right
    for out, payload, sign in ((0, 6, 12), (1, -2, 4), (2, 2, 8), (3, -6, 0)):
        lines.append(f"shl.b32 a, $4, {payload};" if payload >= 0 else f"shr.u32 a, $4, {-payload};")
        lines.append("and.b32 a, a, 0x01C001C0;")
        lines.append(f"shl.b32 b, $4, {sign};" if sign else "mov.b32 b, $4;")
        lines += ["and.b32 b, b, 0x80008000;", "or.b32 a, a, b;"]
        if not fold:
            lines.append("mul.rn.bf16x2 a, a, big;")
        lines.append(f"mul.rn.bf16x2 ${out}, a, s;")
    return "\n".join(lines + ["}"])


_DECODE_PTX = tl.constexpr(_decode_ptx(fold=False))
_DECODE_PTX_FOLDED = tl.constexpr(_decode_ptx(fold=True))


@triton.jit
def _split_x(x, BLOCK_T: tl.constexpr, BYTES: tl.constexpr, PTX: tl.constexpr):
    """x [BLOCK_T, 2 * BYTES] -> the columns meeting the low nibbles and those meeting the high ones,
    in the decoded tiles' byte order: 0, 2, 1, 3 within every 4 bytes for the PTX decode."""
    if PTX:  # element 8g + 4a + 2b + e (byte 4g + 2a + b, nibble e) moves to 8g + 4b + 2a + e
        x = tl.reshape(tl.permute(tl.reshape(x, (BLOCK_T, BYTES // 4, 2, 2, 2)), (0, 1, 3, 2, 4)), (BLOCK_T, 2 * BYTES))
    return tl.split(tl.reshape(x, (BLOCK_T, BYTES, 2)))


@triton.jit
def _e2m1_scaled_bf16(code, scale):
    """Integer-only decode (the interpreter's path): E2M1 nibble times 2^(scale - 127) as bf16 bits.

    For exponent bits e > 0 the value is (1 + m/2) * 2^(e-1): bf16 exponent field scale - 1 + e,
    mantissa top bit m; for e == 0 it is m * 2^-1 (or zero). Exact for scales 1..252.
    """
    e = (code >> 1) & 3
    m = code & 1
    magnitude = ((scale - 1 + e) << 7) | tl.where(e > 0, m << 6, 0)
    magnitude = tl.where((e == 0) & (m == 0), 0, magnitude)
    bits = (((code >> 3) & 1) << 15) | magnitude
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode(packed, scale, PTX: tl.constexpr, FOLD: tl.constexpr):
    """uint8 tiles of packed bytes and their scale bytes -> (low-nibble values, high-nibble values) in bf16."""
    if PTX:
        lo, hi = tl.inline_asm_elementwise(_DECODE_PTX_FOLDED if FOLD else _DECODE_PTX, "=r,=r,=r,=r,r,r",
                                           [packed, scale], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        code, s = packed.to(tl.int32), scale.to(tl.int32)
        lo = _e2m1_scaled_bf16(code & 15, s)
        hi = _e2m1_scaled_bf16(code >> 4, s)
    return lo, hi


@triton.jit
def _find_tile(counts_ptr, offsets_ptr, tile, E, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row, end row) of this program's tile, or expert == E where there is none.

    Expert e's rows [offset_e, offset_e + count_e) form cdiv(count_e, BLOCK_T) tiles, numbered
    expert after expert."""
    ex = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles = (counts + BLOCK_T - 1) // BLOCK_T
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= tile).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(ex < expert, tiles, 0), 0)
    count = tl.sum(tl.where(ex == expert, counts, 0), 0)
    offset = tl.load(offsets_ptr + tl.minimum(expert, E - 1))
    row0 = offset + (tile - first_tile) * BLOCK_T
    return expert, row0, offset + count


@triton.jit
def _moe_gemm_kernel(
    x_ptr, source_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, counts_ptr, offsets_ptr,
    E, N, K_BYTES, stride_x, stride_out, stride_be, stride_bn, stride_se, stride_sn, stride_biase, limit,
    GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr, DOT_FP32: tl.constexpr, PTX: tl.constexpr, FOLD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    """out[r] = W_e x[source[r] // SOURCE_DIV] + b_e for the rows r of one tile (then SwiGLU)."""
    expert, row0, row_end = _find_tile(counts_ptr, offsets_ptr, tl.program_id(0), E, BLOCK_T, E_POW2)
    if expert >= E:
        return
    pid_n = tl.program_id(1)
    expert = expert.to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < row_end
    if GATHER:
        source = tl.load(source_ptr + rows, mask=row_ok, other=0) // SOURCE_DIV
    else:  # rows already in sorted order
        source = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    BYTES: tl.constexpr = BLOCK_K // 2  # packed byte j holds elements 2j (low nibble) and 2j+1 (high)
    kb = tl.arange(0, BYTES)
    kx = tl.arange(0, BLOCK_K)
    w_ptrs = blocks_ptr + expert * stride_be + cols[:, None] * stride_bn + kb[None, :]
    GROUPS: tl.constexpr = BYTES // 16  # one scale byte per 16 packed bytes
    kg = tl.arange(0, GROUPS)
    s_ptrs = scales_ptr + expert * stride_se + cols[:, None] * stride_sn + kg[None, :]
    x_ptrs = x_ptr + source[:, None].to(tl.int64) * stride_x + kx[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    # Triton's pipeliner streams the packed bytes and x through shared memory, but not the scales
    # (they reach the MMA only through the decode): load them one iteration ahead by hand, so their
    # latency hides behind a whole iteration instead of stalling each one.
    next_scale = tl.load(s_ptrs, mask=col_ok[:, None] & (kg < K_BYTES // 16)[None, :], other=127)
    for k0 in range(0, K_BYTES, BYTES):
        # K (2880 in gpt-oss) need not be a multiple of BLOCK_K; it is one of 32 (16 bytes), which
        # keeps the masks constant over 16-byte vectors.
        w_mask = col_ok[:, None] & ((k0 + kb) < K_BYTES)[None, :]
        packed = tl.load(w_ptrs + k0, mask=w_mask, other=0)
        scale = next_scale
        next_group = (k0 + BYTES) // 16 + kg
        next_scale = tl.load(s_ptrs + (k0 + BYTES) // 16, mask=col_ok[:, None] & (next_group < K_BYTES // 16)[None, :],
                             other=127)
        scale = tl.reshape(tl.broadcast_to(tl.reshape(scale, (BLOCK_N, GROUPS, 1)), (BLOCK_N, GROUPS, 16)),
                           (BLOCK_N, BYTES))
        lo, hi = _decode(packed, scale, PTX, FOLD)
        x = tl.load(x_ptrs + 2 * k0, mask=row_ok[:, None] & ((2 * k0 + kx) < 2 * K_BYTES)[None, :], other=0.0)
        x_even, x_odd = _split_x(x, BLOCK_T, BYTES, PTX)
        if DOT_FP32:
            acc = tl.dot(lo.to(tl.float32), tl.trans(x_even.to(tl.float32)), acc, input_precision="ieee")
            acc = tl.dot(hi.to(tl.float32), tl.trans(x_odd.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(lo, tl.trans(x_even.to(tl.bfloat16)), acc)
            acc = tl.dot(hi, tl.trans(x_odd.to(tl.bfloat16)), acc)
    acc += tl.load(bias_ptr + expert * stride_biase + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if SWIGLU:  # rows of W alternate gate, linear
        gate, linear = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N // 2, 2, BLOCK_T)), (0, 2, 1)))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        act = gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + out_cols[:, None],
                 act.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & (out_cols < N // 2)[:, None])
    else:
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + cols[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[None, :] & col_ok[:, None])


@triton.jit
def _plan_kernel(experts_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, M, E,
                 M_POW2: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """Counting sort of up to a few hundred rows by expert in one program (the decode-sized plan).

    Row i goes to offsets[e_i] + (number of earlier rows with the same expert): stable."""
    i = tl.arange(0, M_POW2)
    e = tl.load(experts_ptr + i, mask=i < M, other=E_POW2)  # padding matches no expert
    ex = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    rank = tl.zeros((M_POW2,), dtype=tl.int32)
    for j0 in tl.static_range(0, M_POW2, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        ej = tl.load(experts_ptr + j, mask=j < M, other=E_POW2)
        counts += tl.sum((ej[None, :] == ex[:, None]).to(tl.int32), 1)
        rank += tl.sum(((ej[None, :] == e[:, None]) & (j[None, :] < i[:, None])).to(tl.int32), 1)
    offsets = tl.cumsum(counts, 0) - counts
    position = tl.sum(tl.where(e[:, None] == ex[None, :], offsets[None, :], 0), 1) + rank
    tl.store(position_ptr + i, position, mask=i < M)
    tl.store(order_ptr + position, i, mask=i < M)
    tl.store(counts_ptr + ex, counts, mask=ex < E)
    tl.store(offsets_ptr + ex, offsets, mask=ex < E)


@triton.jit
def _combine_kernel(y_ptr, position_ptr, weight_ptr, residual_ptr, out_ptr, D, stride_y, stride_res, stride_out,
                    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = residual[t] + sum_k weight[t, k] * y[position[t, k]], summed in k order (fp32)."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pos = tl.load(position_ptr + t * TOP_K + k).to(tl.int64)
        w = tl.load(weight_ptr + t * TOP_K + k)
        acc += w * tl.load(y_ptr + pos * stride_y + d, mask=ok, other=0.0)
    if residual_ptr is not None:
        acc += tl.load(residual_ptr + t * stride_res + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + d, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------- host side
@dataclasses.dataclass
class Plan:
    """Rows sorted by expert, computed on the GPU without a host sync."""
    order: torch.Tensor  # [m] int32: sorted position i holds input row order[i]
    position: torch.Tensor  # [m] int32: the inverse, input row r sits at sorted position position[r]
    counts: torch.Tensor  # [E] int32 rows per expert
    offsets: torch.Tensor  # [E] int32 first sorted row of each expert
    num_rows: int
    num_experts: int

    def max_tiles(self, block_t: int) -> int:
        """Upper bound on the tiles: each non-empty expert wastes at most one partial tile."""
        return triton.cdiv(self.num_rows, block_t) + min(self.num_experts, self.num_rows)


PLAN_KERNEL_ROWS = 512  # up to here one program sorts (decode); beyond, torch.sort (prefill)


def plan(experts: torch.Tensor, num_experts: int) -> Plan:
    """Sort rows by expert (stable) and count them; `experts` [m] holds each row's expert index."""
    flat = experts.reshape(-1).to(torch.int32)
    m, dev = flat.numel(), flat.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    offsets = torch.empty_like(counts)
    if 0 < m <= PLAN_KERNEL_ROWS:  # one launch instead of a dozen small torch ops
        order, position = torch.empty_like(flat), torch.empty_like(flat)
        m_pow2 = max(16, triton.next_power_of_2(m))
        _plan_kernel[(1,)](flat, order, position, counts, offsets, m, num_experts, M_POW2=m_pow2,
                           E_POW2=triton.next_power_of_2(num_experts), CHUNK=max(16, 8192 // m_pow2), num_warps=8)
        return Plan(order, position, counts, offsets, m, num_experts)
    _, order = torch.sort(flat, stable=True)
    counts.zero_().scatter_add_(0, flat.long(), torch.ones_like(flat))
    torch.sub(torch.cumsum(counts, 0, dtype=torch.int32), counts, out=offsets)
    position = torch.empty_like(flat)
    position[order] = torch.arange(m, dtype=torch.int32, device=dev)
    return Plan(order.to(torch.int32), position, counts, offsets, m, num_experts)


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_t: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def choose_tiles(rows: int, num_experts: int, swiglu: bool) -> Tiles:
    """Tile shapes by rows per expert (the fastest in scripts/bench_moe.py --sweep on an H100):
    decode is bound by streaming the weight bytes, prefill by the MMAs."""
    per_expert = rows / max(1, min(rows, num_experts))
    if per_expert <= 2:
        return Tiles(8, 64, 256, 4, 4)
    if per_expert <= 16:
        return Tiles(16, 64, 128, 4, 4) if swiglu else Tiles(16, 128, 128, 4, 4)
    if per_expert <= 128:
        return Tiles(64, 128, 64, 4, 3)
    return Tiles(128, 128, 64, 8, 3)


def scales_fold(scales: torch.Tensor) -> bool:
    """Whether every scale byte is <= 128, so the decode needs one multiply per pair, not two.

    Checked once per tensor contents (a host sync) and remembered on the tensor with its version
    counter, which any in-place write (such as loading a checkpoint into it) bumps."""
    cached = getattr(scales, "_gpt_oss_fold", None)
    if cached is None or cached[0] != scales._version:
        cached = (scales._version, bool(scales.max() <= 128) if scales.numel() else True)
        scales._gpt_oss_fold = cached
    return cached[1]


def grouped_mxfp4(x: torch.Tensor, source: torch.Tensor | None, source_div: int, p: Plan, blocks: torch.Tensor,
                  scales: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype, swiglu_limit: float | None = None,
                  tiles: Tiles | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = W_e x[source[i] // source_div] + b_e for sorted rows i of expert e (then SwiGLU);
    source None reads x[i] (x already sorted)."""
    E, N, groups, group_bytes = blocks.shape
    assert x.shape[1] == groups * 32 and group_bytes == 16, (x.shape, blocks.shape)
    tiles = tiles or choose_tiles(p.num_rows, E, swiglu_limit is not None)
    if out is None:
        out = torch.empty((p.num_rows, N // 2 if swiglu_limit is not None else N), dtype=out_dtype, device=x.device)
    if p.num_rows == 0:
        return out
    grid = (p.max_tiles(tiles.block_t), triton.cdiv(N, tiles.block_n))
    _moe_gemm_kernel[grid](
        x, source, blocks, scales, bias, out, p.counts, p.offsets,
        E, N, groups * group_bytes, x.stride(0), out.stride(0),
        blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), bias.stride(0),
        float(swiglu_limit or 0.0),
        GATHER=source is not None, SOURCE_DIV=source_div, SWIGLU=swiglu_limit is not None, DOT_FP32=INTERPRET or x.dtype == torch.float32,
        PTX=not INTERPRET, FOLD=scales_fold(scales), BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        E_POW2=triton.next_power_of_2(E), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def combine(y: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    """[T, D]: residual + sum_k weights[t, k] * y[position[t, k]] (fp32 sums, one rounding)."""
    T, top_k = weights.shape
    D = y.shape[1]
    out = torch.empty((T, D), dtype=out_dtype, device=y.device)
    if T == 0:
        return out
    block_d = 1024
    _combine_kernel[(T, triton.cdiv(D, block_d))](
        y, position, weights.float().contiguous(), residual, out, D, y.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), TOP_K=top_k, BLOCK_D=block_d)
    return out


def moe_triton(h: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, mlp1_blocks, mlp1_scales,
               mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit: float,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE on one rank holding every expert: [T, d] = residual + sum_k w_k * expert_k(h).

    h [T, d]; expert_ids, weights [T, k]. Rows are never copied out of h: the first GEMM gathers
    token order[i] // k for sorted pair i."""
    T, top_k = expert_ids.shape
    p = plan(expert_ids, mlp1_blocks.shape[0])
    act = grouped_mxfp4(h, p.order, top_k, p, mlp1_blocks, mlp1_scales, mlp1_bias, h.dtype, swiglu_limit=limit)
    y = grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, mlp2_bias, torch.float32)
    return combine(y, p.position, weights, residual, h.dtype if residual is None else residual.dtype)


def expert_rows_triton(x, experts, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                       limit: float, reduce=None) -> torch.Tensor:
    """The Triton version of moe.expert_rows: rows through their experts, [m, d] fp32, bias included."""
    p = plan(experts, mlp1_blocks.shape[0])
    act = grouped_mxfp4(x, p.order, 1, p, mlp1_blocks, mlp1_scales, mlp1_bias, x.dtype, swiglu_limit=limit)
    if reduce is None:
        y = grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, mlp2_bias, torch.float32)
    else:  # split experts: sum the partial products across ranks first, then add the bias once
        y = reduce(grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, torch.zeros_like(mlp2_bias),
                                 torch.float32))
        y += mlp2_bias[experts.long()[p.order.long()]].float()
    return y[p.position.long()]


assert SWIGLU_ALPHA == 1.702  # the kernel hard-codes the same constant
