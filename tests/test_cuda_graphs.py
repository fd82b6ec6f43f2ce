"""runtime/cuda_graphs.py and runtime/mixed_graphs.py: steps replayed from CUDA graphs give the eager
engine's tokens.

On CPU the same static-buffer forward runs without capture (replay=False) through Triton's
interpreter; on a GPU the captured graphs replay it, bit for bit, with and without programmatic
dependent launch, and with tensor parallelism's collectives inside.
"""

import json
import os

import pytest
import torch
from routing_probe import poison

from runtime.config import preset
from runtime.engine import LLM
from runtime.options import options


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cuda_graph_decode_replays_the_static_forward_exactly(kv_cache_dtype):
    """Decode steps replayed from CUDA graphs (the engine's default on CUDA) give bit for bit the
    tokens and logprobs of the same static-buffer forward run without graphs, over several padded
    sizes, preemption and sampled requests, on a cache of the model's dtype and a float8 one. (That
    forward equals the reference engine's tokens: tests/test_kernel_path.py and tests/test_kv_fp8.py
    check it on CPU.)"""
    import dataclasses

    from runtime.cuda_graphs import DecodeGraphs
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    gen = torch.Generator().manual_seed(11)
    reqs = [Request(i, torch.randint(0, 199998, (n,), generator=gen).tolist(),
                    SamplingParams(max_tokens=20 + 7 * i, temperature=0.8 if i % 3 == 2 else 0, seed=i,
                                   logprobs=True),
                    stop_token_ids=()) for i, n in enumerate((40, 300, 7, 1200, 90, 33, 500))]
    results = {}
    for replay in (True, False):
        llm = LLM("dummy", model=cfg, max_batch_size=6, max_batch_tokens=512, kv_cache_tokens=1536,
                  max_model_len=4096, schedule_conservativeness=0,  # admit while prompts fit: preempts
                  kv_cache_dtype=kv_cache_dtype)
        if replay:
            assert llm._graphs is not None and llm._graphs.replay  # on by default on CUDA
            # the warm-ups' dry pass captured every size's step and compiled what it found
            for graphs in filter(None, (llm._graphs, llm._mixed_graphs)):
                ahead = graphs.warm_up.ahead
                assert ahead is not None and (ahead.error, ahead.failed) == (None, 0), ahead
            eager = llm.capture_warm_ups["eager"]["ahead"]  # and the eager steps' (runtime/eager_steps.py)
            assert (eager["error"], eager["failed"]) == (None, 0), eager
        else:
            llm._graphs = DecodeGraphs(llm.model, llm.max_batch_size, llm.max_model_len, llm._sampled,
                                       replay=False)
        results[replay] = llm.generate(reqs)
        assert llm.preemptions > 0 and len(llm._graphs.replays) >= 3, (llm.preemptions, llm._graphs.replays)
    for a, b in zip(results[True], results[False]):
        assert a.error is None and a.token_ids == b.token_ids and a.logprobs == b.logprobs


@pytest.mark.gpu
def test_cuda_graph_decode_follows_the_eager_engine():
    """Graphs against the eager engine (whose attention splits the key range by the actual lengths,
    so sums differ in order): float32, so the tokens agree and their logprobs are close (a route
    flip needs a router near-tie of ~1e-6 in 4 layers x 9 decode steps: not expected)."""
    import dataclasses

    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    gen = torch.Generator().manual_seed(12)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
             "max_tokens": 4, "temperature": 0, "logprobs": True, "ignore_eos": True}
            for i, n in enumerate((17, 260, 1000))]
    out = [LLM("dummy", model=cfg, dtype="float32", max_batch_size=4, kv_cache_tokens=4096,
               enforce_eager=eager).generate(reqs) for eager in (False, True)]
    for graph, eager in zip(*out):
        assert graph.token_ids == eager.token_ids
        assert max(abs(a - b) for a, b in zip(graph.logprobs, eager.logprobs)) < 1e-3


@pytest.mark.gpu
def test_programmatic_dependent_launch_changes_no_bit(monkeypatch):
    """Kernels launched with PDL (each may start before the one before it ends, and waits for it
    before touching activations) give bit for bit the tokens and logprobs of plain launches, in
    CUDA graphs and eagerly (prefill), at batch 1 and with several sequences."""
    import dataclasses

    from runtime.kernels import pdl

    if not pdl.enabled(torch.device("cuda", 0)):
        pytest.skip("PDL needs a Hopper GPU and Triton's launch_pdl option")
    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    gen = torch.Generator().manual_seed(13)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
             "max_tokens": 12, "temperature": 0, "logprobs": True, "ignore_eos": True}
            for i, n in enumerate((9, 700, 130))]
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setattr(options, "pdl", flag == "1")
        llm = LLM("dummy", model=cfg, max_batch_size=4, kv_cache_tokens=4096)
        results[flag] = llm.generate(reqs[:1]) + llm.generate(reqs)
    for a, b in zip(results["1"], results["0"]):
        assert a.error is None and a.token_ids == b.token_ids and a.logprobs == b.logprobs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("layout,peer", [("parallel.tp=2", "0"), ("parallel.tp=2", "1"),
                                         ("parallel.ep=2", "0")])
def test_cuda_graphs_capture_parallel_collectives(tmp_path, layout, peer):
    """tp=2 or ep=2 on two GPUs (NCCL): steps replayed from graphs (decode steps; under tp=2 the first,
    a prompt-only step under mixed_graph_tokens, from the mixed steps' pieces too), with the
    all-reduces, the logits' all-gather or expert parallelism's fixed-capacity all-to-alls captured
    inside them, give the eager engine's tokens (whose all-to-alls are sized on the host), and
    logprobs within 1e-3 (float32; the graph's attention splits the key range as for max_model_len,
    so sums differ in order). The graph run must have replayed graphs, or the test would compare
    eager with eager. peer "1": the small all-reduces through peer memory (GPT_OSS_PEER_ALL_REDUCE),
    captured too; the job must say it did not fall back to NCCL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    gen = torch.Generator().manual_seed(21)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(
        json.dumps({"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
                    "max_tokens": 6, "temperature": 0, "logprobs": True, "ignore_eos": True}) + "\n"
        for i, n in enumerate((9, 130, 700))))
    env = {**os.environ, "GPT_OSS_PEER_ALL_REDUCE": peer,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    out = {}
    for eager in (False, True):
        path = tmp_path / f"eager_{eager}.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "launch.batch",
             "checkpoint=dummy", "model=gpt-oss-20b", "model.num_hidden_layers=4", "dtype=float32",
             "device=cuda", f"input={inp}", f"output={path}", "progress=false", layout,
             "kv_cache_tokens=4096", "max_batch_size=4", f"enforce_eager={str(eager).lower()}"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "peer-memory all-reduce off" not in done.stderr, done.stderr[-3000:]
        replays = int(done.stderr.split(" steps replayed from CUDA graphs")[0].rsplit(" ", 1)[-1])
        assert (replays == 0) if eager else (replays > 0), done.stderr[-1000:]
        out[eager] = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    for i, graph in out[False].items():
        eager = out[True][i]
        assert graph.get("error") is None and graph["token_ids"] == eager["token_ids"], (graph, eager)
        assert max(abs(a - b) for a, b in zip(graph["logprobs"], eager["logprobs"])) < 1e-3


def kernel_engine_gives_the_reference_tokens(checkpoint, monkeypatch, settings, reqs, install) -> LLM:
    """The tiny model's engine on the Triton kernels (interpreted, pools poisoned), with `install(engine)`
    run before its generate, against the reference engine: the same tokens, logprobs within 1e-4.
    Returns the kernel engine for the caller's checks of what ran."""
    want = LLM(checkpoint, **settings).generate(reqs)
    monkeypatch.setattr(options, "kernels_on_cpu", True)
    fast = LLM(checkpoint, **settings)
    poison(fast.model)
    install(fast)
    got = fast.generate(reqs)
    for g, w in zip(got, want):
        assert g.error is None and g.token_ids == w.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4
    return fast


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the graphs' inputs through Triton's interpreter: CPU only")
def test_decode_graph_inputs_give_the_reference_engine_tokens(two_layer_checkpoint, monkeypatch):
    """The CUDA graphs' static-buffer forward (runtime/cuda_graphs.py, run here without capture):
    staged block tables at the fixed max_model_len width, batches padded into the scratch page,
    attention split as for max_model_len, under preemption, gives the reference engine's tokens."""
    from runtime import cuda_graphs, ops
    from runtime.cuda_graphs import DecodeGraphs
    from runtime.requests import Request
    from runtime.sampling import SamplingParams, sample_on_device

    gen = torch.Generator().manual_seed(5)
    reqs = [Request(i, torch.randint(0, 199998, (n,), generator=gen).tolist(),
                    SamplingParams(max_tokens=8, temperature=0, logprobs=True), stop_token_ids=())
            for i, n in enumerate((26, 5, 30, 9))]
    # max_model_len 512: decode attention split in two for it (choose_num_splits), most slices empty
    settings = dict(dtype="float32", device="cpu", max_batch_size=5, max_batch_tokens=40, kv_cache_tokens=96,
                    max_model_len=512, schedule_conservativeness=0)
    sampled_by_torch = []

    # every step's block tables packed to the columns its positions reach (small tables are otherwise
    # copied whole): a step that copies one column too few gives other tokens
    monkeypatch.setattr(cuda_graphs, "WHOLE_ROWS_ENTRIES", 0)

    def static_decode_graphs(fast):
        fast._graphs = DecodeGraphs(fast.model, fast.max_batch_size, fast.max_model_len, fast._sampled,
                                    replay=False)
        # the start-up warm-ups (one thread: the interpreter is not thread-safe) disturb nothing after
        fast._graphs.warm_all(threads=1)
        assert sorted(fast._graphs.warm_up.seconds) == fast._graphs.sizes
        monkeypatch.setattr(ops, "sample", lambda *a: sampled_by_torch.append(1) or sample_on_device(*a))

    fast = kernel_engine_gives_the_reference_tokens(two_layer_checkpoint, monkeypatch, settings, reqs,
                                                    static_decode_graphs)
    # Decode steps went through the static buffers, padded ones (3 sequences in the 4-row size) too,
    # and took their (all greedy) tokens from the graph's own sampling: torch sampled only the others.
    assert fast._graphs.replays.get(4, 0) > 0 and fast.preemptions > 0
    assert len(sampled_by_torch) == fast._steps - sum(fast._graphs.replays.values())



@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the graphs' buffers on the CPU, with the kernels through Triton's interpreter")
def test_the_kv_sizing_leaves_room_for_every_buffer_of_the_decode_graphs(tiny_checkpoints, monkeypatch):
    """cuda_graphs.buffer_bytes, what engine._kv_pages leaves for the decode graphs (made after the KV
    cache), is every tensor DecodeGraphs allocates on the device: the logits alone are 0.8 GB at 1,024
    rows, and a 2,048-row engine ran out of memory in its LM head before they were counted."""
    from runtime.cuda_graphs import DecodeGraphs, buffer_bytes

    monkeypatch.setattr(options, "kernels_on_cpu", True)
    llm = LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=24,
              max_batch_tokens=40, kv_cache_tokens=96, max_model_len=1000, enforce_eager=True)
    graphs = DecodeGraphs(llm.model, 24, 1000, llm._sampled, replay=False)

    def tensors(value):
        values = value.values() if isinstance(value, dict) else [value]
        return [v for v in values if isinstance(v, torch.Tensor)]

    # On the CPU the host buffers are CPU tensors too: they are the `_host` ones (pinned on a GPU machine).
    own = sum(t.numel() * t.element_size() for name, value in vars(graphs).items()
              if not name.startswith("_host") and name != "_sampled" for t in tensors(value))
    assert len(graphs.pools) == 2 and own == buffer_bytes(24, 1000, llm.config.vocab_size, 2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the mixed graphs' inputs through Triton's interpreter: CPU only")
def test_mixed_graph_pieces_give_the_reference_engine_tokens(two_layer_checkpoint, monkeypatch):
    """Mixed steps through runtime/mixed_graphs.py's fixed buffers (run here without capture): the
    pieces between the attentions over token counts padded to a bucket (padding stored into the
    scratch page), each attention over the real rows between them, decode rows whose token the step
    in flight samples read from the GPU buffer, under preemption: the reference engine's tokens."""
    from runtime.mixed_graphs import MixedGraphs

    gen = torch.Generator().manual_seed(6)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
             "max_tokens": 5, "temperature": 0, "logprobs": True, "ignore_eos": True}
            for i, n in enumerate((26, 5, 30, 9))]
    settings = dict(dtype="float32", device="cpu", max_batch_size=3, max_batch_tokens=24, kv_cache_tokens=80,
                    max_model_len=512, schedule_conservativeness=0)

    def static_mixed_graphs(fast):
        fast._mixed_graphs = MixedGraphs(fast.model, 24, fast._sampled, replay=False)
        assert fast._mixed_graphs.buckets == [16, 24]
        fast._mixed_graphs.warm_all(threads=1)  # the start-up warm-ups disturb nothing after
        assert sorted(fast._mixed_graphs.warm_up.seconds) == [16, 24]

    fast = kernel_engine_gives_the_reference_tokens(two_layer_checkpoint, monkeypatch, settings, reqs,
                                                    static_mixed_graphs)
    # Mixed steps of both buckets ran, padded ones among them; the run preempted.
    replays = fast._mixed_graphs.replays
    assert replays.get(16, 0) > 0 and replays.get(24, 0) > 0 and fast.preemptions > 0, replays


def test_token_buckets():
    from runtime.mixed_graphs import token_buckets

    assert token_buckets(0) == []
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
                                   2048]


@pytest.mark.gpu
def test_mixed_graphs_replay_the_pieces_without_graphs_exactly():
    """Mixed steps replayed from the pieces' CUDA graphs (mixed_graph_tokens) give bit for
    bit the tokens and logprobs of the same pieces run without capture, over several buckets, under
    preemption, with sampled requests; and the replays follow the eager engine (float32: same
    greedy tokens, logprobs within 1e-3, as the decode graphs' test)."""
    import dataclasses

    from runtime.mixed_graphs import MixedGraphs

    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    gen = torch.Generator().manual_seed(14)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
             "max_tokens": 20 + 7 * i, "temperature": 0.8 if i % 3 == 2 else 0, "seed": i, "logprobs": True,
             "ignore_eos": True} for i, n in enumerate((40, 300, 7, 1200, 90, 33, 500))]
    settings = dict(model=cfg, max_batch_size=6, max_batch_tokens=512, kv_cache_tokens=1536,
                    max_model_len=4096, schedule_conservativeness=0, mixed_graph_tokens=512)
    results = {}
    for replay in (True, False):
        llm = LLM("dummy", **settings)
        assert llm._mixed_graphs is not None and llm._mixed_graphs.replay
        if not replay:
            llm._mixed_graphs = MixedGraphs(llm.model, 512, llm._sampled, replay=False)
        results[replay] = llm.generate(reqs)
        assert len(llm._mixed_graphs.replays) >= 2, llm._mixed_graphs.replays
        assert llm.preemptions > 0  # the decode graphs' test's lengths, which preempt (a 12 + 5i run did not)
    for a, b in zip(results[True], results[False]):
        assert a.error is None and a.token_ids == b.token_ids and a.logprobs == b.logprobs
    greedy = [dict(r, temperature=0, max_tokens=6) for r in reqs]
    out = [LLM("dummy", dtype="float32", **dict(settings, kv_cache_tokens=4096), enforce_eager=eager
               ).generate(greedy) for eager in (False, True)]
    for graph, eager in zip(*out):
        assert graph.token_ids == eager.token_ids
        assert max(abs(a - b) for a, b in zip(graph.logprobs, eager.logprobs)) < 1e-3


def test_warm_ups_run_side_by_side_within_the_largest_rows():
    """Every size's warm-up runs once, several at a time, never more rows at once than the largest
    size; a failing one raises after all have stopped."""
    import threading
    import time
    import types

    from runtime import cuda_graphs, warm_up

    lock, in_flight, seen, peak, threads = threading.Lock(), [0, 0], [], [0, 0], set()

    def body(rows):
        def run():
            assert torch.is_inference_mode_enabled()
            with lock:
                in_flight[0] += rows
                in_flight[1] += 1
                peak[:] = max(peak[0], in_flight[0]), max(peak[1], in_flight[1])
                seen.append(rows)
                threads.add(threading.get_ident())
            time.sleep(0.02)
            with lock:
                in_flight[0] -= rows
                in_flight[1] -= 1
        return run

    sizes = cuda_graphs.capture_sizes(256)
    report = warm_up.run_side_by_side({s: body(s) for s in sizes}, torch.device("cpu"), threads=4)
    assert sorted(seen) == sorted(sizes) and peak[0] <= 256
    assert sorted(report.seconds) == sorted(sizes) and all(0.02 <= s < 1 for s in report.seconds.values())
    assert report.wall_s < sum(report.seconds.values())  # side by side
    summary = warm_up.Report(0.5, {8: 0.1, 64: 0.3}).summary()
    assert summary == {"wall_s": 0.5, "slowest": 64, "slowest_s": 0.3}
    assert peak[1] > 1 and len(threads) > 1  # the small sizes did run together
    # smallest first: the few smallest start at once, the largest (the budget alone) only after them
    assert all(seen.index(s) < seen.index(max(sizes)) for s in sorted(sizes)[:4])

    # ranks of one replica launch their collectives in the same order: one thread, smallest size first
    replica = types.SimpleNamespace(parallel=types.SimpleNamespace(replica=types.SimpleNamespace(size=2)))
    alone = types.SimpleNamespace(parallel=types.SimpleNamespace(replica=types.SimpleNamespace(size=1)))
    assert cuda_graphs.warm_up_threads(replica, 8) == 1 and cuda_graphs.warm_up_threads(alone, 8) == 8
    order = []
    warm_up.run_side_by_side({s: lambda s=s: order.append(s) for s in sizes}, torch.device("cpu"), threads=1)
    assert order == sorted(sizes)

    def fails():
        raise RuntimeError("compile failed")
    ran = []
    with pytest.raises(RuntimeError, match="compile failed"):
        warm_up.run_side_by_side({8: fails, 4: lambda: ran.append(4), 2: lambda: ran.append(2)},
                                 torch.device("cpu"), threads=2)
    assert sorted(ran) == [2, 4]
