"""Every Triton kernel on one GPU, next to the ceilings measured in the same run.

    python scripts/bench_kernels.py [--json kernels.json]

Measures the copy bandwidth (bytes read + written by a large device-to-device copy) and the bf16
matmul rate (8192^3) once, then runs the MoE (scripts/bench_moe.py: gpt-oss-20b and -120b), the
attention (scripts/bench_attention.py) and the fused norm/RoPE (scripts/bench_fused.py)
benchmarks against them, printing one markdown table per kernel family.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_attention  # noqa: E402
import bench_fused  # noqa: E402
import bench_moe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    bw, mm = bench_moe.ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s",
          flush=True)
    moe = bench_moe.run(bw, mm, "gpt-oss-20b", (1, 8, 64, 512, 4096, 16384))
    moe += bench_moe.run(bw, mm, "gpt-oss-120b", (1, 64, 4096))
    limits = {"copy_bytes_per_s": bw, "matmul_flops": mm}
    attention = bench_attention.run(limits)
    fused = bench_fused.run((bw, mm))
    print(f"\n## MoE (plan + 2 grouped MXFP4 GEMMs + combine)\n\n{bench_moe.HEADER}")
    for r in moe:
        print(bench_moe.format_row(r, bw, mm))
    print("\n## Attention\n")
    print(bench_attention.markdown(attention, limits))
    print(f"\n## Fused RMSNorm and RoPE\n\n{bench_fused.HEADER}")
    for r in fused:
        print(bench_fused.format_row(r))
    if args.json:
        rows = [dict(r, tiles=str(r.get("tiles"))) for r in moe] + attention + fused
        with open(args.json, "w") as f:
            json.dump({"copy_bytes_per_s": bw, "matmul_flops": mm, "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
