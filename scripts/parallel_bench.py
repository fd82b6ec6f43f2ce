"""Parallel layouts on GPUs: load time, memory per GPU, decode tokens/s, and the all-to-all cost.

    torchrun --nproc-per-node 2 scripts/parallel_bench.py --model gpt-oss-120b --tp 2
    torchrun --nproc-per-node 2 scripts/parallel_bench.py --model gpt-oss-120b --ep 2 --a2a
    torchrun --nproc-per-node 2 scripts/parallel_bench.py --tp 2 --all-reduce --no-model
    python scripts/parallel_bench.py --model gpt-oss-120b            # one GPU, for comparison

Dummy weights, greedy decoding with ignore_eos (scripts/baseline_bench.py's timing: warm-up, GPU
synchronised, median of --repeat). With --a2a it also times one MoE layer's dispatch + combine
through the all-to-all exchange (host-sized and fixed-capacity), and NCCL's own all_to_all_single
on a large buffer as the ceiling. With --all-reduce it times the tensor-parallel group's all-reduce
of 1 to 128 rows of the hidden size, NCCL's and the one-shot through peer memory
(parallel/peer_memory.py), each eager and replayed from a CUDA graph, and checks that the one-shot
gives every rank the same bits and NCCL's sum. --no-model skips loading a model (the collectives
alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel import groups, peer_memory  # noqa: E402
from parallel.experts import AllToAllExchange  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.engine import LLM  # noqa: E402
from scripts.baseline_bench import timed_generate  # noqa: E402


def cuda_time(fn, repeat: int = 20) -> float:
    """Median seconds of fn() between CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def a2a_rows(parallel: groups.Parallel, cfg) -> list[dict]:
    """One MoE layer's exchange (dispatch + combine: bf16 rows out, one fp32 weighted sum back per
    token and rank holding any of its experts), per token count, both ways: sized on the host (eager
    steps) and fixed-capacity (CUDA graphs: every rank sends every rank a row per token). GB/s counts
    the rows that had to travel."""
    g = parallel.experts_partition
    exchange = AllToAllExchange(g, cfg.num_experts)
    rows = []
    for tokens in (1, 32, 256, 2048):  # per rank: decode batches of 2, 64 and 512, a 4096-token prefill
        x = torch.randn(tokens, cfg.hidden_size, dtype=torch.bfloat16, device=parallel.device)
        ids = torch.stack([torch.randperm(cfg.num_experts, device=parallel.device)[:cfg.experts_per_token]
                           for _ in range(tokens)])
        weights = torch.full(ids.shape, 0.25, device=parallel.device)
        for capacity in (None, tokens):
            def layer(x=x, ids=ids, weights=weights, capacity=capacity):
                routed = exchange.dispatch(x, ids, weights, capacity)
                return exchange.combine(routed.rows.float(), routed)  # the rows as their "sums"

            seconds = cuda_time(layer)
            owners = torch.div(ids, exchange.per_rank, rounding_mode="floor")
            travelling = sum(len(set(row)) for row in owners.tolist())  # (token, rank) pairs
            sent = travelling * cfg.hidden_size * (2 + 4)  # bf16 out, fp32 back
            rows.append({"tokens_per_rank": tokens, "path": "host-sized" if capacity is None else "fixed",
                         "ms": seconds * 1e3, "bytes_per_rank": sent, "GBps": sent / seconds / 1e9})
    big = torch.randn(64 << 20, device=parallel.device)  # 256 MB per rank
    out = torch.empty_like(big)
    seconds = cuda_time(lambda: dist.all_to_all_single(out, big, group=g.group), repeat=10)
    rows.append({"nccl_all_to_all_256MB_ms": seconds * 1e3, "GBps": big.numel() * 4 / seconds / 1e9})
    return rows


def graph_time(fn, calls: int = 16) -> float:
    """Median seconds of one fn() inside a CUDA graph of `calls` of them (the launch costs a decode
    graph pays, not the host's)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # NCCL's and symmetric memory's first use outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time(graph.replay) / calls


def all_reduce_rows(parallel: groups.Parallel, hidden: int) -> list[dict]:
    """The tp group's all-reduce per size and dtype, NCCL's and the peer one-shot's (set up here when
    the switch left the group without one), eager and from a graph; the one-shot's sum checked against
    NCCL's and across ranks, also when replayed from a graph with new inputs."""
    g = parallel.tp
    peer = g.peer or peer_memory.for_group(g.group, parallel.device)
    gen = torch.Generator(parallel.device).manual_seed(1234 + parallel.rank)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (1, 8, 32, 64, 128):
            x = torch.randn(n, hidden, dtype=dtype, device=parallel.device, generator=gen)
            nccl = x.clone()
            dist.all_reduce(nccl, group=g.group)
            paths = {"nccl": lambda t: dist.all_reduce(t, group=g.group)}
            if peer is not None and peer.fits(x):
                paths["peer"] = peer
            for name, fn in paths.items():
                got = x.clone()
                fn(got)
                every = [torch.empty_like(got) for _ in range(g.size)]
                dist.all_gather(every, got, group=g.group)
                static = torch.zeros_like(x)
                replayed = torch.cuda.CUDAGraph()
                with torch.cuda.graph(replayed):
                    fn(static)
                static.copy_(x)
                replayed.replay()
                scratch = torch.zeros_like(x)  # zeros: repeated in-place sums stay finite
                rows.append({"dtype": str(dtype).split(".")[-1], "rows": n,
                             "bytes": x.numel() * x.element_size(), "path": name,
                             "eager_us": cuda_time(lambda: fn(scratch)) * 1e6,
                             "graph_us": graph_time(lambda: fn(scratch)) * 1e6,
                             "same_on_every_rank": all(torch.equal(every[0], t) for t in every),
                             "max_abs_diff_vs_nccl": (got.float() - nccl.float()).abs().max().item(),
                             "graph_equals_eager": torch.equal(static, got)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt-oss-120b")
    p.add_argument("--checkpoint", default="dummy",
                   help="a checkpoint folder, or dummy (random weights of --model)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--expert-tp", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--a2a", action="store_true")
    p.add_argument("--all-reduce", action="store_true")
    p.add_argument("--no-model", action="store_true", help="the collectives alone (with --a2a, --all-reduce)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    parallel = groups.init(groups.Layout(tp=args.tp, ep=args.ep, expert_tp=args.expert_tp),
                           device_type="cuda", timeout_s=900)
    result = {"model": args.model, "checkpoint": args.checkpoint,
              "layout": f"tp={args.tp} ep={args.ep} expert_tp={args.expert_tp or args.tp}",
              "gpus": parallel.world_size, "device": torch.cuda.get_device_name(parallel.device),
              "decode": []}
    memory = []
    if not args.no_model:
        llm = LLM(args.checkpoint, model=args.model, dtype="bfloat16", max_batch_size=max(args.batch),
                  parallel=parallel)
        memory = [llm.load_memory]
        if parallel.world_size > 1:
            memory = [None] * parallel.world_size
            dist.all_gather_object(memory, llm.load_memory)
        timed_generate(llm, 1, 8, 2, 1)  # warm-up
        result.update(load_s=llm.load_seconds, memory_per_rank=memory)
        for batch in args.batch:
            prefill = timed_generate(llm, batch, args.prompt, 1, args.repeat)
            full = timed_generate(llm, batch, args.prompt, args.decode + 1, args.repeat)
            result["decode"].append({"batch": batch,
                                     "decode_tokens_per_s": batch * args.decode / (full - prefill),
                                     "prefill_tokens_per_s": batch * args.prompt / prefill})
    if args.a2a and parallel.world_size > 1:
        result["all_to_all"] = a2a_rows(parallel, preset(args.model))
    if args.all_reduce and parallel.tp.size > 1:
        result["all_reduce"] = all_reduce_rows(parallel, preset(args.model).hidden_size)
    if parallel.rank == 0:
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        for row in result["decode"]:
            mem = ", ".join(f"{m['peak_device_GiB']:.1f}" for m in memory)
            host = ", ".join(f"{m['peak_host_GiB']:.1f}" for m in memory)
            print(f"{args.model:<13} {args.checkpoint[-12:]:<12} {result['layout']:<22} "
                  f"batch {row['batch']:>3}: decode "
                  f"{row['decode_tokens_per_s']:8.2f} tok/s, "
                  f"prefill {row['prefill_tokens_per_s']:9.1f} tok/s, "
                  f"load {result['load_s']:5.1f} s, GiB per GPU [{mem}], host GiB [{host}]")
        for row in result.get("all_to_all", []):
            print("all-to-all", row)
        for r in result.get("all_reduce", []):
            print(f"all-reduce {r['dtype']:>8} {r['rows']:>4} rows ({r['bytes'] / 1024:7.1f} KiB) "
                  f"{r['path']:<4}: "
                  f"eager {r['eager_us']:7.1f} us, graph {r['graph_us']:6.1f} us; same on every rank "
                  f"{r['same_on_every_rank']}, off NCCL by {r['max_abs_diff_vs_nccl']:.3g}, graph = eager "
                  f"{r['graph_equals_eager']}")
    groups.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the lent machines forbid NVLink multicast
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()
