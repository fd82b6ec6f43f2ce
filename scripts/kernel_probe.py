"""Runs one kernel of the model a few times at a chosen shape, for Nsight Compute to profile a launch.

    ncu --clock-control none --kernel-name regex:_moe_gemv --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats --section SchedulerStats \
        python scripts/kernel_probe.py moe --model gpt-oss-20b --tokens 1 --gemm 1

`moe`: one grouped MXFP4 GEMM (--gemm 1: mlp1 with the gather and SwiGLU, 2: mlp2) on random
weights of one layer, tiles as the model picks them. `attention`: paged decode attention, one
sequence of --context keys, full layer. Each runs --runs times (the first launches compile; skip
them with --launch-skip). `--clock-control none` leaves the clocks alone (METHOD.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import NAMES  # noqa: E402  (one layer's expert tensors, as the MoE benchmark builds them)
from runtime.checkpoint import random_tensor, tensor_specs  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.router import route  # noqa: E402
from runtime.kernels.moe_triton import grouped_mxfp4, plan  # noqa: E402


def moe(model: str, tokens: int, gemm: int, runs: int) -> None:
    cfg = preset(model)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = [random_tensor(specs[f"block.0.mlp.{n}"], gen, "cuda") for n in NAMES]
    expert_ids, _ = route(torch.randn(tokens, cfg.num_experts, device="cuda"), cfg.experts_per_token)
    h = torch.randn(tokens, cfg.hidden_size, device="cuda").to(torch.bfloat16)
    p = plan(expert_ids, cfg.num_experts)

    def mlp1():
        return grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w[:3], torch.bfloat16,
                             swiglu_limit=cfg.swiglu_limit)

    act = mlp1()
    for _ in range(runs):
        mlp1() if gemm == 1 else grouped_mxfp4(act, None, 1, p, *w[3:], torch.float32)


def attention(context: int, runs: int) -> None:
    import bench_attention

    inputs = bench_attention.make_inputs([(context - 1, 1)])
    out = torch.empty_like(inputs[0])
    from runtime.kernels.attention_triton import paged_attention_triton

    for _ in range(runs):
        paged_attention_triton(*inputs, sm_scale=bench_attention.HEAD_DIM ** -0.5, window=None, out=out,
                               max_q_len=1, max_k_len=context)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["moe", "attention"])
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--gemm", type=int, choices=[1, 2], default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if args.kernel == "moe":
        moe(args.model, args.tokens, args.gemm, args.runs)
    else:
        attention(args.context, args.runs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
