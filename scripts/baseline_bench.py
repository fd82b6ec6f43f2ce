"""Baseline speed of the reference (pure-torch) path: load time, prefill and decode tokens/s.

    python scripts/baseline_bench.py --model gpt-oss-20b --batch 1 64 --device cuda --dtype bfloat16

Random prompts, greedy decoding with ignore_eos so every request generates exactly --decode
tokens. Each measurement follows a warm-up generate and is the median of --repeat runs; the GPU is
synchronised before each clock read. The copy bandwidth is measured in the same run (bytes read +
written) to put the batch-1 rate next to the weight-reading roofline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from launch.bench import hf_decode_tokens_per_s
from launch.limits import ceilings, weight_bytes_per_token
from runtime.config import preset
from runtime.engine import LLM


def timed_generate(llm: LLM, batch: int, prompt_len: int, decode: int, repeat: int) -> float:
    gen = torch.Generator().manual_seed(batch)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (prompt_len,), generator=gen).tolist(),
             "max_tokens": decode, "temperature": 0, "ignore_eos": True} for i in range(batch)]
    times = []
    for attempt in range(repeat + 1):  # the first run warms up this shape (kernel choices, allocations)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        results = llm.generate(reqs)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        if attempt:
            times.append(time.perf_counter() - t)
        assert all(len(r.token_ids) == decode and r.error is None for r in results), results[0]
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--hf", action="store_true",
                   help="also time Hugging Face transformers (eager, bf16) at batch 1")
    args = p.parse_args()

    t = time.perf_counter()
    llm = LLM("dummy", model=args.model, dtype=args.dtype, device=args.device, max_batch_size=max(args.batch))
    load = time.perf_counter() - t
    cuda = llm.device.type == "cuda"
    bw = ceilings(llm.device)["copy_bytes_per_s"] if cuda else float("nan")
    bpt = weight_bytes_per_token(llm.config)
    timed_generate(llm, 1, 8, 2, 1)  # warm-up
    rows = []
    for batch in args.batch:
        prefill = timed_generate(llm, batch, args.prompt, 1, args.repeat)
        full = timed_generate(llm, batch, args.prompt, args.decode + 1, args.repeat)
        decode_tps = batch * args.decode / (full - prefill)
        rows.append({
            "model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "dtype": args.dtype,
            "batch": batch, "prompt": args.prompt, "decode_tokens": args.decode,
            "prefill_tokens_per_s": batch * args.prompt / prefill, "decode_tokens_per_s": decode_tps,
            "roofline_tokens_per_s_b1": bw / bpt if cuda else None,
            "load_s": load, "copy_bw_TBps": bw / 1e12 if cuda else None,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        })
    if args.hf:
        del llm
        torch.cuda.empty_cache()
        hf_tps = hf_decode_tokens_per_s(preset(args.model), torch.device("cuda"), args.prompt, args.decode,
                                        args.repeat)
        hf_peak = torch.cuda.max_memory_allocated() / 2**30
        ours = next(r for r in rows if r["batch"] == 1)["decode_tokens_per_s"]
        rows.append({"model": args.model, "engine": "transformers eager bf16", "batch": 1,
                     "decode_tokens_per_s": hf_tps, "peak_mem_GiB": hf_peak, "ours_over_hf": ours / hf_tps})
        print(f"transformers eager bf16, batch 1: {hf_tps:.2f} decode tok/s (peak {hf_peak:.1f} GiB); "
              f"this runtime: {ours:.2f} tok/s = {ours / hf_tps:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"{'model':<13} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'b1 roofline':>12} {'% roof':>7} {'load s':>7} {'peak GiB':>9}")
    for r in (r for r in rows if "engine" not in r):
        roof = r["roofline_tokens_per_s_b1"]
        pct = 100 * r["decode_tokens_per_s"] / roof if roof and r["batch"] == 1 else float("nan")
        print(f"{r['model']:<13} {r['batch']:>5} {r['prefill_tokens_per_s']:>14.1f} "
              f"{r['decode_tokens_per_s']:>13.2f} "
              f"{roof or float('nan'):>12.0f} {pct:>7.2f} {r['load_s']:>7.1f} {r['peak_mem_GiB'] or 0:>9.1f}")


if __name__ == "__main__":
    main()
