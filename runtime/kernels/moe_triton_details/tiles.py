"""Which kernel, route and tiles each MoE GEMM takes, by rows per expert: a table, scanned in order.

Decode-sized batches are bound by streaming (and decoding) the weight bytes, prefill by the MMAs. The
rules are the fastest in scripts/bench_moe.py --sweep (and profile_decode.py --ab) on an H100 (mlp2's
GEMM tiles from 49 rows per expert: on an H200, with the blocks in kernel order); the
measurements behind each line are in docs/performance.md, "MoE tile choices: the measurements behind
runtime/kernels/moe_triton_details/tiles.py".

Two kernels: "gemm" (gemm.py, the wgmma tensor-core GEMM, any rows) and "gemv" (gemv.py, up to 16
rows a tile). The GEMV's routes (`Tiles.decode`): "fp16" and "e4m3" on CUDA cores, "tensor_core_row"
(one row a tile) and "tensor_core_rows" (8 or 16) on tensor cores (gemv_tensor_core.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from runtime.options import options

# The interpreter computes bf16 dots wrongly and runs no PTX (docs/environment.md): fp32 operands and the
# integer decode there.
INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_t: int  # rows of one expert per program
    block_n: int  # output features per program
    block_k: int  # reduction elements per step (a multiple of 32 for the GEMV)
    num_warps: int
    num_stages: int
    kernel: str = "gemm"  # "gemm": _moe_gemm_kernel (wgmma); "gemv": _moe_gemv_kernel (1-4, 8 or 16 rows)
    decode: str = "fp16"  # the GEMV's route on the GPU: fp16, e4m3, tensor_core_row or tensor_core_rows
    unroll: bool = True  # the GEMV's K loop: unrolled (loads can run ahead) or a loop (fewer registers)
    maxnreg: int | None = None  # the GEMM's register cap a thread (more programs an SM), None: the compiler's
    # the GEMM: an expert's last count % block_t rows, if at most tail_t, in a tile this wide (0: none).
    # Not in the rules: the GEMMs alone gain 1-10% with it, but the engine's 1k/1k ran slower in session
    # 23 (docs/performance.md, "Tail tiles"); it stays a sweep candidate until a profile says why.
    tail_t: int = 0


TENSOR_CORE_ROW, TENSOR_CORE_ROWS = "tensor_core_row", "tensor_core_rows"
TENSOR_CORE_DECODES = (TENSOR_CORE_ROW, TENSOR_CORE_ROWS)
CUDA_CORE_DECODE = {True: "fp16", False: "e4m3"}  # one-row tiles' CUDA-core route, mlp1 (swiglu) and mlp2
PROBE_REFERENCE_TILES = Tiles(1, 32, 256, 4, 1, "gemv", decode="fp16", unroll=False)  # CUDA cores, any K


@dataclasses.dataclass(frozen=True)
class Batch:
    """What the rules look at."""
    rows: int
    experts: int
    interpret: bool
    tensor_core_row: bool  # the one-row tensor-core GEMV may run (options.moe_tensor_core_gemv, a GPU)
    tensor_core_rows: bool  # the multi-row one may (options.moe_tensor_core_rows, a GPU)

    @property
    def per_expert(self) -> float:
        return self.rows / max(1, min(self.rows, self.experts))

    @property
    def sparse(self) -> bool:  # at most half the experts have a row
        return self.rows * 2 <= self.experts


class Rule(NamedTuple):
    when: Callable[[Batch], bool]
    mlp1: Tiles  # with the SwiGLU epilogue
    mlp2: Tiles


def gemv(block_t: int, block_n: int, block_k: int, decode: str, unroll: bool = True) -> Tiles:
    return Tiles(block_t, block_n, block_k, 4, 1, "gemv", decode, unroll)


ROW, ROWS = TENSOR_CORE_ROW, TENSOR_CORE_ROWS

GEMM_RULES = (  # the wgmma GEMM; from 65 rows per expert 128 x 128 tiles on 8 warps (blocks in kernel
    # order), mlp1's 256 rows a tile once an expert has more than 128; up to 64 rows, 64-row tiles
    # (mlp2's capped at 128 registers a thread: four programs an SM)
    Rule(lambda b: b.per_expert <= 2, Tiles(8, 64, 128, 4, 4), Tiles(8, 32, 128, 2, 4)),
    Rule(lambda b: b.per_expert <= 16, Tiles(32, 128, 64, 8, 3), Tiles(32, 128, 64, 8, 3)),
    Rule(lambda b: b.per_expert <= 64, Tiles(64, 128, 64, 4, 3), Tiles(64, 128, 64, 4, 3, maxnreg=128)),
    Rule(lambda b: b.per_expert <= 128, Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 64, 8, 3)),
    Rule(lambda b: True, Tiles(256, 128, 64, 8, 4), Tiles(128, 128, 64, 8, 3)),
)

TILE_RULES = (
    # the interpreter runs programs one by one, each at about the same cost: 8x fewer, wider ones, no PTX
    Rule(lambda b: b.interpret and b.sparse, gemv(1, 128, 512, "fp16"), gemv(1, 128, 512, "e4m3")),
    Rule(lambda b: b.interpret and b.per_expert <= 1, gemv(2, 128, 256, "fp16", False),
         gemv(2, 128, 256, "e4m3", False)),
    # one row a tile while at most half the experts have one; 1024-value chunks up to one row per 8 experts
    Rule(lambda b: b.tensor_core_row and b.rows * 8 <= b.experts, gemv(1, 16, 1024, ROW),
         gemv(1, 16, 1024, ROW)),
    Rule(lambda b: b.tensor_core_row and b.sparse, gemv(1, 16, 512, ROW), gemv(1, 16, 512, ROW)),
    Rule(lambda b: b.sparse, gemv(1, 16, 512, "fp16"), gemv(1, 16, 512, "e4m3")),
    # 8 rows a tile up to 8 rows per expert; 256-value chunks up to 2, except for 20b's mlp2
    Rule(lambda b: b.tensor_core_rows and b.per_expert <= 2 and b.experts >= 128, gemv(8, 64, 256, ROWS),
         gemv(8, 64, 256, ROWS)),
    Rule(lambda b: b.tensor_core_rows and b.per_expert <= 2, gemv(8, 64, 256, ROWS), gemv(8, 64, 128, ROWS)),
    Rule(lambda b: b.tensor_core_rows and b.per_expert <= 8, gemv(8, 64, 128, ROWS), gemv(8, 64, 128, ROWS)),
    # the CUDA-core GEMV beats the GEMM up to one row per expert
    Rule(lambda b: b.per_expert <= 1, gemv(2, 32, 256, "e4m3", False), gemv(2, 32, 256, "fp16", False)),
    *GEMM_RULES,
)


def _batch(rows: int, num_experts: int) -> Batch:
    return Batch(rows, num_experts, INTERPRET, options.moe_tensor_core_gemv and not INTERPRET,
                 options.moe_tensor_core_rows and not INTERPRET)


def _first(rules: tuple[Rule, ...], batch: Batch, swiglu: bool) -> Tiles:
    rule = next(r for r in rules if r.when(batch))
    return rule.mlp1 if swiglu else rule.mlp2


def choose_tiles(rows: int, num_experts: int, swiglu: bool) -> Tiles:
    """The kernel, route and tiles for `rows` sorted rows over `num_experts` experts: mlp1 (swiglu) or
    mlp2. A tensor-core GEMV route is a wish: grouped_mxfp4 takes it only where it fits the call."""
    return _first(TILE_RULES, _batch(rows, num_experts), swiglu)


def gemm_tiles(rows: int, num_experts: int, swiglu: bool) -> Tiles:
    """The wgmma GEMM's tiles by rows per expert (what a GEMV route falls back to from 2 rows a tile)."""
    return _first(GEMM_RULES, _batch(rows, num_experts), swiglu)


def gemv_tiles_ok(tiles: Tiles) -> bool:
    """Shapes the GEMV supports. Its decode takes each 32-value block's 4 words from one thread
    (inline asm with pack=4), which holds when a thread loads 16 bytes per block: at least one
    block per thread in a step (smaller tensors get narrower loads) and power-of-two sizes. The
    tensor-core routes need lanes in fours along the blocks and no lane left without a weight row:
    "tensor_core_row" one row a tile, "tensor_core_rows" 8 or 16 rows and chunks of 4, 8 or 16 blocks,
    so that a row's 4 lanes span a chunk and the lanes with the same position in their four hold the
    same K positions (see gemv_tensor_core.py)."""
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (tiles.block_n, tiles.block_k, tiles.num_warps))
    groups = tiles.block_k // 32
    if tiles.decode == TENSOR_CORE_ROW:  # each half tile covers the CTA's lanes: 32 // groups rows a warp
        return (pow2 and tiles.block_t == 1 and 4 <= groups <= 32
                and tiles.block_n // 2 >= (32 // groups) * tiles.num_warps)
    if tiles.decode == TENSOR_CORE_ROWS:  # 4 lanes along a row's 4 blocks, 8 rows a warp, warps along rows
        return (pow2 and tiles.block_t in (8, 16) and tiles.block_k in (128, 256, 512)
                and tiles.block_n // 2 >= 8 * tiles.num_warps)
    return (pow2 and 1 <= tiles.block_t <= 4 and tiles.block_n >= 2 and 64 <= tiles.block_k <= 1024
            and tiles.block_n * groups >= 32 * tiles.num_warps and tiles.decode in ("fp16", "e4m3"))
