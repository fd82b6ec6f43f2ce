"""The MoE grouped GEMM's machine code for Hopper, without a GPU: `_moe_gemm_kernel` compiled for sm_90
at the tiles the runtime picks (runtime/kernels/moe_triton_details/tiles.py) for a number of tokens,
its main loop's instructions counted by kind, and per decoded weight value.

    python scripts/sass_moe.py [--model gpt-oss-20b] [--tokens 256 1024 8192] [--tiles T,N,K,W,S ...]
        [--tree DIR]

The decode of MXFP4 (PRMT, LOP3, SHF/SHL, HMUL2) competes with the loads and the wgmma issue for a
warp's instruction slots; docs/performance.md ("What the peers' Hopper MXFP4 MoE GEMMs do") puts the
reference kernel's decode near 2 instructions a value. See scripts/sass.py for what the counts are.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass import Build, build, count, hottest_loop  # noqa: E402

KINDS = ("HGMMA", "LDSM", "LDS", "LDGSTS", "PRMT", "LOP3", "SHF", "IMAD", "HMUL2", "HFMA2", "STL")
POINTERS = {"x_ptr": "*bf16", "source_ptr": "*i32", "blocks_ptr": "*u8", "scales_ptr": "*u8",
            "bias_ptr": "*bf16", "out_ptr": "*bf16", "counts_ptr": "*i32", "offsets_ptr": "*i32"}


def main_loop_counts(kernel, tiles, swiglu: bool, experts: int,
                     k_bytes: int) -> tuple[collections.Counter, Build]:
    """The main loop's instructions by opcode, for a GEMM of K = 2 * k_bytes values, and the build."""
    names = kernel.arg_names
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride")]
    # mlp1 gathers its rows (4 a token) and ends in the SwiGLU
    constexprs = dict(GATHER=swiglu, SOURCE_DIV=4 if swiglu else 1, SWIGLU=swiglu, DOT_FP32=False, PTX=True,
                      FOLD=True, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                      E_POW2=1 << (experts - 1).bit_length(), PDL=False,
                      EVEN_K=k_bytes % (tiles.block_k // 2) == 0, TAIL_T=tiles.tail_t)
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n == "limit" else "i32")
                 for n in names}
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if tiles.maxnreg is not None:
        options["maxnreg"] = tiles.maxnreg
    built = build(kernel, signature, constexprs, aligned, **options)
    return count(hottest_loop(built.sass, "HGMMA")), built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-oss-20b", choices=("gpt-oss-20b", "gpt-oss-120b"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 8192])
    ap.add_argument("--tiles", nargs="*", default=[],
                    help="tiles besides the rules', as rows,features,K,warps,stages (e.g. 128,256,64,16,3)")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]),
                    help="the checkout to compile")
    args = ap.parse_args()
    sys.path.insert(0, args.tree)
    import triton

    from runtime.config import preset
    from runtime.kernels.moe_triton_details.gemm import _moe_gemm_kernel
    from runtime.kernels.moe_triton_details.tiles import gemm_tiles
    from runtime.options import options
    if options.interpret:  # the interpreter's kernels do not compile
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernel for the GPU")

    cfg = preset(args.model)
    # (label, rows for the rules' tiles, or tiles given)
    cases = [(f"{tokens:,} tokens", tokens * cfg.experts_per_token, None) for tokens in args.tokens]
    cases += [("--tiles", None, parse_tiles(text)) for text in args.tiles]
    print(f"_moe_gemm_kernel of {args.tree}, {args.model}, sm_90, Triton {triton.__version__}; main loop, "
          "and what a CTA takes of an SM")
    print("| case | GEMM | tiles (rows, features, K, warps, stages) | " + " | ".join(KINDS)
          + " | all | a decoded value | registers | stack | shared KB | CTAs an SM |")
    print("|---|---|---|" + "---:|" * (len(KINDS) + 6))
    for label, rows, given in cases:
        for swiglu, name in ((True, "mlp1"), (False, "mlp2")):
            tiles = given or gemm_tiles(rows, cfg.num_experts, swiglu)
            k = cfg.hidden_size if swiglu else cfg.intermediate_size  # mlp1 reads x, mlp2 the activations
            loop, built = main_loop_counts(_moe_gemm_kernel, tiles, swiglu, cfg.num_experts, k // 2)
            # a thread's share of the tile's weight values decoded in one iteration
            values = tiles.block_n * tiles.block_k / (32 * tiles.num_warps)
            total = sum(loop.values())
            shape = ", ".join(str(v) for v in (tiles.block_t, tiles.block_n, tiles.block_k, tiles.num_warps,
                                               tiles.num_stages))
            print(f"| {label} | {name} | {shape} | " + " | ".join(str(loop.get(k, 0)) for k in KINDS)
                  + f" | {total} | {total / values:.2f} | {built.registers} | {built.stack} | "
                  f"{built.shared / 1024:.0f} | {built.ctas_per_sm} |")


def parse_tiles(text: str):
    """--tiles' "rows,features,K,warps,stages" as the GEMM's Tiles."""
    from runtime.kernels.moe_triton_details.tiles import Tiles

    return Tiles(*(int(v) for v in text.split(",")))

if __name__ == "__main__":
    main()
