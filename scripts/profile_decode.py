"""Where a decode step's GPU time goes: kernels of dummy gpt-oss-20b decode steps (CUDA-graph
replays, as the engine runs them) grouped by kernel name, per step, under torch.profiler.

    python scripts/profile_decode.py --model gpt-oss-20b --batch 1 --context 1024
    torchrun --nproc-per-node 2 scripts/profile_decode.py --model gpt-oss-120b   # tp=2, rank 0's kernels
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from parallel import groups
from runtime.engine import LLM
from runtime.options import attribute_of, options


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="profile without CUDA graphs")
    ap.add_argument("--ab", metavar="ENV", default=None,
                    help="also time the decode graph's replays with the switch ENV at 0 and at 1, e.g. "
                         "GPT_OSS_PDL (programmatic dependent launch) or "
                         "GPT_OSS_MOE_MMA_GEMV (the MoE's tensor-core GEMV)")
    args = ap.parse_args()
    # Under torchrun the ranks form one tensor-parallel replica; rank 0 prints.
    world = int(os.environ.get("WORLD_SIZE", 1))
    parallel = groups.init(groups.Layout(tp=world), device_type="cuda")
    llm = LLM("dummy", model=args.model, max_batch_size=max(args.batch), kv_cache_tokens=1 << 20,
              enforce_eager=args.eager, parallel=parallel)
    show = print if parallel.rank == 0 else (lambda *a, **k: None)
    for batch in args.batch:
        gen = torch.Generator().manual_seed(batch)  # the same prompts on every rank
        prompts = [torch.randint(0, 199998, (args.context,), generator=gen).tolist() for _ in range(batch)]
        one, total = kernel_times(llm, prompts, 1), kernel_times(llm, prompts, args.steps + 1)
        # The difference is `steps` decode steps alone: the prefill step is in both.
        decode = {name: (total[name][0] - one.get(name, (0, 0))[0], total[name][1] - one.get(name, (0, 0))[1])
                  for name in total}
        busy = sum(us for us, _ in decode.values())
        host = host_phases(llm, prompts, args.steps + 1, batch)
        show(f"\n{args.model} batch {batch} context {args.context}{' eager' if args.eager else ''}: "
             f"GPU busy {busy / args.steps:,.0f} us per decode step; "
             f"wall per iteration launching {batch} decodes "
             f"(medians, us): " + ", ".join(f"{k} {v:,.0f}" for k, v in host.items()))
        show("| kernel | us/step | share | launches/step |\n|---|---:|---:|---:|")
        for name, (us, n) in sorted(decode.items(), key=lambda kv: -kv[1][0])[:18]:
            show(f"| {name[:80]} | {us / args.steps:,.1f} | {100 * us / busy:.1f}% | {n / args.steps:.1f} |")
        if args.ab and not args.eager:
            show(f"decode graph replay at batch {batch} (GPU time a step, median of 3 x 100 replays, us): "
                 + ", ".join(f"{args.ab}={flag} {us:,.1f}"
                             for flag, us in switch_ab(llm, prompts, batch, args.ab)))


def replay_us(llm: LLM, batch: int, replays: int = 100) -> float:
    """Median GPU microseconds of one replay of the captured batch-`batch` decode graph, replays
    queued back to back (the GPU never waits for the host), timed with CUDA events."""
    graph = llm._graphs._graphs[next(s for s in llm._graphs.sizes if s >= batch)]
    for _ in range(10):
        graph.replay()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    events[0].record()
    for e in events[1:]:
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in zip(events, events[1:]))


def switch_ab(llm: LLM, prompts: list[list[int]], batch: int, env: str) -> list[tuple[str, float]]:
    """(value of the switch `env`, replay_us) with the graphs captured again under each value, alternately."""
    times = collections.defaultdict(list)
    attribute = attribute_of(env)
    for flag in ("0", "1") * 3:
        with options.override(**{attribute: flag == "1"}):
            llm._graphs._graphs.clear()  # captured again on the next decode step, under this flag,
            llm._graphs._memory = None  # in a new memory pool (the old one went with its graphs)
            llm.generate(requests(prompts, 2))
            times[flag].append(replay_us(llm, batch))
    return [(flag, statistics.median(v)) for flag, v in times.items()]


def requests(prompts: list[list[int]], tokens: int) -> list[dict]:
    return [{"id": i, "prompt_token_ids": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            for i, p in enumerate(prompts)]


def host_phases(llm: LLM, prompts: list[list[int]], tokens: int, batch: int) -> dict[str, float]:
    """Wall microseconds of the engine loop's phases in iterations that launch `batch` decodes
    (medians), without the profiler: plan (host: admission and this step's plan), launch (staging,
    the forward's launches and sampling's; returns before the GPU is done), land (waits for the step
    before's tokens, then hands them out) and the whole iteration. The GPU runs one step per
    iteration, so GPU busy beside `iteration` says how long it idles per step."""
    marks: list[tuple[str, float, int]] = []

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            marks.append((name, time.perf_counter(), len(args[0].plan.chunks) if name == "launch" else 0))
            return out
        return wrapper

    originals = llm.scheduler.schedule, llm._launch, llm._land
    llm.scheduler.schedule, llm._launch, llm._land = (
        timed("plan", originals[0]), timed("launch", originals[1]), timed("land", originals[2]))
    try:
        llm.generate(requests(prompts, tokens))
    finally:
        llm.scheduler.schedule, llm._launch, llm._land = originals
    phases = collections.defaultdict(list)
    names = [m[0] for m in marks]
    for i in range(1, len(marks) - 2):
        if names[i - 1:i + 3] != ["land", "plan", "launch", "land"] or marks[i + 1][2] != batch:
            continue
        previous, planned, launched, landed = (m[1] for m in marks[i - 1:i + 3])
        for name, seconds in (("plan", planned - previous), ("launch", launched - planned),
                              ("land", landed - launched), ("iteration", landed - previous)):
            phases[name].append(seconds * 1e6)
    return {name: statistics.median(v) for name, v in phases.items()}


def kernel_times(llm: LLM, prompts: list[list[int]], tokens: int) -> dict[str, tuple[float, int]]:
    """{kernel name: (GPU microseconds, launches)} of one generate of `tokens` tokens per prompt."""
    reqs = requests(prompts, tokens)
    llm.generate(reqs)  # warm-up: compiles and captures
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(reqs)
        torch.cuda.synchronize()
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out[event.name][0] += event.device_time_total
            out[event.name][1] += 1
    return {name: (us, n) for name, (us, n) in out.items()}

if __name__ == "__main__":
    main()
