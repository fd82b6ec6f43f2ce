"""What structured outputs cost a batch (the OpenAI Batch issue's measurement), one engine load:

    python scripts/bench_structured.py --model gpt-oss-20b --json structured.json

A batch of --requests raw prompts, half of them constrained by a JSON schema (an extraction-like
object of --items records, every string and number bounded, so that even dummy weights finish it),
the other half free (--free-tokens tokens each). Two runs, alternately for --rounds rounds:

- mixed: the half with the schema, beside the free half;
- free: the same batch with no schema, each former constrained request generating as many tokens as
  it did under its schema (ignore_eos), so both runs produce the same tokens per request.

Reported: output tokens/s of each run (the batch's throughput loss), and the time the free half took
to finish in each (what unconstrained requests lose beside constrained ones), medians over rounds.
With --profile, one more run of each under torch.profiler: the GPU's kernel time and its idle time
(wall minus the union of kernel intervals), and the kernels whose time differs most, which says
whether what the free rows lose is GPU work or the GPU waiting for the host.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import time

import torch

from runtime.engine import LLM


def record_schema(items: int) -> dict:
    record = {"type": "object", "additionalProperties": False, "required": ["name", "score", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "score": {"type": "integer", "minimum": 0, "maximum": 100},
                             "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                      "maxItems": 3}}}
    return {"type": "object", "additionalProperties": False, "required": ["records"],
            "properties": {"records": {"type": "array", "items": record, "minItems": items,
                                       "maxItems": items}}}


def prompts(n: int, isl: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 150000) for _ in range(isl)] for _ in range(n)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llm: LLM, requests: list[dict], free_ids: set) -> dict:
    """One generate call: seconds, output tokens, and when the last free request finished."""
    sync()
    start = time.perf_counter()
    free_done = [0.0]

    def on_result(result):
        if result.id in free_ids:
            free_done[0] = time.perf_counter() - start

    results = llm.generate(requests, on_result=on_result)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "free_seconds": free_done[0], "results": results}


def host_timers(llm: LLM) -> dict:
    """Wrap the engine's host-side parts (on this instance only) to sum their wall ms: the masks'
    computation, landing a step (its wait for the GPU included) and planning one."""
    from runtime import structured

    totals = collections.defaultdict(float)

    def timer(name, fn):
        def timed_call(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += (time.perf_counter() - begin) * 1e3
        return timed_call

    structured.fill_bitmasks = timer("masks (fill_bitmasks)", structured.fill_bitmasks)
    for name in ("_land", "_schedule", "_sample", "_start"):
        setattr(llm, name, timer(name, getattr(llm, name)))
    return totals


def profiled(llm: LLM, requests: list[dict]) -> dict:
    """One generate under torch.profiler: wall ms, GPU busy ms (union of kernel intervals), the GPU
    ms and launches of each kernel name, and the host's ms in the engine's parts (host_timers)."""
    from torch.profiler import ProfilerActivity, profile

    from runtime import structured

    fill = structured.fill_bitmasks
    host = host_timers(llm)
    sync()
    start = time.perf_counter()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(requests)
            sync()
    finally:
        structured.fill_bitmasks = fill
        for name in ("_land", "_schedule", "_sample", "_start"):
            delattr(llm, name)
    wall = (time.perf_counter() - start) * 1e3
    spans, names = [], collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((event.time_range.start, event.time_range.end))
            names[event.name][0] += event.device_time / 1e3
            names[event.name][1] += 1
    busy, reach = 0.0, float("-inf")
    for begin, end in sorted(spans):  # the union of the intervals, in us
        if end > reach:
            busy += end - max(begin, reach)
            reach = end
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    return {"wall_ms": wall, "kernel_span_ms": (last - first) / 1e3, "busy_ms": busy / 1e3,
            "kernels": {name: tuple(v) for name, v in names.items()}, "host_ms": dict(host)}


def profile_table(mixed: dict, free: dict) -> str:
    parts = sorted(set(mixed["host_ms"]) | set(free["host_ms"]))
    lines = ["| profiled run | wall ms | first to last kernel ms | GPU busy ms | GPU idle ms | "
             + " | ".join(f"host: {p} ms" for p in parts) + " |", "|---|" + "---:|" * (4 + len(parts))]
    for kind, p in (("mixed", mixed), ("free", free)):
        lines.append(f"| {kind} | {p['wall_ms']:,.1f} | {p['kernel_span_ms']:,.1f} | {p['busy_ms']:,.1f} | "
                     f"{p['kernel_span_ms'] - p['busy_ms']:,.1f} | "
                     + " | ".join(f"{p['host_ms'].get(part, 0.0):,.1f}" for part in parts) + " |")
    names = set(mixed["kernels"]) | set(free["kernels"])
    def ms(run, name):
        return run["kernels"].get(name, (0.0, 0))[0]

    delta = sorted(names, key=lambda n: -abs(ms(mixed, n) - ms(free, n)))
    lines += ["", "| kernel (largest differences) | mixed ms (launches) | free ms (launches) |",
              "|---|---:|---:|"]
    for name in delta[:12]:
        m, f = mixed["kernels"].get(name, (0.0, 0)), free["kernels"].get(name, (0.0, 0))
        lines.append(f"| {name[:70]} | {m[0]:.2f} ({m[1]}) | {f[0]:.2f} ({f[1]}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--isl", type=int, default=512)
    ap.add_argument("--free-tokens", type=int, default=256)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="also profile one run of each (see above)")
    args = ap.parse_args()
    if args.profile and not args.device.startswith("cuda"):
        ap.error("--profile reads CUDA kernels: it needs --device cuda")
    llm = LLM("dummy", model=args.model, device=args.device, enable_prefix_caching=False)
    schema = {"type": "json_schema", "json_schema": {"name": "records", "schema": record_schema(args.items)}}
    tokens = prompts(args.requests, args.isl)
    half = args.requests // 2
    free = [{"id": f"free{i}", "prompt_token_ids": tokens[i], "max_tokens": args.free_tokens,
             "temperature": 0, "ignore_eos": True} for i in range(half, args.requests)]
    free_ids = {r["id"] for r in free}
    constrained = [{"id": f"json{i}", "prompt_token_ids": tokens[i], "max_tokens": 2048, "temperature": 0,
                    "response_format": schema} for i in range(half)]
    first = timed(llm, constrained + free, free_ids)  # warm-up: compiles, and fixes the lengths
    lengths = {r.id: len(r.token_ids) for r in first["results"]}
    valid = sum(r.finish_reason == "stop" and isinstance(json.loads(r.text), dict)
                for r in first["results"][:half])
    unconstrained = [{"id": r["id"], "prompt_token_ids": r["prompt_token_ids"],
                      "max_tokens": lengths[r["id"]], "temperature": 0, "ignore_eos": True}
                     for r in constrained]
    timed(llm, unconstrained + free, free_ids)  # warm-up
    runs = {"mixed": [], "free": []}
    for _ in range(args.rounds):
        runs["mixed"].append(timed(llm, constrained + free, free_ids))
        runs["free"].append(timed(llm, unconstrained + free, free_ids))
    for kind in runs:
        for run in runs[kind]:
            del run["results"]
    med = {kind: {key: statistics.median(r[key] for r in runs[kind])
                  for key in ("tokens_per_s", "free_seconds")} for kind in runs}
    loss = 1 - med["mixed"]["tokens_per_s"] / med["free"]["tokens_per_s"]
    free_loss = 1 - med["free"]["free_seconds"] / med["mixed"]["free_seconds"]
    profiles = None
    if args.profile:
        profiles = {"mixed": profiled(llm, constrained + free), "free": profiled(llm, unconstrained + free)}
    device = torch.cuda.get_device_name() if llm.device.type == "cuda" else str(llm.device)
    report = {"model": args.model, "device": device, "args": vars(args), "runs": runs,
              "medians": med, "batch_throughput_loss": loss, "free_requests_loss": free_loss,
              "constrained_valid": valid, "constrained_tokens": [lengths[r["id"]] for r in constrained],
              "profiles": profiles}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    spread = {kind: (min(r["tokens_per_s"] for r in runs[kind]), max(r["tokens_per_s"] for r in runs[kind]))
              for kind in runs}
    print(f"{args.model} on {report['device']}: {args.requests} requests ({half} with a JSON schema of "
          f"{args.items} records: {valid}/{half} valid, ended with stop, {min(report['constrained_tokens'])}-"
          f"{max(report['constrained_tokens'])} tokens; {args.requests - half} free of {args.free_tokens} "
          f"tokens), {args.isl}-token prompts, {args.rounds} rounds")
    print("| run | output tokens/s (median; min-max) | free half done at (median s) |\n|---|---:|---:|")
    for kind in runs:
        low, high = spread[kind]
        print(f"| {kind} | {med[kind]['tokens_per_s']:,.0f} ({low:,.0f}-{high:,.0f}) | "
              f"{med[kind]['free_seconds']:.3f} |")
    print(f"batch throughput lost to the schema: {100 * loss:.1f}% (target <= 5%); the free half's: "
          f"{100 * free_loss:.1f}% (target < 3%)")
    if profiles:
        print(profile_table(profiles["mixed"], profiles["free"]))


if __name__ == "__main__":
    main()
