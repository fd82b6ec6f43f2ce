"""Paged attention on one GPU: the Triton kernels at gpt-oss shapes, against ceilings measured in the
same run.

    python scripts/bench_attention.py [--sweep] [--cases SUBSTRING ...] [--eager]

bf16, 64 query heads, 8 KV heads, head_dim 64, page size 16, pages shuffled through the pool.
Decode rows: TB/s on the K/V bytes read (visible keys x KVH x D x 2 bytes, for K and for V).
Prefill rows: TFLOP/s counting 4 * D * H per visible (query, key) pair, so causal halving is exact.
Percentages are of the device-to-device copy bandwidth (bytes read + written) and the bf16 8192^3
torch.matmul rate.

Times are taken as the model runs the kernels: calls captured back to back in a CUDA graph (enough
to fill ~2 ms, at least one), CUDA events around each replay after warm-up, the median replay
divided by the calls in it. Consecutive calls cycle through copies of the inputs, so a K/V pool
smaller than the L2 cache is not served from it by the call before (as in the model, where each
layer has its own cache); no flush otherwise. --eager times single eager calls instead (host
launch included: at batch 1 that is most of what it measures).

--sweep also times tile / warp / stage / split settings per case, prints each and the best, for
tuning the defaults in runtime/kernels/attention_triton.py; settings that cannot run (shared memory
exceeded) are skipped with the reason. --cases keeps the cases whose "name layer" contains any of
the given substrings (e.g. --cases prefill, --cases "ctx 32k full"). The last output is a markdown
table; `run(ceilings)` returns its rows for a combined benchmark.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.limits import ceilings as measure_ceilings  # noqa: E402
from runtime.kernels.attention_triton import choose_num_splits, paged_attention_triton  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, WINDOW = 64, 8, 64, 16, 128
GRAPH_FILL_S = 2e-3  # a replay long enough that the events' own resolution and gaps do not matter
MAX_COPIES = 4

# (name, sequences as (q_start, n), sliding?). Decode queries sit at the end of their context.
CASES = [
    *[(f"decode b1 ctx {c // 1024}k", [(c - 1, 1)], sliding)
      for c in (32768, 65536, 131072) for sliding in (False, True)],
    *[("decode b64 ctx 4k", [(4095, 1)] * 64, sliding) for sliding in (False, True)],
    *[(f"prefill {n}", [(0, n)], sliding) for n in (4096, 16384) for sliding in (False, True)],
    # Offline batches: decode at large batch, and a mixed step (decodes beside prompt chunks) against
    # its two halves alone (what two launches, decode-shaped and prefill-shaped tiles, would cost).
    *[(f"decode b{b} ctx {c}", [(c - 1, 1)] * b, sliding)
      for b, c in ((1024, 1536), (256, 8192)) for sliding in (False, True)],
    *[(name, seqs, sliding) for name, seqs in (
        ("mixed 512 decodes ctx 1536 + 7 x 1024 prompt",
         [(1535, 1)] * 512 + [(1024 * i, 1024) for i in range(7)]),
        ("mixed half: 512 decodes ctx 1536", [(1535, 1)] * 512),
        ("mixed half: 7 x 1024 prompt", [(1024 * i, 1024) for i in range(7)]))
      for sliding in (False, True)],
]


def layer_name(sliding: bool) -> str:
    return f"sliding {WINDOW}" if sliding else "full"


def select(cases, patterns) -> list:
    """The cases whose "name layer" contains any of the patterns (all of them without patterns)."""
    return [c for c in cases if not patterns or any(p in f"{c[0]} {layer_name(c[2])}" for p in patterns)]


def time_eager(fns, warmup: int = 5, reps: int = 30) -> float:
    """Median seconds of one eager call by CUDA events, one pair per call (host launch included)."""
    calls = itertools.cycle(fns)
    for _ in range(warmup):
        next(calls)()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        next(calls)()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def capture(fns, calls: int) -> torch.cuda.CUDAGraph:
    """A graph of `calls` calls cycling through fns."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in itertools.islice(itertools.cycle(fns), calls):
            fn()
    return graph


def replay_seconds(graph: torch.cuda.CUDAGraph, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def time_graph(fns, warmup: int = 3, reps: int = 20) -> float:
    """Median seconds of one call inside a CUDA graph of back-to-back calls filling ~GRAPH_FILL_S."""
    for fn in fns:  # compiles (a setting that cannot run raises here, outside any capture)
        fn()
    torch.cuda.synchronize()
    one = replay_seconds(capture(fns, len(fns)), warmup, 5) / len(fns)
    calls = max(1, round(GRAPH_FILL_S / one))
    return replay_seconds(capture(fns, calls), warmup, reps) / calls


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


def make_inputs(seqs, device="cuda", dtype=torch.bfloat16, kv_dtype=torch.bfloat16):
    """Random q and a paged pool holding every sequence's keys (stored as kv_dtype), pages assigned in
    shuffled order."""
    pages_per_seq = [-(-(start + n) // PAGE) for start, n in seqs]
    num_pages = sum(pages_per_seq)
    k_pages = torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=dtype).to(kv_dtype)
    v_pages = torch.randn_like(k_pages, dtype=dtype).to(kv_dtype)
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


def input_copies(seqs, kv_bytes: int) -> int:
    """Copies of the inputs that together hold twice the L2 cache, at most MAX_COPIES."""
    pool_bytes = sum(-(-(start + n) // PAGE) for start, n in seqs) * PAGE * KV_HEADS * HEAD_DIM * 2 * kv_bytes
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(MAX_COPIES, -(-2 * l2 // pool_bytes)))


def sweep_settings(decode: bool, auto_splits: int) -> list[dict]:
    """Prefill: rows per program (block_m), keys per tile, warps, stages. Decode (16-row tiles): the
    split count around the heuristic's (x0.5 .. x4), keys per tile, warps, stages."""
    if not decode:
        return [{"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
                for bm in (64, 128, 256) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
    splits = sorted({max(1, int(auto_splits * f)) for f in (0.5, 1, 2, 4)})
    return [{"num_splits": sp, "block_n": bn, "num_warps": w, "num_stages": st}
            for sp in splits for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4)]


def calls(copies, hints: dict, **settings) -> list:
    """One call per input copy, with the given settings."""
    return [functools.partial(paged_attention_triton, *inputs, **hints, **settings) for inputs in copies]


def time_settings(timer, call, decode: bool, auto_splits: int) -> list[tuple[float, dict]]:
    """(seconds, setting) for every setting that runs, fastest first; prints each as it goes."""
    timed = []
    for setting in sweep_settings(decode, auto_splits):
        try:
            seconds = timer(call(**setting))
        except Exception as e:  # e.g. shared memory exceeded by a large tile with many stages
            print(f"    skipped {setting}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}",
                  flush=True)
            continue
        print(f"    {seconds * 1e6:9.1f} us  {setting}", flush=True)
        timed.append((seconds, setting))
    return sorted(timed, key=lambda x: x[0])


def run(ceilings: dict, sweep: bool = False, cases=CASES, eager: bool = False, extra=None,
        kv_dtype=torch.bfloat16) -> list[dict]:
    """One row per case: time, and achieved TB/s (decode) or TFLOP/s (prefill) with their % of the
    ceilings. `extra`: keyword arguments of every call (over the engine's hints); kv_dtype: the
    cache's (torch.float8_e4m3fn: kv_cache_dtype=fp8)."""
    timer = time_eager if eager else time_graph
    rows = []
    for name, seqs, sliding in cases:
        window = WINDOW if sliding else None
        copies = [make_inputs(seqs, kv_dtype=kv_dtype) for _ in range(input_copies(seqs, kv_dtype.itemsize))]
        out = torch.empty_like(copies[0][0])
        max_q_len = max(n for _, n in seqs)
        max_k_len = max(start + n for start, n in seqs)
        decodes = next((i for i, (_, n) in enumerate(seqs) if n != 1), len(seqs))  # as PagedStep counts
        hints = {"sm_scale": HEAD_DIM ** -0.5, "window": window, "out": out, "max_q_len": max_q_len,
                 "max_k_len": max_k_len, "decodes": decodes, **(extra or {})}  # host-side: no device sync
        call = functools.partial(calls, copies, hints)
        decode = max_q_len == 1
        label = f"{name:>20} {layer_name(sliding):>11}"
        if sweep:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            auto = choose_num_splits(len(seqs) * KV_HEADS, max_k_len, sms) if decode else 1
            print(f"{label}: sweep" + (f" (the heuristic's num_splits: {auto})" if decode else ""),
                  flush=True)
        seconds = timer(call())
        pairs = visible_pairs(seqs, window)
        keys = sum(keys_read(start, n, window) for start, n in seqs)
        kv_bytes = keys * KV_HEADS * HEAD_DIM * 2 * kv_dtype.itemsize
        flops = 4 * HEAD_DIM * HEADS * pairs
        row = {"case": name, "layer": layer_name(sliding), "us": seconds * 1e6,
               "TB/s": kv_bytes / seconds / 1e12,
               "%copy": 100 * kv_bytes / seconds / ceilings["copy_bytes_per_s"],
               "TFLOP/s": flops / seconds / 1e12, "%mm": 100 * flops / seconds / ceilings["matmul_flops"],
               "kind": "decode" if decode else "prefill"}
        if sweep:
            timed = time_settings(timer, call, decode, auto)
            if timed:
                row["best us"], row["best setting"] = timed[0][0] * 1e6, timed[0][1]
        rows.append(row)
        metric = f"{row['TB/s']:.2f} TB/s ({row['%copy']:.0f}% copy)" if decode else \
            f"{row['TFLOP/s']:.0f} TFLOP/s ({row['%mm']:.0f}% mm)"
        best = f"  best {row['best us']:.1f} us with {row['best setting']}" if "best us" in row else ""
        print(f"{label}: {row['us']:9.1f} us  {metric}{best}", flush=True)
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
    swept = [r for r in rows if "best us" in r]
    if swept:
        lines += ["", "| case | layer | default (us) | best (us) | best setting |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['layer']} | {r['us']:.1f} | {r['best us']:.1f} | {r['best setting']} |"
                  for r in swept]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="also time tile/warp/stage/split variants per case")
    p.add_argument("--cases", nargs="+", default=[], metavar="SUBSTRING",
                   help='only the cases whose "name layer" contains one of these, e.g. prefill, '
                        '"ctx 32k full"')
    p.add_argument("--eager", action="store_true", help="time single eager calls, not CUDA-graph replays")
    p.add_argument("--one-launch", action="store_true",
                   help="time every case with a mixed step's decodes in the prefill launch too (decodes=0)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="the cache's dtype: bf16, or fp8 (float8 e4m3, the engine's kv_cache_dtype=fp8)")
    p.add_argument("--block-n", type=int, nargs="+", default=[], metavar="KEYS",
                   help="also time every case with KEYS keys per tile (e.g. --cases prefill --block-n 64)")
    args = p.parse_args()
    cases = select(CASES, args.cases)
    if not cases:
        p.error(f"no case matches {args.cases}: "
                + ", ".join(sorted({f'{c[0]} {layer_name(c[2])}' for c in CASES})))
    limits = ceilings()
    print(f"copy {limits['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {limits['matmul_flops'] / 1e12:.0f} TFLOP/s",
          flush=True)
    variants = [{}] + [{"decodes": 0}] * args.one_launch + [{"block_n": n} for n in args.block_n]
    kv_dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[args.kv_dtype]
    for extra in variants:
        rows = run(limits, sweep=args.sweep, cases=cases, eager=args.eager, extra=extra, kv_dtype=kv_dtype)
        print(f"\n{extra or 'defaults'}, {args.kv_dtype} cache:")
        print(markdown(rows, limits))


if __name__ == "__main__":
    main()
