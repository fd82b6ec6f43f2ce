"""The attention kernel's machine code for Hopper, without a GPU: compiles `_paged_attention_kernel` for
sm_90 (Triton's bundled ptxas), disassembles it (nvdisasm) and counts the instructions by kind.

    python scripts/sass_attention.py [--tree DIR]

For a cache of bf16 and of float8 e4m3, a prefill tile (128 rows: 16 tokens x 8 heads, 128 keys or
--prefill-keys, 2 stages) and a decode tile (16 rows, 128 keys, 3 stages), gpt-oss's head shapes.
Pointers and strides are marked 16-divisible, as the launches specialise them (without that the
loads compile to scalar 2-byte accesses). Register allocation differs between Triton versions: run
it with the device's (3.6: a virtual environment with `triton==3.6.0` and a CPU torch) for counts
that match the GPU's code. `--tree` compiles another checkout's kernel (git archive REV | tar -x -C
DIR), to compare two versions. The counts are static (each loop body once), not timings: they say
what a tile asks of each pipe (MUFU: exponentials; F2F / F2FP: conversions; HGMMA / HMMA: tensor
cores; STL: registers spilled).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass import Build, build, count  # noqa: E402

KINDS = ("MUFU", "F2F", "F2FP", "PRMT", "HGMMA", "HMMA", "LDGSTS", "LDS", "STS", "STL")
TILES = {"prefill": dict(rows=128, block_t=16, num_stages=2),  # keys: --prefill-keys
         "decode": dict(rows=16, block_t=1, num_stages=3, block_n=128)}
INT_POINTERS = ("block_table_ptr", "cu_q_ptr", "q_start_ptr")
FP32_POINTERS = ("sinks_ptr", "part_m_ptr", "part_l_ptr", "part_acc_ptr")


def signature(names: list[str], cache: str) -> dict:
    def kind(name: str) -> str:
        if name in ("k_ptr", "v_ptr"):
            return cache
        if name.endswith("_ptr"):
            return "*i32" if name in INT_POINTERS else "*fp32" if name in FP32_POINTERS else "*bf16"
        return "constexpr" if name.isupper() else "fp32" if name == "qk_scale" else "i32"
    return {name: kind(name) for name in names}


def counts(kernel, cache: str, rows: int, block_t: int, num_stages: int,
           block_n: int) -> tuple[collections.Counter, Build]:
    """The whole kernel's instructions by opcode, and the build (registers, shared memory)."""
    names = kernel.arg_names
    aligned = [i for i, n in enumerate(names)
               if n.endswith("_ptr") or (n.startswith("stride") and n != "stride_bt")]
    constants = dict(GROUP=8, GROUP_P=8, BLOCK_T=block_t, ROWS=rows, BLOCK_N=block_n, HEAD_DIM=64, PAGE=16,
                     SLIDING=False, SPLIT=False, DOT_FP32=False, PDL=False)
    built = build(kernel, signature(names, cache), constants, aligned, num_warps=4, num_stages=num_stages)
    return count(built.sass), built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]),
                    help="the checkout to compile")
    ap.add_argument("--prefill-keys", type=int, default=128, help="keys a prefill tile (BLOCK_N)")
    args = ap.parse_args()
    sys.path.insert(0, args.tree)
    from runtime.options import options
    if options.interpret:  # the interpreter's kernels do not compile
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernel for the GPU")
    from runtime.kernels.attention_triton import _paged_attention_kernel

    print(f"_paged_attention_kernel of {args.tree}, sm_90, Triton {triton.__version__}")
    print("| cache | tile | " + " | ".join(KINDS) + " | all | registers | stack | shared KB | CTAs an SM |")
    print("|---|---|" + "---:|" * (len(KINDS) + 5))
    for cache, label in (("*bf16", "bf16"), ("*fp8e4nv", "float8 e4m3")):
        for tile, shape in TILES.items():
            ops, built = counts(_paged_attention_kernel, cache, **{"block_n": args.prefill_keys, **shape})
            print(f"| {label} | {tile} | " + " | ".join(str(ops.get(k, 0)) for k in KINDS)
                  + f" | {sum(ops.values())} | {built.registers} | {built.stack} | "
                  f"{built.shared / 1024:.0f} | {built.ctas_per_sm} |")


if __name__ == "__main__":
    main()
