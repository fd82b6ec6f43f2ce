"""Offline speed of the engine on one model: decode, prefill, time to first token, memory (the
default mode, `latency`), or an offline batch's throughput (`mode=throughput`, launch/throughput.py).

    python -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda hf=true json=bench.json
    python -m launch.bench batch_sizes=[1,2] ttft_prompts=[64] decode_tokens=4   # tiny model, CPU

Random prompts, greedy decoding with ignore_eos, so every request generates exactly the asked
tokens. Each number is the median of `repeat` runs after a warm-up of the same shape, with the GPU
synchronised around each. Decode tokens/s at batch b = b x decode_tokens / (time of prompt + 1 +
decode_tokens tokens - time of prompt + 1 token). Rooflines use ceilings measured in the same run:
batch-1 decode = copy bandwidth / the weight bytes one token reads; prefill = matmul rate / FLOPs
per prompt token. JSON out, a table printed.
"""

from __future__ import annotations

import gc
import json
import statistics
import time

import hydra
import torch
from omegaconf import DictConfig

from launch import throughput
from launch.common import build_llm, clean_exit
from launch.limits import ceilings, flops_per_token, synchronize, weight_bytes_per_token
from parallel import groups
from runtime.engine import LLM
from runtime.kv_cache import PAGE_SIZE


def timed_generate(llm: LLM, batch: int, prompt: int, tokens: int, repeat: int) -> float:
    gen = torch.Generator().manual_seed(batch * 100003 + prompt)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (prompt,), generator=gen).tolist(),
             "max_tokens": tokens, "temperature": 0, "ignore_eos": True} for i in range(batch)]
    times = []
    for attempt in range(repeat + 1):  # the first run warms this shape up
        llm.reset_prefix_cache()  # each run computes its prompts (the run before cached them)
        synchronize(llm.device)
        t = time.perf_counter()
        results = llm.generate(reqs)
        synchronize(llm.device)
        if attempt:
            times.append(time.perf_counter() - t)
        bad = next((r for r in results if r.error or len(r.token_ids) != tokens), None)
        if bad is not None:
            raise RuntimeError(f"request {bad.id} of the batch-{batch} run failed: "
                               f"{bad.error or bad.token_ids}")
    return statistics.median(times)


def timed_cached_ttft(llm: LLM, prompt: int, cached: int, repeat: int) -> float:
    """Time to first token of one prompt whose first `cached` tokens another prompt (same start,
    another tail) has just left in the prefix cache."""
    gen = torch.Generator().manual_seed(prompt + cached)
    tokens = torch.randint(0, 199998, (prompt + (prompt - cached),), generator=gen).tolist()
    earlier, timed = tokens[:prompt], tokens[:cached] + tokens[prompt:]
    times = []
    for attempt in range(repeat + 1):  # the first run warms this shape up
        llm.reset_prefix_cache()
        request = {"id": 0, "prompt_token_ids": earlier, "max_tokens": 1, "temperature": 0}
        llm.generate([request])
        synchronize(llm.device)
        t = time.perf_counter()
        result = llm.generate([{**request, "prompt_token_ids": timed}])[0]
        synchronize(llm.device)
        if result.error or result.cached_tokens != cached - cached % PAGE_SIZE:
            raise RuntimeError(f"the cached time-to-first-token run found {result.cached_tokens} of "
                               f"{cached} tokens cached ({result.error or 'no error'})")
        if attempt:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_decode_tokens_per_s(cfg, device: torch.device, prompt: int, decode: int, repeat: int) -> float:
    """transformers' GptOssForCausalLM (eager attention, bf16 experts: it has no MXFP4 kernels on
    most GPUs), random weights of the same shapes, batch 1 greedy decode."""
    import transformers

    hf_cfg = transformers.GptOssConfig(**{k: v for k, v in cfg.to_hf_json().items()
                                          if k != "quantization_config"})
    hf_cfg._attn_implementation = "eager"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = transformers.GptOssForCausalLM(hf_cfg).eval()
        finally:
            torch.set_default_dtype(previous)
    ids = torch.randint(0, min(199998, cfg.vocab_size), (1, prompt), device=device)

    def generate(n: int) -> float:
        synchronize(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - t

    generate(2)
    one = statistics.median(generate(1) for _ in range(repeat))
    full = statistics.median(generate(decode + 1) for _ in range(repeat))
    return decode / (full - one)


MODES = ("latency", "throughput")


def run(cfg: DictConfig) -> dict:
    with clean_exit():
        if cfg.mode not in MODES:
            raise ValueError(f"mode={cfg.mode} is not one of {', '.join(MODES)}")
        work = throughput.Workload.from_config(cfg) if cfg.mode == "throughput" else None  # before loading
        if work is not None:  # its report says how the rows spread over the experts (and ranks)
            cfg.count_expert_load = True
        llm = build_llm(cfg)
        if cfg.hf and llm.parallel.world_size > 1:
            raise ValueError("hf=true times transformers on one GPU: run the bench without torchrun for it")
    if work is not None:
        return throughput.run(llm, work, str(cfg.model.get("name")))
    dev, model_cfg = llm.device, llm.config
    limits = ceilings(dev)
    bw, mm = limits.get("copy_bytes_per_s"), limits.get("matmul_flops")
    rows = []
    for batch in cfg.batch_sizes:
        one = timed_generate(llm, batch, cfg.prompt_tokens, 1, cfg.repeat)
        full = timed_generate(llm, batch, cfg.prompt_tokens, cfg.decode_tokens + 1, cfg.repeat)
        # nan where timing noise swamps the decode (too few decode_tokens for this machine)
        rate = batch * cfg.decode_tokens / (full - one) if full > one else float("nan")
        rows.append({"kind": "decode", "batch": batch, "tokens_per_s": rate,
                     "prefill_tokens_per_s": batch * cfg.prompt_tokens / one})
    for prompt in cfg.ttft_prompts:
        seconds = timed_generate(llm, 1, prompt, 1, cfg.repeat)
        rows.append({"kind": "ttft", "prompt": prompt, "seconds": seconds,
                     "prefill_tokens_per_s": prompt / seconds})
        cached = cfg.get("ttft_cached_tokens")
        if cached and cached < prompt and llm.scheduler.prefix_caching:
            hit = timed_cached_ttft(llm, prompt, cached, cfg.repeat)
            rows.append({"kind": "cached ttft", "prompt": prompt, "cached": cached, "seconds": hit,
                         "of_uncached": hit / seconds})
    # A replica of n GPUs reads its weights and does its FLOPs n ways: n times one GPU's ceilings.
    gpus = llm.parallel.replica.size
    roof_decode = gpus * bw / weight_bytes_per_token(model_cfg) if bw else None
    roof_prefill = gpus * mm / flops_per_token(model_cfg) if mm else None
    for r in rows:
        if r["kind"] == "decode" and r["batch"] == 1 and roof_decode:
            r["roofline_tokens_per_s"] = roof_decode
        if roof_prefill:
            r["prefill_roofline_tokens_per_s"] = roof_prefill
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    report = {"model": str(cfg.model.get("name")),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "dtype": str(llm.dtype), "gpus_per_replica": gpus,
              "layout": {k: getattr(llm.parallel.layout, k) for k in ("tp", "ep", "dp")},
              "kv_cache_tokens": llm.kv_cache_tokens, "kv_cache_dtype": str(llm.model.kv_dtype),
              "preemptions": llm.preemptions, "peak_GiB": peak,
              "cuda_graphs": None if llm._graphs is None else sorted(llm._graphs.replays),
              "ceilings": limits, "rows": rows}
    if cfg.hf:
        del llm  # its KV cache holds most of the GPU: transformers needs the room
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ours = next((r["tokens_per_s"] for r in rows if r["kind"] == "decode" and r["batch"] == 1), None)
        hf = hf_decode_tokens_per_s(model_cfg, dev, cfg.prompt_tokens, cfg.decode_tokens, cfg.repeat)
        rows.append({"kind": "transformers decode", "batch": 1, "tokens_per_s": hf,
                     "ours_over_transformers": ours / hf if ours else None})
    return report


def table(report: dict) -> str:
    peak = "" if report["peak_GiB"] is None else f", peak GPU memory {report['peak_GiB']:.1f} GiB"
    kv = throughput.kv_positions(report["kv_cache_tokens"], report.get("kv_cache_dtype", report["dtype"]))
    gpus = report.get("gpus_per_replica", 1)
    where = report["device"] if gpus == 1 else f"{gpus}x {report['device']} ({report['layout']})"
    lines = [f"{report['model']} on {where} ({report['dtype']}), KV cache {kv}{peak} per GPU",
             "| measurement | value | roofline | % of roofline |", "|---|---:|---:|---:|"]

    def pct(value, roof):
        return (f"{roof:,.0f}", f"{100 * value / roof:.1f}%") if roof else ("", "")

    for r in report["rows"]:
        if r["kind"] == "decode":
            roof, share = pct(r["tokens_per_s"], r.get("roofline_tokens_per_s"))
            lines.append(f"| decode tokens/s, batch {r['batch']} | {r['tokens_per_s']:,.1f} | "
                         f"{roof} | {share} |")
            roof, share = pct(r["prefill_tokens_per_s"], r.get("prefill_roofline_tokens_per_s"))
            lines.append(f"| prefill tokens/s, batch {r['batch']} | {r['prefill_tokens_per_s']:,.0f} | "
                         f"{roof} | {share} |")
        elif r["kind"] == "ttft":
            roof, share = pct(r["prefill_tokens_per_s"], r.get("prefill_roofline_tokens_per_s"))
            lines.append(f"| time to first token, {r['prompt']:,}-token prompt | {r['seconds']:.3f} s | "
                         f"{roof + ' tok/s' if roof else ''} | {share} |")
        elif r["kind"] == "cached ttft":
            lines.append(f"| time to first token, {r['prompt']:,}-token prompt, first {r['cached']:,} "
                         f"cached | {r['seconds']:.3f} s | | {100 * r['of_uncached']:.1f}% of uncached |")
        else:
            ratio = r["ours_over_transformers"]
            lines.append(f"| transformers decode tokens/s, batch 1 | {r['tokens_per_s']:,.1f} | | "
                         f"{'' if ratio is None else f'this runtime {ratio:.2f}x'} |")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    groups.shutdown()
    if rank != 0:
        return  # every rank of the replica timed the same steps: rank 0 reports
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)
    print(throughput.table(report) if report.get("mode") == "throughput" else table(report))


if __name__ == "__main__":
    main()
