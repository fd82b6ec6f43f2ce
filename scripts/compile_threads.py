"""Whether Triton compiles overlap on threads on this machine, without a GPU: the MoE GEMM's variants for
a few token counts compiled for sm_90 one after another, then the same on threads, each time into an
empty Triton cache (what runtime/kernels/compile_ahead.py counts on).

    python scripts/compile_threads.py [--tokens 256 1024 8192] [--threads 2]

Run it with the device's Triton (3.6: see scripts/sass.py) for that version's compiler.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass import compile_sm90  # noqa: E402
from sass_moe import POINTERS  # noqa: E402


def variants(tokens: list[int]) -> list[tuple]:
    """(signature, constexprs, aligned, options) of 20b's mlp1 and mlp2 at each token count's tiles."""
    from runtime.config import preset
    from runtime.kernels.moe_triton_details.gemm import _moe_gemm_kernel
    from runtime.kernels.moe_triton_details.tiles import gemm_tiles

    cfg, names = preset("gpt-oss-20b"), _moe_gemm_kernel.arg_names
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride")]
    out = []
    for n in tokens:
        for swiglu in (True, False):
            tiles = gemm_tiles(n * cfg.experts_per_token, cfg.num_experts, swiglu)
            k_bytes = (cfg.hidden_size if swiglu else cfg.intermediate_size) // 2
            constexprs = dict(GATHER=swiglu, SOURCE_DIV=4 if swiglu else 1, SWIGLU=swiglu, DOT_FP32=False,
                              PTX=True, FOLD=True, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n,
                              BLOCK_K=tiles.block_k, E_POW2=cfg.num_experts, PDL=False,
                              EVEN_K=k_bytes % (tiles.block_k // 2) == 0, TAIL_T=tiles.tail_t)
            signature = {a: "constexpr" if a in constexprs else POINTERS.get(a, "fp32" if a == "limit"
                                                                               else "i32") for a in names}
            out.append((signature, constexprs, aligned,
                        dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)))
    return out


def compile_all(jobs: list[tuple], threads: int) -> float:
    """Seconds to compile every job (into a fresh, empty Triton cache) on `threads` threads."""
    from runtime.kernels.moe_triton_details.gemm import _moe_gemm_kernel

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: compile_sm90(_moe_gemm_kernel, job[0], job[1], job[2], **job[3]), jobs))
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 8192])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    from runtime.options import options
    if options.interpret:  # the interpreter's kernels do not compile
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernel for the GPU")
    jobs = variants(args.tokens)
    compile_all(jobs[:1], 1)  # Triton's own start-up (imports, the backend), outside the timings
    alone = compile_all(jobs, 1)
    side_by_side = compile_all(jobs, args.threads)
    print(f"| {len(jobs)} MoE GEMM variants for sm_90 | one after another | on {args.threads} threads "
          "| speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| seconds | {alone:.2f} | {side_by_side:.2f} | {alone / side_by_side:.2f}x |")


if __name__ == "__main__":
    main()
