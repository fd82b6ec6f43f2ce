"""The few-row GEMV (runtime/kernels/linear_triton.py) against torch's linear (cuBLAS) on one GPU.

    python scripts/bench_linear.py [--rows 1 4] [--sweep]

The shapes are gpt-oss's attention projections, bf16 with bias: QKV [5120, 2880] and the output
projection [2880, 4096], and their tp=2 halves [2560, 2880] and [2880, 2048]. Per shape and row
count M: time (CUDA events via triton.testing.do_bench: warm-up, L2 flushed before each repeat, so
the weight comes from HBM as in a decode step; median), TB/s on the bytes the op must move (weight,
bias, x read, output written) and that as a share of the device-to-device copy bandwidth measured in
the same run. The kernel's output is checked against the fp32 reference before it is timed (the
bound of tests/test_linear.py). --sweep also times a grid of (BLOCK_N, BLOCK_K, STAGES,
num_warps) per shape and prints the best next to gemv_config's choice.

A last table times gpt-oss's batch-1 QKV step on the kernel path: the GEMV then rope_qk_triton
(RoPE and the KV-cache store, two launches) against the GEMV with both in its epilogue (`rope=`),
in its default config (rotation pairs, 8 rows a program) and with whole heads a program (BLOCK_N
64: 80 programs); --sweep also sweeps the fused launch's config.
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

from launch.limits import ceilings  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.linear_triton import Rope, gemv_config, linear_gemv  # noqa: E402
from runtime.kernels.rope_triton import rope_qk_triton  # noqa: E402
from runtime.kernels.rope import yarn_frequencies  # noqa: E402

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
    for bn, bk, stages, warps, unroll in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (1, 3),
                                                           (4, 8), (False, True)):
        if 1024 <= bn * bk <= 8192 and bk <= triton.next_power_of_2(k) and (warps == 4 or bn * bk >= 4096) \
                and not (unroll and stages > 1):  # unrolled steps are not pipelined through shared memory
            yield {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages, "num_warps": warps, "UNROLL": unroll}


def sweep(m: int, n: int, k: int, gen, out) -> list[tuple[float, dict]]:
    """Seconds per config, fastest first (configs that fail to compile or launch are skipped)."""
    x, weight, bias = problem(m, n, k, gen)
    timed = []
    for cfg in sweep_configs(m, k):
        try:
            check(x, weight, bias, **cfg)
            timed.append((bench(lambda cfg=cfg: linear_gemv(x, weight, bias, out=out, **cfg), quick=True),
                          cfg))
        except Exception as e:  # noqa: BLE001  (out of resources and the like: report, go on)
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return sorted(timed, key=lambda t: t[0])


def short(cfg: dict) -> str:
    return (f"{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['STAGES']} w{cfg['num_warps']}"
            f"{' u' if cfg.get('UNROLL') else ''}")


def rope_problem(gen: torch.Generator):
    """gpt-oss's batch-1 QKV step: (x, weight, bias, Rope, cache) with the KV pages of one layer."""
    cfg = preset("gpt-oss-20b")
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x, weight, bias = problem(1, (heads + 2 * kv_heads) * d, cfg.hidden_size, gen)
    inv_freq, c = yarn_frequencies(d, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
                                   cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    rope = Rope(torch.tensor([100000], device="cuda"), inv_freq.cuda(), c, d, heads, kv_heads)
    pages = torch.zeros(256, 16, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    return x, weight, bias, rope, (pages, torch.zeros_like(pages), torch.tensor([1234], device="cuda"))


def two_launches(x, weight, bias, rope, cache, out, **config):
    linear_gemv(x, weight, bias, out=out, **config)
    return rope_qk_triton(out, rope.positions, rope.inv_freq, rope.concentration, rope.num_q_heads,
                          rope.num_kv_heads, rope.head_dim, cache=cache)


def check_rope(x, weight, bias, rope, cache, **config) -> None:
    """The fused launch against the two: within 3 bf16 roundings of c (|a| + |b|) for a pair (a, b)."""
    plain = linear_gemv(x, weight, bias, **config).float().unflatten(-1, (-1, rope.head_dim))
    want = torch.empty(1, weight.shape[0], device=x.device, dtype=x.dtype)
    two_launches(x, weight, bias, rope, cache, want, **config)
    got = linear_gemv(x, weight, bias, rope=rope, cache=cache, **config).float()
    a, b = plain.chunk(2, dim=-1)
    scale = (rope.concentration * torch.cat([a.abs() + b.abs()] * 2, dim=-1)).flatten(-2)
    err = (got - want.float()).abs()
    assert bool((err <= 3 * 2.0**-8 * scale + 1e-3).all()), \
        f"linear_gemv(rope=) {config} off by {err.max():.3g}"


def bench_rope(gen, bw: float, sweep_too: bool) -> list[str]:
    """Rows of the QKV + RoPE + cache table (M = 1)."""
    x, weight, bias, rope, cache = rope_problem(gen)
    out = torch.empty(1, weight.shape[0], device="cuda", dtype=torch.bfloat16)
    nbytes = moved_bytes(1, *weight.shape) + 4 * rope.num_kv_heads * rope.head_dim  # + k and v rows stored
    t_two = bench(lambda: two_launches(x, weight, bias, rope, cache, out))
    rows = [f"| gemv + rope_qk_triton | default | {t_two * 1e6:.1f} | "
            f"{100 * nbytes / t_two / bw:.0f}% | 1.00x |"]
    timed = []
    for name, cfg in [("fused", {}), ("fused, whole heads", {"BLOCK_N": 64, "BLOCK_K": 64})]:
        timed.append((name, cfg, time_fused(x, weight, bias, rope, cache, out, cfg)))
    if sweep_too:
        swept = [("fused, swept", cfg, time_fused(x, weight, bias, rope, cache, out, cfg, quick=True))
                 for cfg in sweep_configs(1, weight.shape[1])]
        timed += sorted((row for row in swept if row[2] is not None), key=lambda row: row[2])[:3]
    for name, cfg, t in timed:
        if t is not None:
            shown = short({**gemv_config(1, *weight.shape), **cfg})
            rows.append(f"| {name} | {shown} | {t * 1e6:.1f} | {100 * nbytes / t / bw:.0f}% | "
                        f"{t_two / t:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def time_fused(x, weight, bias, rope, cache, out, cfg: dict, quick: bool = False) -> float | None:
    """Seconds of the fused launch in config cfg, checked first; None where it fails to compile or launch."""
    try:
        check_rope(x, weight, bias, rope, cache, **cfg)
        return bench(lambda: linear_gemv(x, weight, bias, out=out, rope=rope, cache=cache, **cfg),
                     quick=quick)
    except Exception as e:  # noqa: BLE001  (out of resources and the like: report, go on)
        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None


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
            t_gemv = bench(lambda x=x, weight=weight, bias=bias, out=out:
                           linear_gemv(x, weight, bias, out=out))
            nbytes = moved_bytes(m, n, k)
            rows.append(f"| {name} | {n} x {k} | {m} | {t_torch * 1e6:.1f} | {nbytes / t_torch / 1e12:.2f} | "
                        f"{100 * nbytes / t_torch / bw:.0f}% | {t_gemv * 1e6:.1f} | "
                        f"{nbytes / t_gemv / 1e12:.2f} | "
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
    rope_rows = bench_rope(gen, bw, args.sweep)
    print("\n## QKV + RoPE + KV-cache store, M = 1: two launches vs the fused GEMV\n\n"
          "| variant | config | us | % copy | speedup |\n|---|---|---|---|---|")
    print("\n".join(rope_rows))


if __name__ == "__main__":
    main()
