"""The MoE experts (mlp1 + SwiGLU + mlp2) on one GPU: Triton grouped MXFP4 GEMM vs the torch reference.

    python scripts/bench_moe.py --model gpt-oss-20b

Per token count: time (CUDA events via triton.testing.do_bench, median), the bytes of the experts
touched (packed blocks + scales + biases of each distinct expert, read once), TB/s and TFLOP/s, and
their share of the copy bandwidth and bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.checkpoint import random_tensor, tensor_specs  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.moe import expert_rows  # noqa: E402
from runtime.kernels.moe_gemm import expert_rows_triton, grouped_mxfp4, tiles_by_expert  # noqa: E402


def ceilings() -> tuple[float, float]:
    src = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = triton.testing.do_bench(lambda: a @ b, return_mode="median") / 1e3
    return 2 * src.numel() / copy_s, 2 * 8192**3 / mm_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt-oss-20b")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 4096, 16384])
    p.add_argument("--reference", action="store_true", help="also time the torch reference")
    args = p.parse_args()
    cfg = preset(args.model)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    names = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias", "mlp2_weight.blocks", "mlp2_weight.scales",
             "mlp2_bias")
    weights = [random_tensor(specs[f"block.0.mlp.{n}"], gen, "cuda") for n in names]
    per_expert = sum(w[0].numel() * w.element_size() for w in weights)
    bw, mm = ceilings()
    print(f"{args.model}: copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s "
          f"({torch.cuda.get_device_name()})")
    print(f"{'tokens':>6} {'experts':>7} {'MB read':>8} {'time us':>9} {'TB/s':>6} {'%copy':>6} {'TFLOP/s':>8} "
          f"{'%mm':>5} | {'GEMMs us':>8} {'%copy':>6} {'%mm':>5} | {'ref us':>9}")
    for tokens in args.tokens:
        experts = torch.topk(torch.rand(tokens, cfg.num_experts, device="cuda"), cfg.experts_per_token).indices
        experts = experts.flatten()
        x = torch.randn(len(experts), cfg.hidden_size, device="cuda").to(torch.bfloat16)
        seconds = triton.testing.do_bench(lambda x=x, experts=experts: expert_rows_triton(x, experts, *weights, cfg.swiglu_limit),
                                          return_mode="median") / 1e3
        # The two GEMM launches alone (rows already sorted, tiles planned): what the kernels cost
        # without the host-side planning around them.
        order = torch.argsort(experts, stable=True)
        tiles = tiles_by_expert(experts[order], cfg.num_experts, 16)
        xs = x[order].contiguous()

        def gemms(xs=xs, tiles=tiles):
            act = grouped_mxfp4(xs, tiles, *weights[:3], torch.bfloat16, swiglu_limit=cfg.swiglu_limit)
            return grouped_mxfp4(act, tiles, *weights[3:], torch.float32)

        kernel_s = triton.testing.do_bench(gemms, return_mode="median") / 1e3
        touched = torch.unique(experts).numel() * per_expert
        flops = 2 * len(experts) * cfg.hidden_size * 3 * cfg.intermediate_size
        ref = ""
        if args.reference and tokens <= 4096:
            ref_s = triton.testing.do_bench(lambda x=x, experts=experts: expert_rows(x, experts, *weights, cfg.swiglu_limit),
                                            return_mode="median") / 1e3
            ref = f"{ref_s * 1e6:9.0f}"
        print(f"{tokens:>6} {torch.unique(experts).numel():>7} {touched / 1e6:>8.1f} {seconds * 1e6:>9.1f} "
              f"{touched / seconds / 1e12:>6.2f} {100 * touched / seconds / bw:>6.1f} {flops / seconds / 1e12:>8.1f} "
              f"{100 * flops / seconds / mm:>5.1f} | {kernel_s * 1e6:>8.1f} {100 * touched / kernel_s / bw:>6.1f} "
              f"{100 * flops / kernel_s / mm:>5.1f} | {ref}")


if __name__ == "__main__":
    main()
