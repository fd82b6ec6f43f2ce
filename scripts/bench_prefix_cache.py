"""The prefix caching issue's measurements on one GPU, one engine load for all of them:

    python scripts/bench_prefix_cache.py --model gpt-oss-20b --json prefix.json

1. The shared-prefix workload (launch.bench mode=throughput preset=prefix2k: 1,000 requests of a
   2,000-token shared prefix, 200 tokens of their own, 256 generated), caching on and off
   alternately for --rounds rounds (the same engine, its scheduler's switch flipped, so no reload;
   each run warms up and then starts from an empty cache, as launch.throughput.run does).
2. Time to first token of a --ttft-token prompt, cold and with its first --cached tokens left in the
   cache by another prompt (launch/bench.py timed_generate and timed_cached_ttft).
3. A Harmony chat file with one system message (launch.throughput's chat workload): the share of
   prompt tokens the cache served.
4. Batch-1 decode tokens/s (128-token prompt, 128 tokens) with caching on and off: what the
   scheduler's bookkeeping costs a single stream.
"""

from __future__ import annotations

import argparse
import json
import statistics

from launch import bench, throughput
from runtime.engine import LLM


def shared_prefix_runs(llm: LLM, args) -> dict:
    work = throughput.Workload("random", args.isl, args.osl, args.requests, prefix=args.prefix)
    runs = {True: [], False: []}
    for _ in range(args.rounds):
        for caching in (True, False):
            llm.scheduler.prefix_caching = caching
            runs[caching].append(throughput.run(llm, work, args.model))
            print(f"caching {'on' if caching else 'off'}: {runs[caching][-1]['seconds']:.1f} s", flush=True)
    llm.scheduler.prefix_caching = True
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--isl", type=int, default=200)
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttft", type=int, default=32768)
    ap.add_argument("--cached", type=int, default=31744)
    ap.add_argument("--chat-requests", type=int, default=512)
    ap.add_argument("--chat-isl", type=int, default=512)
    ap.add_argument("--chat-osl", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shared-prefix-only", action="store_true",
                    help="only part 1 (for a large model within one device call)")
    args = ap.parse_args()
    llm = LLM("dummy", model=args.model, device=args.device)
    runs = shared_prefix_runs(llm, args)
    if args.shared_prefix_only:
        report_shared_prefix(llm, args, runs)
        return
    cold = bench.timed_generate(llm, 1, args.ttft, 1, 3)
    warm = bench.timed_cached_ttft(llm, args.ttft, args.cached, 3)
    chat = throughput.run(llm, throughput.Workload("chat", args.chat_isl, args.chat_osl, args.chat_requests),
                          args.model)
    decode = {}
    for caching in (True, False, True, False):
        llm.scheduler.prefix_caching = caching
        one, full = (bench.timed_generate(llm, 1, 128, n, 3) for n in (1, 129))
        decode.setdefault(caching, []).append(128 / (full - one))
    llm.scheduler.prefix_caching = True
    report = report_shared_prefix(llm, args, runs)
    report.update({"ttft_s": cold, "cached_ttft_s": warm, "chat": chat, "batch1_decode": decode})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"| time to first token, {args.ttft:,} tokens | {warm:.3f} s with {args.cached:,} cached | "
          f"{cold:.3f} s cold | {100 * warm / cold:.1f}% |")
    print(f"| Harmony chats ({args.chat_requests} requests, one system message): prompt tokens from the "
          f"cache | {chat['cached_prompt_tokens']:,} of {chat['prompt_tokens']:,} "
          f"({100 * chat['prefix_hit_rate']:.1f}%) | | |")
    print(f"| batch-1 decode tokens/s | {', '.join(f'{r:.1f}' for r in decode[True])} | "
          f"{', '.join(f'{r:.1f}' for r in decode[False])} | "
          f"{statistics.median(decode[True]) / statistics.median(decode[False]):.3f} |")


def report_shared_prefix(llm: LLM, args, runs: dict) -> dict:
    """The shared-prefix rows of the table (printed), and the report they come from (json with
    --shared-prefix-only; the caller adds the other parts)."""
    rate = {on: [r["output_tokens_per_s_per_gpu"] for r in runs[on]] for on in runs}
    seconds = {on: [r["seconds"] for r in runs[on]] for on in runs}
    speedup = statistics.median(seconds[False]) / statistics.median(seconds[True])
    report = {"model": args.model, "device": runs[True][0]["device"], "args": vars(args),
              "shared_prefix": {str(on): runs[on] for on in runs}, "speedup": speedup}
    if args.json and args.shared_prefix_only:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    on = runs[True][0]
    print(f"{args.model} on {report['device']}: {args.requests:,} requests of a {args.prefix:,}-token shared "
          f"prefix + {args.isl} own tokens, {args.osl} generated; max_batch_size {llm.max_batch_size}, "
          f"max_batch_tokens {llm.max_batch_tokens:,}")
    print("| measurement | caching on (runs) | caching off (runs) | on / off |\n|---|---|---|---:|")
    print(f"| seconds | {', '.join(f'{s:.1f}' for s in seconds[True])} | "
          f"{', '.join(f'{s:.1f}' for s in seconds[False])} | {speedup:.2f}x faster |")
    print(f"| output tokens/s per GPU | {', '.join(f'{r:,.0f}' for r in rate[True])} | "
          f"{', '.join(f'{r:,.0f}' for r in rate[False])} | |")
    print(f"| prompt tokens from the cache | {on['cached_prompt_tokens']:,} of {on['prompt_tokens']:,} "
          f"({100 * on['prefix_hit_rate']:.1f}%) | 0 | |")
    return report

if __name__ == "__main__":
    main()
