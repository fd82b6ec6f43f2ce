"""The fused small kernels on one GPU against their torch references: add + RMSNorm, and RoPE on q/k.

    python scripts/bench_fused.py [--model gpt-oss-20b] [--rows 1 64 4096 16384]

Per op and row count: time (CUDA events via triton.testing.do_bench: warm-up, L2 flushed before
each repeat, median), GB/s on the bytes the op must move (read + written, the same count for the
kernel and the torch version), and that as a share of the device-to-device copy bandwidth measured
in the same run. Every kernel output is checked against the reference (bf16 tolerances of
tests/test_rope.py) before it is timed. A markdown table comes last.

Bytes counted, bf16 activations: add_rms_norm reads x, delta and the fp32 gain and writes the
residual and the normed rows; rope_qk reads and writes the q and k heads and reads the positions
(int64) and inv_freq (v is not touched). "torch, tables given" is rope as the model runs it per
layer: cos/sin built once per step and passed in, so only the split and rotation are timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.limits import ceilings  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.rmsnorm_triton import add_rms_norm_triton  # noqa: E402
from runtime.kernels.rope_triton import rope_qk_triton  # noqa: E402
from runtime.kernels.rmsnorm import add_rms_norm  # noqa: E402
from runtime.kernels.rope import apply_rope, cos_sin, rope_qk, yarn_frequencies  # noqa: E402

ROWS = (1, 64, 4096, 16384)
BF16_U = 2.0**-8  # bf16 unit roundoff


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, in bytes/s counting read + write."""
    return ceilings(torch.device("cuda"))["copy_bytes_per_s"]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median") / 1e3


def check_add_rms_norm(x, delta, gain, eps) -> None:
    residual, normed = add_rms_norm_triton(x, delta, gain, eps)
    want_residual, want_normed = add_rms_norm(x, delta, gain, eps)
    assert torch.equal(residual, want_residual), "residual differs from x + delta"
    diff = (normed.float() - want_normed.float()).abs()
    assert (diff <= 2 * BF16_U * want_normed.float().abs()).all(), f"normed off by {diff.max():.3g}"


def check_rope_qk(qkv, positions, inv_freq, c, heads, kv_heads, head_dim) -> None:
    want = torch.cat(rope_qk(qkv, positions, inv_freq, c, heads, kv_heads, head_dim)[:2], dim=1).float()
    a, b = qkv.unflatten(-1, (-1, head_dim))[:, :heads + kv_heads].float().chunk(2, dim=-1)
    scale = c * torch.cat([a.abs() + b.abs()] * 2, dim=-1)
    got = torch.cat(rope_qk_triton(qkv.clone(), positions, inv_freq, c, heads, kv_heads, head_dim)[:2], dim=1)
    err = (got.float() - want).abs() / scale.clamp_min(1e-30)
    assert (err <= 4.1 * BF16_U).all(), f"rope off by {err.max() / BF16_U:.2f} bf16 roundoffs of c(|a| + |b|)"


def time_add_rms_norm(cfg, rows: int, gain, gen, device) -> dict[str, tuple[float, int]]:
    """{impl: (seconds, bytes moved)} for one row count, after checking the kernel."""
    eps = cfg.rms_norm_eps
    x = torch.randn(rows, cfg.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    delta = torch.randn(rows, cfg.hidden_size, generator=gen, device=device).to(torch.bfloat16)
    check_add_rms_norm(x, delta, gain, eps)
    nbytes = 4 * x.numel() * x.element_size() + gain.numel() * gain.element_size()
    residual, normed = torch.empty_like(x), torch.empty_like(x)
    return {
        "triton": (bench(lambda: add_rms_norm_triton(x, delta, gain, eps, residual_out=residual,
                                                     normed_out=normed)),
                   nbytes),
        "torch": (bench(lambda: add_rms_norm(x, delta, gain, eps)), nbytes),
    }


def time_rope_qk(cfg, rows: int, inv_freq, c: float, gen, device) -> dict[str, tuple[float, int]]:
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = torch.randn(rows, cfg.qkv_width, generator=gen, device=device).to(torch.bfloat16)
    positions = torch.randint(0, cfg.max_position_embeddings, (rows,), generator=gen, device=device)
    check_rope_qk(qkv, positions, inv_freq, c, heads, kv_heads, head_dim)
    nbytes = (2 * rows * (heads + kv_heads) * head_dim * qkv.element_size() + positions.numel() * 8
              + inv_freq.numel() * 4)
    cos, sin = cos_sin(positions, inv_freq, c, qkv.dtype)

    def per_layer():
        q, k, _ = qkv.split([cfg.q_width, cfg.kv_width, cfg.kv_width], dim=-1)
        return (apply_rope(q.unflatten(-1, (-1, head_dim)), cos, sin),
                apply_rope(k.unflatten(-1, (-1, head_dim)), cos, sin))

    return {
        # In place, so each repeat rotates the last one's output: concentration 1 keeps the values'
        # size steady over thousands of repeats (the time does not depend on it).
        "triton": (bench(lambda: rope_qk_triton(qkv, positions, inv_freq, 1.0, heads, kv_heads, head_dim)),
                   nbytes),
        "torch": (bench(lambda: rope_qk(qkv, positions, inv_freq, c, heads, kv_heads, head_dim)), nbytes),
        "torch, tables given": (bench(per_layer), nbytes),
    }


def run(ceilings, model: str = "gpt-oss-20b", row_counts=ROWS, device: str = "cuda") -> list[dict]:
    """Time both ops at each row count. ceilings: (copy bandwidth in bytes/s, ...), e.g. the tuple
    bench_moe.ceilings() returns; only the first entry is used. One dict per (op, rows, impl)."""
    bw = ceilings[0]
    cfg = preset(model)
    inv_freq, c = yarn_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                   cfg.initial_context_length, cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    inv_freq = inv_freq.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    gain = torch.randn(cfg.hidden_size, generator=gen, device=device)  # fp32, as the model holds norm.scale
    results = []
    for rows in row_counts:
        for op, timed in (("add_rms_norm", time_add_rms_norm(cfg, rows, gain, gen, device)),
                          ("rope_qk", time_rope_qk(cfg, rows, inv_freq, c, gen, device))):
            for impl, (seconds, nbytes) in timed.items():
                r = {"op": op, "model": model, "rows": rows, "impl": impl, "seconds": seconds,
                     "bytes": nbytes, "GBps": nbytes / seconds / 1e9, "pct_copy": 100 * nbytes / seconds / bw}
                results.append(r)
                print(format_row(r), flush=True)
    return results


def format_row(r: dict) -> str:
    return (f"| {r['op']} | {r['model']} | {r['rows']} | {r['impl']} | {r['seconds'] * 1e6:.1f} | "
            f"{r['bytes'] / 1e6:.2f} | {r['GBps']:.0f} | {r['pct_copy']:.1f}% |")


HEADER = ("| op | model | rows | impl | time µs | MB moved | GB/s | % copy BW |\n"
          "|---|---|---:|---|---:|---:|---:|---:|")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fused.py times CUDA kernels: no GPU here")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + written)", flush=True)
    results = run((bw,), args.model, args.rows)
    print(HEADER)
    for r in results:
        print(format_row(r))


if __name__ == "__main__":
    main()
