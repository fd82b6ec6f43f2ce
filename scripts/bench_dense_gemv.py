"""The few-row GEMV (runtime/kernels/dense_gemv.py) against torch's linear (cuBLAS) on one GPU.

    python scripts/bench_dense_gemv.py [--rows 1 4] [--sweep]

The shapes are gpt-oss's attention projections, bf16 with bias: QKV [5120, 2880] and the output
projection [2880, 4096], and their tp=2 halves [2560, 2880] and [2880, 2048]. Per shape and row
count M: time (CUDA events via triton.testing.do_bench: warm-up, L2 flushed before each repeat, so
the weight comes from HBM as in a decode step; median), TB/s on the bytes the op must move (weight,
bias, x read, output written) and that as a share of the device-to-device copy bandwidth measured in
the same run. The kernel's output is checked against the fp32 reference before it is timed (the
bound of tests/test_dense_gemv.py). --sweep also times a grid of (BLOCK_N, BLOCK_K, STAGES,
num_warps) per shape and prints the best next to gemv_config's choice.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.bench import ceilings  # noqa: E402
from runtime.kernels.dense_gemv import gemv_config, linear_gemv  # noqa: E402

SHAPES = [("qkv", 5120, 2880), ("out", 2880, 4096), ("qkv tp=2", 2560, 2880), ("out tp=2", 2880, 2048)]
HEADER = ("| shape | N x K | M | cuBLAS us | TB/s | % copy | gemv us | TB/s | % copy | speedup | config |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def bench(fn, quick: bool = False) -> float:
    """Median seconds of fn (L2 flushed before each repeat)."""
    if quick:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def problem(m: int, n: int, k: int, gen: torch.Generator):
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen, device="cuda").to(torch.bfloat16)
    return x, weight, bias


def check(x, weight, bias, **config) -> None:
    want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    got = linear_gemv(x, weight, bias, **config).float()
    err = (got - want).abs()
    bound = want.abs() * 2.0**-8 + 1e-3 * want.abs().max()  # one bf16 rounding + fp32 summation order
    assert bool((err <= bound).all()), f"linear_gemv {config} off by {err.max():.3g}"


def moved_bytes(m: int, n: int, k: int) -> int:
    return 2 * (n * k + n + m * k + m * n)


def sweep_configs(m: int, k: int):
    """(BLOCK_N, BLOCK_K, STAGES, num_warps) with 2-16 KiB of bf16 weight per program per step."""
    for bn, bk, stages, warps in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (1, 3), (4, 8)):
        if 1024 <= bn * bk <= 8192 and bk <= triton.next_power_of_2(k) and (warps == 4 or bn * bk >= 4096):
            yield {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages, "num_warps": warps}


def sweep(m: int, n: int, k: int, gen, out) -> list[tuple[float, dict]]:
    """Seconds per config, fastest first (configs that fail to compile or launch are skipped)."""
    x, weight, bias = problem(m, n, k, gen)
    timed = []
    for cfg in sweep_configs(m, k):
        try:
            check(x, weight, bias, **cfg)
            timed.append((bench(lambda cfg=cfg: linear_gemv(x, weight, bias, out=out, **cfg), quick=True), cfg))
        except Exception as e:  # noqa: BLE001  (out of resources and the like: report, go on)
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return sorted(timed, key=lambda t: t[0])


def short(cfg: dict) -> str:
    return f"{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['STAGES']} w{cfg['num_warps']}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="x rows M (1-4)")
    ap.add_argument("--sweep", action="store_true", help="also try a grid of launch configs per shape")
    args = ap.parse_args()
    bw = ceilings(torch.device("cuda"))["copy_bytes_per_s"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} ({sms} SMs): copy {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, best = [], []
    for name, n, k in SHAPES:
        for m in args.rows:
            x, weight, bias = problem(m, n, k, gen)
            check(x, weight, bias)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t_torch = bench(lambda x=x, weight=weight, bias=bias: torch.nn.functional.linear(x, weight, bias))
            t_gemv = bench(lambda x=x, weight=weight, bias=bias, out=out: linear_gemv(x, weight, bias, out=out))
            nbytes = moved_bytes(m, n, k)
            rows.append(f"| {name} | {n} x {k} | {m} | {t_torch * 1e6:.1f} | {nbytes / t_torch / 1e12:.2f} | "
                        f"{100 * nbytes / t_torch / bw:.0f}% | {t_gemv * 1e6:.1f} | {nbytes / t_gemv / 1e12:.2f} | "
                        f"{100 * nbytes / t_gemv / bw:.0f}% | {t_torch / t_gemv:.2f}x | "
                        f"{short(gemv_config(m, n, k, sms))} |")
            print(rows[-1], flush=True)
            if args.sweep:
                timed = sweep(m, n, k, gen, out)
                for t, cfg in timed[:3]:
                    print(f"  {short(cfg)}: {t * 1e6:.1f} us, {100 * nbytes / t / bw:.0f}% copy", flush=True)
                if timed:
                    t, cfg = timed[0]
                    best.append(f"| {name} | {m} | {t_gemv * 1e6:.1f} ({short(gemv_config(m, n, k, sms))}) | "
                                f"{t * 1e6:.1f} ({short(cfg)}) | {100 * nbytes / t / bw:.0f}% |")
    print(f"\n## Few-row GEMV vs cuBLAS, bf16 with bias\n\n{HEADER}")
    print("\n".join(rows))
    if best:
        print("\n## Sweep: heuristic vs best config\n\n| shape | M | heuristic us | best us | best % copy |\n"
              "|---|---|---|---|---|")
        print("\n".join(best))


if __name__ == "__main__":
    main()
