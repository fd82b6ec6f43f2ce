"""Where an offline batch's time goes: every step of a throughput run (launch/throughput.py's random
workload on dummy weights) timed on the GPU with CUDA events and classed by what it computed, then
the kernels of a shorter run of the same shape under torch.profiler, grouped by name.

    python scripts/profile_throughput.py --model gpt-oss-20b --isl 1024 --osl 1024 --requests 2048 \
        --max-batch-size 1024 --max-batch-tokens 8192 --profile-requests 1024 --profile-osl 64 \
        --decode-window 300 50

Step classes: decode-only steps replayed from CUDA graphs, steps replayed from the piecewise mixed-step
graphs (runtime/mixed_graphs.py: prompt chunks beside decodes), and steps run eagerly, each with its
count, GPU milliseconds and tokens. GPU busy
over the wall time says how long the GPU waited for the host.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from launch.throughput import Workload
from runtime.engine import LLM


def step_classes(llm: LLM, requests) -> tuple[dict, float, float]:
    """({class: [steps, GPU ms, tokens, decode rows]}, wall seconds, GPU-busy seconds) of one generate."""
    records = []
    forward = llm._forward

    def timed(plan, *rest):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = forward(plan, *rest)
        end.record()
        decodes = sum(c.length == 1 for c in plan.chunks)
        if llm._graphs is not None and llm._graphs.fits(plan.chunks):
            kind = "decode, graph"
        elif llm._mixed_graphs is not None and llm._mixed_graphs.fits(plan):
            kind = "decode, piecewise graphs" if decodes == len(plan.ids) else "mixed, piecewise graphs"
        else:
            kind = "decode, eager" if decodes == len(plan.ids) else "mixed, eager"
        records.append((start, end, len(plan.ids), decodes, kind))
        return out

    llm._forward = timed
    try:
        torch.cuda.synchronize()
        wall = time.perf_counter()
        llm.generate(requests)
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    finally:
        llm._forward = forward
    classes = collections.defaultdict(lambda: [0, 0.0, 0, 0])
    busy = 0.0
    for start, end, tokens, decodes, kind in records:
        ms = start.elapsed_time(end)
        busy += ms / 1e3
        c = classes[kind]
        c[0], c[1], c[2], c[3] = c[0] + 1, c[1] + ms, c[2] + tokens, c[3] + decodes
    return dict(classes), wall, busy


class _WindowDone(Exception):
    pass


def kernels(llm: LLM, requests, steps: range | None = None) -> list[tuple[str, float, int]]:
    """(kernel name, GPU ms, launches) of one generate, or of its steps `steps` only, largest first."""
    prof = profile(activities=[ProfilerActivity.CUDA])
    forward, step = llm._forward, [0]

    def windowed(*args):
        if step[0] == steps.start:
            torch.cuda.synchronize()
            prof.start()
        out = forward(*args)
        if step[0] == steps.stop - 1:
            torch.cuda.synchronize()
            prof.stop()
            raise _WindowDone  # the rest of the run is not needed (the engine is not used again)
        step[0] += 1
        return out

    if steps is None:
        with prof:
            llm.generate(requests)
            torch.cuda.synchronize()
    else:
        llm._forward = windowed
        try:
            llm.generate(requests)
            raise SystemExit(f"the run took {step[0]} steps, fewer than the window {steps}")
        except _WindowDone:
            pass
        finally:
            llm._forward = forward
    out = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out[event.name][0] += event.device_time / 1e3
            out[event.name][1] += 1
    return sorted(((name, ms, n) for name, (ms, n) in out.items()), key=lambda r: -r[1])


def print_kernels(title: str, rows: list[tuple[str, float, int]]) -> None:
    total = sum(ms for _, ms, _ in rows)
    print(f"\n{title} ({total / 1e3:.2f} s of kernels)\n"
          "| kernel | ms | share | launches |\n|---|---:|---:|---:|")
    for name, ms, n in rows[:25]:
        print(f"| {name[:90]} | {ms:,.1f} | {100 * ms / total:.1f}% | {n:,} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--max-batch-size", type=int, default=1024)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--profile-requests", type=int, default=1024)
    ap.add_argument("--profile-osl", type=int, default=64)
    ap.add_argument("--decode-window", type=int, nargs=2, metavar=("FIRST", "COUNT"), default=None,
                    help="also the kernels of steps FIRST.. of a --requests run alone (once every prompt "
                         "is in: a steady-state decode step)")
    args = ap.parse_args()
    start = time.perf_counter()
    llm = LLM("dummy", model=args.model, max_batch_size=args.max_batch_size,
              max_batch_tokens=args.max_batch_tokens)
    print(f"{args.model}: loaded in {llm.load_seconds:.1f} s, {len(llm.graph_sizes)} graphs captured in "
          f"{llm.capture_seconds:.1f} s, KV cache {llm.kv_cache_tokens:,} tokens "
          f"({time.perf_counter() - start:.1f} s)")

    def work(requests: int, osl: int):
        cfg = {"isl": args.isl, "osl": osl, "requests": requests, "preset": None}
        return [llm.make_request(o) for o in Workload.from_config(cfg).request_objects(llm.config.vocab_size)]

    llm.generate(work(min(16, args.requests), 4))  # warm-up: the prefill kernels compile
    preempted = llm.preemptions
    classes, wall, busy = step_classes(llm, work(args.requests, args.osl))
    out_tokens = args.requests * args.osl
    print(f"\n{args.requests} requests of {args.isl} + {args.osl} tokens, "
          f"max_batch_size {args.max_batch_size}, max_batch_tokens {args.max_batch_tokens}: "
          f"{wall:.1f} s, {out_tokens / wall:,.0f} output tok/s; "
          f"GPU busy in steps {busy:.1f} s ({100 * busy / wall:.1f}% of the wall); "
          f"{llm.preemptions - preempted} preemptions")
    print("| steps | count | GPU ms a step | tokens a step | decode rows a step | share of GPU time |\n"
          "|---|---:|---:|---:|---:|---:|")
    for kind, (n, ms, tokens, decodes) in sorted(classes.items()):
        print(f"| {kind} | {n:,} | {ms / n:.2f} | {tokens / n:,.0f} | {decodes / n:,.0f} | "
              f"{100 * ms / 1e3 / busy:.1f}% |")
    print_kernels(f"kernels of {args.profile_requests} requests of {args.isl} + {args.profile_osl} tokens",
                  kernels(llm, work(args.profile_requests, args.profile_osl)))
    if args.decode_window:
        first, count = args.decode_window
        print_kernels(f"kernels of steps {first} to {first + count - 1} of {args.requests} requests of "
                      f"{args.isl} + {args.osl} tokens (the decode phase)",
                      kernels(llm, work(args.requests, args.osl), range(first, first + count)))


if __name__ == "__main__":
    main()
