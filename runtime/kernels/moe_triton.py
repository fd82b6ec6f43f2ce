"""The experts in Triton: grouped MXFP4 GEMMs with the weights decoded in registers (the host API).

Layout of the work. The (token, expert) pairs are sorted by expert on the GPU (`plan`: one sort, one
histogram, one cumsum, no host sync). Each program of a grouped kernel owns one tile of rows of one
expert and a tile of that expert's output features; it finds its tile from the per-expert counts
itself, so the grid depends only on (rows, N, E) and nothing is planned on the host.

Two kernels, picked by rows per expert (`choose_tiles`, a table in moe_triton_details/tiles.py):
- "gemv" (moe_triton_details/gemv.py): decode-sized batches, up to 16 rows of an expert a tile, no
  shared memory; on CUDA cores, or with bf16 x on tensor cores (mma.sync: one row a tile, or 8 tokens
  a tile as the MMA's columns; moe_triton_details/gemv_tensor_core.py);
- "gemm" (moe_triton_details/gemm.py): the wgmma GEMM, with the decoded weights as its register
  operand.
The MXFP4 decodes are inline PTX (moe_triton_details/ptx.py); the interpreter (CPU tests) runs an
integer-only decode of the same values instead.

Epilogues: mlp1 adds the bias and applies the clamped SwiGLU over interleaved (gate, linear) rows,
writing only the activation; mlp2 adds the bias and writes fp32 rows in sorted order, and `combine`
sums each token's rows with their routing weights onto the residual, in a fixed order (deterministic:
no atomics), and can normalize the result for the next block (one launch fewer).

`moe_triton` is the single-rank MoE (gather, both GEMMs, weighted combine + residual);
`expert_rows_triton` is the drop-in for `moe.expert_rows` used with expert parallelism. Both are
checked against the references in tests/test_moe.py (CPU, interpreter) and its GPU tests (real shapes).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import triton

from runtime.kernels import compile_ahead, pdl
from runtime.kernels.moe_triton_details.combine import _combine_kernel
from runtime.kernels.moe_triton_details.gemm import _moe_gemm_kernel
from runtime.kernels.moe_triton_details.gemv import DECODE_INT, DECODE_ROUTES, _moe_gemv_kernel
from runtime.kernels.moe_triton_details.routing import (  # noqa: F401  (public here)
    PLAN_KERNEL_ROWS,
    Plan,
    count_sort,
    count_sort_sizes,
    empty_plan,
    plan,
)
from runtime.kernels.moe_triton_details.tiles import (  # noqa: F401  (public here)
    CUDA_CORE_DECODE,
    INTERPRET,
    PROBE_REFERENCE_TILES,
    TENSOR_CORE_DECODES,
    Tiles,
    choose_tiles,
    gemm_tiles,
    gemv_tiles_ok,
)

# bytes of pipelined tiles per program (Hopper has 227 KB; the epilogue needs some)
SHARED_MEMORY_BUDGET = 160 * 1024


def _checked_once(scales: torch.Tensor, name: str, check) -> bool:
    """check(scales) (a host sync), computed once per tensor contents and remembered on the tensor
    with its version counter, which any in-place write (such as loading a checkpoint into it) bumps."""
    version = -1 if scales.is_inference() else scales._version  # inference tensors keep no counter
    cached = getattr(scales, name, None)
    if cached is None or cached[0] != version:
        cached = (version, bool(check(scales)) if scales.numel() else True)
        setattr(scales, name, cached)
    return cached[1]


def scales_fold(scales: torch.Tensor) -> bool:
    """Whether every scale byte is <= 128, so the decode needs one multiply per pair, not two."""
    return _checked_once(scales, "_gpt_oss_fold", lambda s: s.max() <= 128)


def tensor_core_gemv_fits(x: torch.Tensor, scales: torch.Tensor, tiles: Tiles) -> bool:
    """Whether the tensor-core GEMV (either route) takes this call: bf16 x with 16-byte aligned rows on
    a Hopper GPU, every scale byte in 66..192 (exact in its bf16 operands, see
    ptx.TENSOR_CORE_SCALE_OFFSET), and the route verified on this GPU with these tiles
    (`tensor_core_gemv_verified`)."""
    if INTERPRET or not x.is_cuda or x.dtype != torch.bfloat16 or not gemv_tiles_ok(tiles):
        return False
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if not _checked_once(scales, "_gpt_oss_tensor_core_range", lambda s: (s.min() >= 66) & (s.max() <= 192)):
        return False
    return tensor_core_gemv_verified(x.device, tiles)


_TENSOR_CORE_VERIFIED: dict[tuple, bool] = {}


def tensor_core_gemv_verified(device: torch.device, tiles: Tiles) -> bool:
    """Whether the tensor-core GEMV gives the CUDA-core route's results (to fp32 rounding) on a probe,
    checked once per GPU and tiles: its diagonal trick needs the compiler to put four consecutive
    lanes on one weight row (see moe_triton_details/gemv_tensor_core.py), the multi-row route also the
    rows' order over the lanes, which a Triton version could lay out otherwise. Not during a CUDA graph
    capture (the check syncs): there an unchecked route is not taken, except in compile_ahead's dry
    pass, which runs nothing and compiles the route the check almost always allows."""
    key = (device.index, tiles)
    if key not in _TENSOR_CORE_VERIFIED:
        if compile_ahead.active():
            return True
        if torch.cuda.is_current_stream_capturing():
            return False
        _TENSOR_CORE_VERIFIED[key] = True  # the probe's own calls take the route
        gen = torch.Generator(device=device).manual_seed(0)
        E, N, K = 2, 2 * tiles.block_n, 2 * tiles.block_k + 64  # two tiles, two full chunks and a partial one
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device, generator=gen)
        scales = torch.randint(116, 125, (E, N, K // 32), dtype=torch.uint8, device=device, generator=gen)
        bias = torch.randn(E, N, device=device, generator=gen).to(torch.bfloat16)
        # expert 1 spans two tiles, the second partial; expert 0 has one partial tile
        experts = [1] * (tiles.block_t + 3) + [0] * 3
        x = torch.randn(len(experts), K, device=device, generator=gen).to(torch.bfloat16)
        p = plan(torch.tensor(experts, device=device), E)
        got = grouped_mxfp4(x, None, 1, p, blocks, scales, bias, torch.float32, tiles=tiles)
        ref = grouped_mxfp4(x, None, 1, p, blocks, scales, bias, torch.float32, tiles=PROBE_REFERENCE_TILES)
        ok = bool(((got - ref).norm() <= 1e-5 * ref.norm()).item())
        if not ok:
            warnings.warn(f"the MoE's tensor-core GEMV disagrees with the CUDA-core one on {device} with "
                          f"{tiles}: using the CUDA-core route")
        _TENSOR_CORE_VERIFIED[key] = ok
    return _TENSOR_CORE_VERIFIED[key]


def grouped_mxfp4(x: torch.Tensor, source: torch.Tensor | None, source_div: int, p: Plan,
                  blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype,
                  swiglu_limit: float | None = None, tiles: Tiles | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = W_e x[source[i] // source_div] + b_e for sorted rows i of expert e (then SwiGLU);
    source None reads x[i] (x already sorted); bias None adds none. `blocks` in kernel order
    (mxfp4.quad_transpose), as the model keeps them."""
    E, N, groups, group_bytes = blocks.shape
    assert x.shape[1] == groups * 32 and group_bytes == 16, (x.shape, blocks.shape)
    tiles = tiles or choose_tiles(p.num_rows, E, swiglu_limit is not None)
    if out is None:
        width = N // 2 if swiglu_limit is not None else N
        out = torch.empty((p.num_rows, width), dtype=out_dtype, device=x.device)
    if p.num_rows == 0:
        return out
    tensor_core = tiles.kernel == "gemv" and tiles.decode in TENSOR_CORE_DECODES
    if tensor_core and not tensor_core_gemv_fits(x, scales, tiles):
        swiglu = swiglu_limit is not None  # the CUDA-core GEMV takes up to 4 rows a tile, the GEMM any
        tiles = dataclasses.replace(tiles, decode=CUDA_CORE_DECODE[swiglu]) if tiles.block_t == 1 \
            else gemm_tiles(p.num_rows, E, swiglu)
    row_tiles, feature_tiles = p.max_tiles(tiles.block_t), triton.cdiv(N, tiles.block_n)
    if tiles.kernel == "gemv":  # weights contiguous within an expert, each 32-value block 16-byte aligned
        assert gemv_tiles_ok(tiles), tiles
        assert blocks.stride()[1:] == (groups * 16, 16, 1) and blocks.stride(0) % 16 == 0 \
            and blocks.data_ptr() % 16 == 0 and scales.stride()[1:] == (groups, 1), \
            (blocks.stride(), scales.stride())
        decode = DECODE_INT if INTERPRET else DECODE_ROUTES[tiles.decode]
        _moe_gemv_kernel[(row_tiles, feature_tiles)](
            x, source, blocks.view(torch.int32), scales, bias, out, p.counts, p.offsets,
            E, N, x.stride(0), out.stride(0), blocks.stride(0) // 4, scales.stride(0),
            0 if bias is None else bias.stride(0), float(swiglu_limit or 0.0),
            K_BYTES=groups * group_bytes, GATHER=source is not None, SOURCE_DIV=source_div,
            SWIGLU=swiglu_limit is not None, DECODE=decode, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k, E_POW2=triton.next_power_of_2(E), EVEN_N=N % tiles.block_n == 0,
            UNROLL=tiles.unroll,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl.launch_args(x.device),
        )
        return out
    # an expert's last rows, when at most tail_t are left over, take a tile of tail_t rows (one an expert)
    tail_slots = min(E, p.num_rows) if tiles.tail_t else 0
    assert row_tiles + tail_slots < 2 ** 16, \
        f"{p.num_rows} rows in tiles of {tiles.block_t}: too many for the grid's second axis"
    # The tiles are chosen for bf16 x; fp32 x (the fp32 model) doubles each pipeline stage's x tile,
    # so keep the stages that fit in shared memory.
    stage_bytes = tiles.block_t * tiles.block_k * x.element_size() + tiles.block_n * tiles.block_k // 2
    num_stages = max(1, min(tiles.num_stages, SHARED_MEMORY_BUDGET // stage_bytes))
    _moe_gemm_kernel[(feature_tiles, tail_slots + row_tiles)](  # feature tiles fastest (see the kernel)
        x, source, blocks, scales, bias, out, p.counts, p.offsets,
        E, N, groups * group_bytes, x.stride(0), out.stride(0),
        blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        0 if bias is None else bias.stride(0), float(swiglu_limit or 0.0), tail_slots,
        GATHER=source is not None, SOURCE_DIV=source_div, SWIGLU=swiglu_limit is not None,
        DOT_FP32=INTERPRET or x.dtype == torch.float32, PTX=not INTERPRET, FOLD=scales_fold(scales),
        BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, E_POW2=triton.next_power_of_2(E),
        EVEN_K=groups * group_bytes % (tiles.block_k // 2) == 0, TAIL_T=tiles.tail_t,
        num_warps=tiles.num_warps, num_stages=num_stages,
        **({} if tiles.maxnreg is None or INTERPRET else {"maxnreg": tiles.maxnreg}),
        **pdl.launch_args(x.device),
    )
    return out


def combine(y: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None,
            out_dtype: torch.dtype, norm: tuple[torch.Tensor, float] | None = None):
    """[T, D]: residual + sum_k weights[t, k] * y[position[t, k]] (fp32 sums, one rounding).

    norm = (gain [D], eps): returns (that, its RMSNorm times gain), both out_dtype, in one launch."""
    T, top_k = weights.shape
    D = y.shape[1]
    out = torch.empty((T, D), dtype=out_dtype, device=y.device)
    normed = torch.empty_like(out) if norm is not None else None
    if T:
        block_d = triton.next_power_of_2(D) if norm is not None else 1024  # NORM: a whole row a program
        gain, eps = norm if norm is not None else (None, 0.0)
        _combine_kernel[(T, triton.cdiv(D, block_d))](
            y, position, weights.float().contiguous(), residual, out, gain, normed, D, y.stride(0),
            residual.stride(0) if residual is not None else 0, out.stride(0), D, float(eps), TOP_K=top_k,
            BLOCK_D=block_d, NORM=norm is not None, num_warps=min(16, max(4, block_d // 512)),
            **pdl.launch_args(y.device))
    return out if norm is None else (out, normed)


def moe_triton(h: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, mlp1_blocks, mlp1_scales,
               mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit: float,
               residual: torch.Tensor | None = None, reduce=None, first: bool = True,
               rows: Plan | None = None, next_norm: tuple[torch.Tensor, float] | None = None):
    """The MoE on a rank holding every expert (or the same slice of every expert's intermediate
    dimension): [T, d] = residual + sum_k w_k * expert_k(h).

    h [T, d]; expert_ids, weights [T, k]. Rows are never copied out of h: the first GEMM gathers
    token order[i] // k for sorted pair i. With the experts split or partitioned over ranks that all
    hold these tokens, `reduce` sums over them: each rank's mlp2 gives partial products, the `first`
    rank of each expert's slices alone adds mlp2's bias, the combined rows (fp32, one per token, not
    one per token and expert) are summed, and every rank adds the residual to the sum. A pair of
    expert E (one past the last: held elsewhere) must have weight 0: it is not computed or read.
    `rows`: the (token, expert) pairs already sorted by expert (router_triton.route_and_plan).
    next_norm = (gain, eps): returns (output, its RMSNorm times gain), the next block's attention
    norm, computed in the combine's launch when there is nothing to reduce."""
    T, top_k = expert_ids.shape
    # E + 1 buckets: a pair of expert E (one past the last: an expert another rank holds) sorts after
    # every expert's, in the bucket the grouped kernels, reading E experts' counts, never compute.
    p = rows if rows is not None else plan(expert_ids, mlp1_blocks.shape[0] + 1)
    act = grouped_mxfp4(h, p.order, top_k, p, mlp1_blocks, mlp1_scales, mlp1_bias, h.dtype,
                        swiglu_limit=limit)
    y = grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, mlp2_bias if first else None, torch.float32)
    out_dtype = h.dtype if residual is None else residual.dtype
    if reduce is None:
        return combine(y, p.position, weights, residual, out_dtype, norm=next_norm)
    # Every rank holds the residual: it is added once, after the sum (with next_norm in the norm's
    # launch, the fp32 sum rounded once).
    summed = reduce(combine(y, p.position, weights, None, torch.float32))
    if next_norm is None:
        return summed.to(out_dtype) if residual is None else (residual + summed).to(out_dtype)
    from runtime.kernels.rmsnorm_triton import add_rms_norm_triton

    if residual is None:
        return add_rms_norm_triton(summed.to(out_dtype), None, *next_norm)
    return add_rms_norm_triton(residual, summed, *next_norm)


def expert_rows_triton(x, experts, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                       limit: float, reduce=None) -> torch.Tensor:
    """The Triton version of moe.expert_rows: rows through their experts, [m, d] fp32, bias included.
    Rows of expert E (one past the last: empty slots) sort after every expert's in the plan's extra
    bucket, which the grouped kernels, reading E experts' counts, never compute."""
    E = mlp1_blocks.shape[0]
    p = plan(experts, E + 1)
    act = grouped_mxfp4(x, p.order, 1, p, mlp1_blocks, mlp1_scales, mlp1_bias, x.dtype, swiglu_limit=limit)
    if reduce is None:
        y = grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, mlp2_bias, torch.float32)
    else:  # split experts: sum the partial products across ranks first, then add the bias once
        y = reduce(grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, torch.zeros_like(mlp2_bias),
                                 torch.float32))
        y += mlp2_bias[experts.long().clamp(max=E - 1)[p.order.long()]].float()
    return y[p.position.long()]
