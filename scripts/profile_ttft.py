"""Where the time to first token of one long prompt goes: the kernels of one prefill (dummy weights)
under torch.profiler, grouped by name, beside the matmul rate measured in the same run.

    python scripts/profile_ttft.py --model gpt-oss-20b --prompt 32768
"""

from __future__ import annotations

import argparse
import time

import torch

from launch.limits import ceilings as measure_ceilings
from runtime.engine import LLM
from profile_throughput import kernels  # scripts/ is the import path's first entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    args = ap.parse_args()
    llm = LLM("dummy", model=args.model, max_batch_size=8, max_batch_tokens=args.max_batch_tokens,
              max_model_len=args.prompt + 16, enable_prefix_caching=False)  # each run prefills it all
    gen = torch.Generator().manual_seed(0)
    request = {"prompt_token_ids": torch.randint(0, 199998, (args.prompt,), generator=gen).tolist(),
               "max_tokens": 1, "temperature": 0}
    llm.generate([dict(request, id=0)])  # warm-up: compiles
    seconds = []
    for i in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([dict(request, id=i + 1)])
        seconds.append(time.perf_counter() - start)
    rows = kernels(llm, [dict(request, id=9)])
    total = sum(ms for _, ms, _ in rows)
    ceilings = measure_ceilings(llm.device)
    print(f"{args.model}: one {args.prompt}-token prompt, max_batch_tokens {args.max_batch_tokens}: "
          f"time to first token {', '.join(f'{s:.3f}' for s in seconds)} s; kernels {total / 1e3:.3f} s; "
          f"matmul rate {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s")
    print("| kernel | ms | share | launches |\n|---|---:|---:|---:|")
    for name, ms, n in rows[:20]:
        print(f"| {name[:90]} | {ms:,.1f} | {100 * ms / total:.1f}% | {n:,} |")


if __name__ == "__main__":
    main()
