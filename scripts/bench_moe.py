"""The MoE experts on one GPU: the Triton path (plan + two grouped MXFP4 GEMMs + combine).

    python scripts/bench_moe.py --model gpt-oss-20b [--sweep]

Per token count: time (CUDA events via triton.testing.do_bench, median), the bytes of the experts
touched (packed blocks + scales + biases of each distinct expert, read once), TB/s and TFLOP/s, and
their share of the copy bandwidth and bf16 matmul rate measured in the same run (`ceilings`).
`--sweep` times each GEMM over a set of tile shapes and prints the fastest, to tune `choose_tiles`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.bench import ceilings as measure_ceilings  # noqa: E402
from runtime.checkpoint import random_tensor, tensor_specs  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.moe import route  # noqa: E402
from runtime.kernels.moe_gemm import Tiles, choose_tiles, grouped_mxfp4, moe_triton, plan  # noqa: E402

NAMES = ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias", "mlp2_weight.blocks", "mlp2_weight.scales",
         "mlp2_bias")


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    measured = measure_ceilings(torch.device("cuda"))
    return measured["copy_bytes_per_s"], measured["matmul_flops"]


def candidates(rows_per_expert: float) -> list[Tiles]:
    if rows_per_expert <= 16:
        return [Tiles(t, n, k, w, s) for t in (8, 16) for n in (32, 64, 128) for k in (128, 256)
                for w, s in ((4, 4), (2, 4), (4, 6)) if t == 8 or rows_per_expert > 4]
    if rows_per_expert <= 128:
        return [Tiles(t, n, k, w, s) for t in (32, 64) for n in (64, 128) for k in (64, 128)
                for w, s in ((4, 3), (8, 3), (4, 5))]
    return [Tiles(t, n, k, w, s) for t in (128, 256) for n in (64, 128) for k in (64, 128)
            for w, s in ((4, 3), (8, 3), (8, 4))]


def run(bw: float, mm: float, model: str = "gpt-oss-20b", token_counts=(1, 8, 64, 512, 4096, 16384),
        sweep: bool = False) -> list[dict]:
    cfg = preset(model)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = [random_tensor(specs[f"block.0.mlp.{n}"], gen, "cuda") for n in NAMES]
    per_expert = sum(t[0].numel() * t.element_size() for t in w)
    results = []
    for tokens in token_counts:
        expert_ids, weights = route(torch.randn(tokens, cfg.num_experts, device="cuda"), cfg.experts_per_token)
        h = torch.randn(tokens, cfg.hidden_size, device="cuda").to(torch.bfloat16)
        touched = torch.unique(expert_ids).numel() * per_expert
        flops = 2 * expert_ids.numel() * cfg.hidden_size * 3 * cfg.intermediate_size
        whole = triton.testing.do_bench(lambda: moe_triton(h, expert_ids, weights, *w, cfg.swiglu_limit, residual=h),
                                        return_mode="median") / 1e3
        p = plan(expert_ids, cfg.num_experts)
        act = grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w[:3], torch.bfloat16, swiglu_limit=cfg.swiglu_limit)

        def gemm1(tiles=None):
            return grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w[:3], torch.bfloat16,
                                 swiglu_limit=cfg.swiglu_limit, tiles=tiles)

        def gemm2(tiles=None):
            return grouped_mxfp4(act, None, 1, p, *w[3:], torch.float32, tiles=tiles)

        gemms = triton.testing.do_bench(lambda: (gemm1(), gemm2()), return_mode="median") / 1e3
        row = {"kernel": "moe", "model": model, "tokens": tokens, "experts": torch.unique(expert_ids).numel(),
               "bytes": touched, "flops": flops, "seconds": whole, "gemm_seconds": gemms,
               "tiles": choose_tiles(p.num_rows, cfg.num_experts, True)}
        if sweep:
            per = p.num_rows / max(1, min(p.num_rows, cfg.num_experts))
            for name, fn in (("gemm1", gemm1), ("gemm2", gemm2)):
                timed = []
                for tiles in candidates(per):
                    try:
                        timed.append((triton.testing.do_bench(lambda: fn(tiles), return_mode="median") / 1e3, tiles))
                    except Exception as e:  # a shape the compiler rejects (e.g. out of shared memory)
                        print(f"  {name} {tiles}: {type(e).__name__}", flush=True)
                timed.sort(key=lambda x: x[0])
                default = triton.testing.do_bench(lambda: fn(), return_mode="median") / 1e3
                print(f"  tokens {tokens} {name}: default {default * 1e6:.1f} us; best "
                      + "; ".join(f"{s * 1e6:.1f} us {t}" for s, t in timed[:3]), flush=True)
                row[f"{name}_best"] = timed[0] if timed else None
        results.append(row)
        print(format_row(row, bw, mm), flush=True)
    return results


def format_row(r: dict, bw: float, mm: float) -> str:
    s, g = r["seconds"], r["gemm_seconds"]
    return (f"| {r['model']} | {r['tokens']} | {r['experts']} | {r['bytes'] / 1e6:.1f} | {s * 1e6:.1f} | "
            f"{r['bytes'] / s / 1e12:.2f} | {100 * r['bytes'] / s / bw:.1f}% | {r['flops'] / s / 1e12:.1f} | "
            f"{100 * r['flops'] / s / mm:.1f}% | {g * 1e6:.1f} | {100 * r['bytes'] / g / bw:.1f}% | "
            f"{100 * r['flops'] / g / mm:.1f}% |")


HEADER = ("| model | tokens | experts | MB touched | time µs | TB/s | % copy BW | TFLOP/s | % matmul | "
          "GEMMs alone µs | % copy BW | % matmul |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    ap.add_argument("--sweep", action="store_true", help="time each GEMM over candidate tile shapes")
    args = ap.parse_args()
    bw, mm = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    rows = run(bw, mm, args.model, args.tokens, args.sweep)
    print(HEADER)
    for r in rows:
        print(format_row(r, bw, mm))


if __name__ == "__main__":
    main()
