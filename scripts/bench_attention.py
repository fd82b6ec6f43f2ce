"""Paged attention on one GPU: the Triton kernels at gpt-oss shapes, against ceilings measured in the same run.

    python scripts/bench_attention.py [--sweep]

bf16, 64 query heads, 8 KV heads, head_dim 64, page size 16, pages shuffled through the pool.
Decode rows: TB/s on the K/V bytes read (visible keys x KVH x D x 2 bytes, for K and for V).
Prefill rows: TFLOP/s counting 4 * D * H per visible (query, key) pair, so causal halving is exact.
Percentages are of the device-to-device copy bandwidth (bytes read + written) and the bf16 8192^3
torch.matmul rate. Times: CUDA events around each call, after warm-up, median of the repeats; no
cache flush. --sweep also times a few tile / warp / stage / split settings per case and prints the
best, for tuning the defaults in runtime/kernels/attention_triton.py. The last output is a
markdown table; `run(ceilings)` returns its rows for a combined benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.bench import ceilings as measure_ceilings  # noqa: E402
from runtime.kernels.attention_triton import choose_num_splits, paged_attention_triton  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, WINDOW = 64, 8, 64, 16, 128

# (name, sequences as (q_start, n), sliding?). Decode queries sit at the end of their context.
CASES = [
    *[(f"decode b1 ctx {c // 1024}k", [(c - 1, 1)], sliding)
      for c in (32768, 65536, 131072) for sliding in (False, True)],
    *[("decode b64 ctx 4k", [(4095, 1)] * 64, sliding) for sliding in (False, True)],
    *[(f"prefill {n}", [(0, n)], sliding) for n in (4096, 16384) for sliding in (False, True)],
]


def time_cuda(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median seconds of fn() by CUDA events, one pair per call."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def ceilings() -> dict:
    """{"copy_bytes_per_s": device-to-device copy, read + written; "matmul_flops": bf16 8192^3 matmul}."""
    return measure_ceilings(torch.device("cuda"))


def visible_pairs(seqs, window: int | None) -> int:
    """(query, key) pairs the masks let through: a query at t sees t + 1 keys, or min(t + 1, W)."""
    total = 0
    for start, n in seqs:
        for t in range(start, start + n):
            total += t + 1 if window is None else min(t + 1, window)
    return total


def keys_read(start: int, n: int, window: int | None) -> int:
    """Distinct keys a sequence's step must read: from its first query's oldest visible key to its last."""
    first = 0 if window is None else max(0, start - window + 1)
    return start + n - first


def make_inputs(seqs, device="cuda", dtype=torch.bfloat16):
    """Random q and a paged pool holding every sequence's keys, pages assigned in shuffled order."""
    pages_per_seq = [-(-(start + n) // PAGE) for start, n in seqs]
    num_pages = sum(pages_per_seq)
    k_pages = torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_pages = torch.randn_like(k_pages)
    order = torch.randperm(num_pages, device=device, dtype=torch.int32)
    block_table = torch.zeros(len(seqs), max(pages_per_seq), dtype=torch.int32, device=device)
    used = 0
    for s, count in enumerate(pages_per_seq):
        block_table[s, :count] = order[used:used + count]
        used += count
    lengths = torch.tensor([n for _, n in seqs])
    cu_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(lengths, 0)
    q = torch.randn(int(cu_q[-1]), HEADS, HEAD_DIM, device=device, dtype=dtype)
    q_start = torch.tensor([start for start, _ in seqs], dtype=torch.int32, device=device)
    sinks = torch.randn(HEADS, device=device)
    return q, k_pages, v_pages, block_table, cu_q.to(device), q_start, sinks


def sweep_settings(decode: bool, sliding: bool, auto_splits: int):
    """A few settings around the defaults (block_m stays 128 rows for prefill, 16 for decode)."""
    settings = [{"block_n": bn, "num_warps": w, "num_stages": st}
                for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
    if decode and not sliding:
        settings += [{"num_splits": max(1, auto_splits * f // 4)} for f in (1, 2, 8, 16)]
    return settings


def run(ceilings: dict, sweep: bool = False, cases=CASES) -> list[dict]:
    """One row per case: time, and achieved TB/s (decode) or TFLOP/s (prefill) with their % of the ceilings."""
    rows = []
    for name, seqs, sliding in cases:
        window = WINDOW if sliding else None
        inputs = make_inputs(seqs)
        q = inputs[0]
        out = torch.empty_like(q)
        max_q_len = max(n for _, n in seqs)
        max_k_len = max(start + n for start, n in seqs)
        hints = {"sm_scale": HEAD_DIM ** -0.5, "window": window, "out": out, "max_q_len": max_q_len,
                 "max_k_len": max_k_len}  # the host-side hints spare the timed call a device sync

        def call(inputs=inputs, hints=hints, **kw):
            return paged_attention_triton(*inputs, **hints, **kw)

        seconds = time_cuda(call)
        pairs = visible_pairs(seqs, window)
        decode = max_q_len == 1
        kv_bytes = sum(keys_read(start, n, window) for start, n in seqs) * KV_HEADS * HEAD_DIM * 2 * 2
        flops = 4 * HEAD_DIM * HEADS * pairs
        row = {"case": name, "layer": "sliding 128" if sliding else "full", "us": seconds * 1e6,
               "TB/s": kv_bytes / seconds / 1e12, "%copy": 100 * kv_bytes / seconds / ceilings["copy_bytes_per_s"],
               "TFLOP/s": flops / seconds / 1e12, "%mm": 100 * flops / seconds / ceilings["matmul_flops"],
               "kind": "decode" if decode else "prefill"}
        if sweep:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            auto = choose_num_splits(len(seqs) * KV_HEADS, max_k_len, sms) if decode else 1
            timed = []
            for setting in sweep_settings(decode, sliding, auto):
                try:
                    timed.append((time_cuda(lambda s=setting: call(**s), warmup=3, reps=15), setting))
                except Exception as e:  # e.g. shared memory exceeded by a large tile with many stages
                    print(f"  {setting}: {type(e).__name__}", flush=True)
            best = min(timed, key=lambda x: x[0])
            row["best us"], row["best setting"] = best[0] * 1e6, best[1]
        rows.append(row)
        metric = f"{row['TB/s']:.2f} TB/s ({row['%copy']:.0f}% copy)" if decode else \
            f"{row['TFLOP/s']:.0f} TFLOP/s ({row['%mm']:.0f}% mm)"
        print(f"{name:>20} {row['layer']:>10}: {row['us']:9.1f} us  {metric}"
              + (f"  best {row['best us']:.1f} us with {row['best setting']}" if sweep else ""), flush=True)
    return rows


def markdown(rows: list[dict], ceilings: dict) -> str:
    lines = [(f"Ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
              f"{ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name()})"), "",
             "| case | layer | time (us) | TB/s on K/V | % copy | TFLOP/s | % matmul |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        # Decode is judged by bandwidth, prefill by FLOP rate; the other column is shown for context.
        lines.append(f"| {r['case']} | {r['layer']} | {r['us']:.1f} | {r['TB/s']:.2f} | {r['%copy']:.0f} | "
                     f"{r['TFLOP/s']:.1f} | {r['%mm']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="also time tile/warp/stage/split variants per case")
    args = p.parse_args()
    limits = ceilings()
    print(f"copy {limits['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {limits['matmul_flops'] / 1e12:.0f} TFLOP/s",
          flush=True)
    rows = run(limits, sweep=args.sweep)
    print()
    print(markdown(rows, limits))


if __name__ == "__main__":
    main()
