"""The scheduler over a fixed KV pool, without a model: how many preemptions and recomputed tokens a
workload costs under each admission setting, on a CPU in seconds.

    python scripts/simulate_scheduler.py --positions 98448 --requests 192 --isl 1024 --osl 1024 \
        --conservativeness 0 1

The real `Scheduler` and `PagePool` (runtime/scheduler.py, runtime/kv_cache.py) with a fake model that
samples a fixed token a step (no request stops early unless --stop-share says so), the sliding pool
sized as the engine sizes it (`kv_cache.sliding_pool_pages`). The counts are the scheduler's own
(every step is planned as the engine would plan it; one step in flight), so a GPU run of the same
workload with the same KV room makes the same steps; how long each takes is the GPU's business
(prefill tokens cost about what a prompt token costs, decode rows what a decode row costs).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.kv_cache import PAGE_SIZE, PagePool, SequenceKV, pages_for, sliding_pool_pages  # noqa: E402
from runtime.requests import Request  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from runtime.scheduler import Scheduler  # noqa: E402

STOP = 7  # the fake model's stop token, sampled where a request is drawn to stop early


def simulate(positions: int, requests: list[Request], max_batch_size: int, max_batch_tokens: int,
             window: int, conservativeness: float, prefix_caching: bool, stops: dict,
             sliding_pages: int | None = None) -> dict:
    """Run the workload to the end; stops: request id -> the generated count at which it samples STOP;
    sliding_pages: the sliding pool's size (None: as the engine sizes it)."""
    full_pages = pages_for(positions)
    full = PagePool([0], 1, 1, torch.float32, "cpu", num_pages=full_pages, growable=False)
    if sliding_pages is None:
        sliding_pages = sliding_pool_pages(full_pages, window, max_batch_size, max_batch_tokens)
    sliding = PagePool([1], 1, 1, torch.float32, "cpu", num_pages=sliding_pages, growable=False)
    scheduler = Scheduler(full, lambda: SequenceKV(full, sliding, window), max_batch_size=max_batch_size,
                          max_batch_tokens=max_batch_tokens, max_model_len=10**9,
                          prefix_caching=prefix_caching, conservativeness=conservativeness,
                          sliding_pool=sliding, window=window)
    for req in requests:
        scheduler.add(req.id, req)
    in_flight, finished, generated, start = None, 0, 0, time.perf_counter()
    while scheduler.has_unfinished() or in_flight is not None:
        step = scheduler.schedule()
        assert not step.rejected, step.rejected[0].error
        launched = None
        if step.plan.chunks:
            # the row samples the sequence's (generated + pending)-th token: STOP where it is drawn to stop
            pairs = [(float(STOP if len(seq.generated) + seq.pending == stops.get(seq.request.id) else 1),
                      0.0) for seq, _ in step.samples]
            launched = (step.samples, pairs)
        if in_flight is not None:
            done = scheduler.land(*in_flight)
            finished += len(done)
            generated += sum(len(seq.generated) for seq in done)
        in_flight = launched
    stats = scheduler.stats
    return {"steps": stats.steps, "preemptions": scheduler.preemptions,
            "preempted_tokens": scheduler.preempted_tokens, "mean_running": stats.mean_running,
            "prompt_tokens_computed": stats.prompt_tokens, "decode_rows": stats.decode_tokens,
            "cached_tokens": stats.cached_tokens, "finished": finished, "generated": generated,
            "full_pages": full_pages, "sliding_pages": sliding.num_pages,
            "seconds": time.perf_counter() - start}


def workload(n: int, isl: int, osl: int, shared: int, stop_share: float,
             seed: int) -> tuple[list[Request], dict]:
    """n requests of isl prompt tokens (the first `shared` the same in all) and max_tokens osl; and
    which of them stop early (a stop_share of them, each after a uniform count of tokens)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 199_000) for _ in range(shared)]
    requests, stops = [], {}
    for i in range(n):
        own = [rng.randrange(100, 199_000) for _ in range(isl - shared)]
        requests.append(Request(i, prefix + own, SamplingParams(max_tokens=osl, temperature=0),
                                stop_token_ids=(STOP,)))
        if rng.random() < stop_share:  # stops early, after a uniform share of its max_tokens
            stops[i] = rng.randint(1, osl)
    return requests, stops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, required=True, help="the full-attention layers' KV positions")
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--isl", type=int, default=1024)
    ap.add_argument("--osl", type=int, default=1024)
    ap.add_argument("--shared", type=int, default=0, help="prompt tokens every request shares at its start")
    ap.add_argument("--stop-share", type=float, default=0.0, help="share of requests that stop early")
    ap.add_argument("--max-batch-size", type=int, default=1024)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--conservativeness", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--sliding-pages", type=int, help="the sliding pool's size (default: the engine's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| conservativeness | steps | preemptions (computed positions thrown away) | mean running | "
          "prompt tokens computed (of the prompts) | from the cache | decode rows |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.conservativeness:
        requests, stops = workload(args.requests, args.isl, args.osl, args.shared, args.stop_share, args.seed)
        r = simulate(args.positions, requests, args.max_batch_size, args.max_batch_tokens, args.window, c,
                     not args.no_prefix_caching, stops, args.sliding_pages)
        own = args.requests * args.isl
        print(f"| {c:g} | {r['steps']:,} | {r['preemptions']:,} ({r['preempted_tokens']:,}) | "
              f"{r['mean_running']:.1f} | "
              f"{r['prompt_tokens_computed']:,} ({own:,}) | {r['cached_tokens']:,} | {r['decode_rows']:,} |",
              flush=True)
    print(f"(full pool {r['full_pages']:,} pages of {PAGE_SIZE}, sliding pool {r['sliding_pages']:,}; "
          f"{r['seconds']:.1f} s for the last setting)")


if __name__ == "__main__":
    main()
