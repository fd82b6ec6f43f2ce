"""Where a decode step's GPU time goes: kernels of dummy gpt-oss-20b decode steps (CUDA-graph
replays, as the engine runs them) grouped by kernel name, per step, under torch.profiler.

    python scripts/profile_decode.py --model gpt-oss-20b --batch 1 --context 1024
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from runtime.engine import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="profile without CUDA graphs")
    args = ap.parse_args()
    llm = LLM("dummy", model=args.model, max_batch_size=max(args.batch), kv_cache_tokens=1 << 20,
              enforce_eager=args.eager)
    for batch in args.batch:
        prompts = [torch.randint(0, 199998, (args.context,)).tolist() for _ in range(batch)]
        one, total = kernel_times(llm, prompts, 1), kernel_times(llm, prompts, args.steps + 1)
        # The difference is `steps` decode steps alone: the prefill step is in both.
        decode = {name: (total[name][0] - one.get(name, (0, 0))[0], total[name][1] - one.get(name, (0, 0))[1])
                  for name in total}
        busy = sum(us for us, _ in decode.values())
        wall = (wall_seconds(llm, prompts, args.steps + 1) - wall_seconds(llm, prompts, 1)) * 1e6
        print(f"\n{args.model} batch {batch} context {args.context}{' eager' if args.eager else ''}: "
              f"GPU busy {busy / args.steps:,.0f} us per decode step, wall {wall / args.steps:,.0f} us "
              f"(GPU idle {(wall - busy) / args.steps:,.0f} us: host work not overlapped, launch gaps)")
        print("| kernel | us/step | share | launches/step |\n|---|---:|---:|---:|")
        for name, (us, n) in sorted(decode.items(), key=lambda kv: -kv[1][0])[:18]:
            print(f"| {name[:80]} | {us / args.steps:,.1f} | {100 * us / busy:.1f}% | {n / args.steps:.1f} |")


def requests(prompts: list[list[int]], tokens: int) -> list[dict]:
    return [{"id": i, "prompt_token_ids": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            for i, p in enumerate(prompts)]


def wall_seconds(llm: LLM, prompts: list[list[int]], tokens: int, repeat: int = 3) -> float:
    """Median wall time of one generate of `tokens` tokens per prompt, without the profiler."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(requests(prompts, tokens))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
