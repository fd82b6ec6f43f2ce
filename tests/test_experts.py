"""parallel/experts.py: the expert-parallel exchange, host-sized and fixed-capacity, on gloo ranks;
and attention data parallelism's graph steps (runtime/lockstep.py) through it.

Both paths must hand each rank exactly the (row, expert) pairs it owns and bring every output back to
its token, summed in the same order, so that a CUDA graph's step (fixed capacity, no host sync) gives
the eager step's numbers. Checked on 2 and 4 processes, with routings that send everything to one
rank (the capacity's worst case), and through a whole MoE layer on the reference and the kernel
path (Triton's interpreter) against one rank holding every expert, under each way of running
partitioned experts (tokens shared: one all-reduce; attention_dp: the exchange).
"""

import dataclasses
import io
import multiprocessing as mp
import os
import traceback

import pytest
import torch

from runtime.config import preset


def _spawn(worker, world: int, *args) -> list:
    return _spawn_layout(worker, world, dict(ep=world), *args)


def _spawn_layout(worker, world: int, layout: dict, *args) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = 22000 + os.getpid() % 20000 + world + 7 * len(layout)
    procs = [ctx.Process(target=_run, args=(worker, r, world, port, layout, results, *args))
             for r in range(world)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [g for g in got if isinstance(g, str)]
    assert not errors, errors[0]
    return sorted((torch.load(io.BytesIO(g), weights_only=False) for g in got), key=lambda g: g[0])


def _run(worker, rank, world, port, layout, results, *args):
    try:
        torch.set_num_threads(1)
        from parallel import groups

        parallel = groups.init(groups.Layout(**layout), rank=rank, world_size=world, master_addr="127.0.0.1",
                               master_port=port, device_type="cpu", timeout_s=120)
        # Bytes, not tensors: a queued tensor travels as a shared-memory file descriptor that the
        # parent fetches from this process later, which fails (EOFError) once this process has exited.
        payload = io.BytesIO()
        torch.save((rank, worker(parallel, *args)), payload)
        results.put(payload.getvalue())
        groups.shutdown()
    except Exception:
        results.put(f"rank {rank}: {traceback.format_exc()}")


def routings(n: int, k: int, experts: int, world: int, seed: int) -> dict[str, torch.Tensor]:
    """[n, k] distinct experts per token: random, all on rank 0's experts, all on the last rank's."""
    gen = torch.Generator().manual_seed(seed)
    per_rank = experts // world
    choose = lambda pool: torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]]  # noqa: E731
                                       for _ in range(n)]) if n else torch.zeros((0, k), dtype=torch.long)
    return {"random": choose(torch.arange(experts)),
            "first rank": choose(torch.arange(per_rank)),
            "last rank": choose(torch.arange(experts - per_rank, experts))}


def _exchange_worker(parallel, n_by_rank, k, experts, seed, dtype):
    from parallel.experts import AllToAllExchange

    g = parallel.experts_partition
    ex = AllToAllExchange(g, experts)
    n = n_by_rank[g.rank]
    gen = torch.Generator().manual_seed(seed + g.rank)
    tokens = torch.randn(n, 24, generator=gen).to(dtype)  # bf16: the model's rows (the header's views)
    weights = torch.rand(n, k, generator=gen)
    out = {}
    for name, ids in routings(n, k, experts, g.size, seed + g.rank).items():
        # What the experts do here: row times (global expert id + 1).
        want = (tokens.float()[:, None, :] * (ids + 1)[..., None].float() * weights[..., None]).sum(dim=1)
        owners = {(t, e // ex.per_rank) for t, row in enumerate(ids.tolist()) for e in row}
        for capacity in (None, max(n_by_rank)):
            routed = ex.dispatch(tokens, ids, weights, capacity)
            rows, local = routed.pairs()
            real = local < ex.per_rank
            outputs = torch.full(rows.shape, float("nan"))  # unused slots' rows must never be read
            outputs[real] = rows[real].float() * (ex.first_expert + local[real] + 1).float()[:, None]
            got = ex.combine(ex.weigh(outputs, routed), routed)
            pairs = sorted(zip(local[real].tolist(), map(tuple, rows[real].tolist())))
            used_rows = int((routed.experts < ex.per_rank).any(dim=1).sum())
            out[(name, capacity is not None)] = (got, want, int(routed.sent.sum()) == len(owners), used_rows,
                                                 len(routed.rows), pairs)
    return out


@pytest.mark.parametrize("world, n_by_rank, k, dtype", [(2, (5, 3), 4, torch.float32),
                                                       (4, (4, 4, 0, 7), 4, torch.float32),
                                                       (2, (6, 2), 3, torch.bfloat16)])
def test_fixed_capacity_exchange_gives_the_host_sized_one(world, n_by_rank, k, dtype):
    """Each token travels once to each rank holding any of its experts, with their weights there; the
    ranks send back one weighted sum each, added in rank order: the expected sums (to float32
    rounding: the sum's order is by rank, then slot), bit for bit the same on both paths."""
    results = _spawn(_exchange_worker, world, n_by_rank, k, 16, 7, dtype)
    for rank, out in results:
        for name in ("random", "first rank", "last rank"):
            host, fixed = out[(name, False)], out[(name, True)]
            torch.testing.assert_close(host[0], host[1], rtol=1e-6, atol=1e-6)
            assert torch.equal(fixed[0], host[0]), (rank, name)  # the same sums, in the same order
            assert host[2] and fixed[2], (rank, name)  # one row per (token, rank holding its experts)
            assert host[3] == fixed[3] == host[4], (rank, name)  # the same real rows arrived ...
            assert fixed[5] == host[5], (rank, name)  # ... with the same experts
            # fixed capacity: every rank's buffer holds the most a rank can send, a row per token
            assert fixed[4] == world * max(n_by_rank), (rank, name)


def _moe_worker(parallel, kernels, seed):
    from runtime.model import GptOss
    from runtime.options import options

    cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=1)
    moe = GptOss(cfg, torch.float32, parallel=parallel).randomize(3).block[0].mlp
    dispatched = []
    dispatch = moe.exchange.dispatch
    moe.exchange.dispatch = lambda *args: dispatched.append(args) or dispatch(*args)
    gen = torch.Generator().manual_seed(seed)
    x, delta = torch.randn(2, 9, cfg.hidden_size, generator=gen)
    with options.override(kernels_on_cpu=kernels), torch.inference_mode():
        return [moe(x, delta, fixed_shapes=fixed)[0] for fixed in (False, True)], len(dispatched)


@pytest.mark.parametrize("world, layout, kernels", [
    (2, dict(ep=2), False), (2, dict(ep=2), True),
    # the reference path of these two runs in tests/test_parallel.py's batch jobs
    (4, dict(tp=2, ep=2), True), (2, dict(ep=2, attention_dp=True), True)],
    ids=["ep=2-reference", "ep=2-kernels", "tp=2 ep=2-kernels", "ep=2 attention_dp-kernels"])
def test_moe_layer_under_expert_parallelism_gives_one_ranks_answer_both_ways(world, layout, kernels):
    """A MoE layer whose experts are partitioned (and, at tp=2 ep=2, each also split in two) gives one
    rank's output, eagerly and with a graph step's fixed shapes. Where every rank holds the same
    tokens no rows travel (each rank's experts' share, one all-reduce); under attention_dp (each
    rank its own tokens, here the same ones) they go all-to-all, host-sized and fixed-capacity."""
    from parallel.groups import single
    from runtime.model import GptOss
    from runtime.options import options

    cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=1)
    moe = GptOss(cfg, torch.float32, parallel=single()).randomize(3).block[0].mlp
    gen = torch.Generator().manual_seed(5)
    x, delta = torch.randn(2, 9, cfg.hidden_size, generator=gen)
    with options.override(kernels_on_cpu=kernels), torch.inference_mode():
        want = moe(x, delta)[0]
    for rank, ((host, fixed), dispatched) in _spawn_layout(_moe_worker, world, layout, kernels, 5):
        torch.testing.assert_close(host, want, rtol=1e-5, atol=1e-5)
        if layout.get("attention_dp"):
            # The fixed-capacity buffer holds more (padding) rows than the host-sized one, and the MoE
            # GEMM's tiles are chosen by its row count (choose_tiles): other tiles, other summation
            # orders, so the two agree to float32 rounding only (7e-7 here on some CPUs' BLAS).
            torch.testing.assert_close(fixed, host, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(fixed, host), rank  # the same rows through the same experts, summed alike
        assert dispatched == (2 if layout.get("attention_dp") else 0), (rank, dispatched)


def _attention_dp_engine_worker(parallel, checkpoint, requests, settings):
    from runtime.cuda_graphs import DecodeGraphs
    from runtime.engine import LLM
    from runtime.options import options
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    mine = requests[parallel.replica.rank::parallel.replica.size]
    with options.override(kernels_on_cpu=True):
        llm = LLM(checkpoint, parallel=parallel, **settings)
        # The decode graphs' static-buffer forward (run without capture on CPU): the ranks agree on
        # one padded size, the fixed-capacity exchange runs, and an idle rank replays padding only.
        llm._graphs = DecodeGraphs(llm.model, llm.max_batch_size, llm.max_model_len, llm._sampled,
                                   replay=False)
        got = llm.generate([Request(i, ids, SamplingParams(max_tokens=tokens, temperature=0, logprobs=True),
                                    stop_token_ids=()) for i, ids, tokens in mine])
    return {r.id: (r.token_ids, r.logprobs) for r in got}, (dict(llm._graphs.replays), llm.graph_replays)


def test_attention_data_parallel_graph_steps_give_one_ranks_tokens(two_layer_checkpoint):
    """Two ranks under attention_dp, each with its own requests (3 and 2, of different lengths, so one
    rank runs idle steps at the end), decoding through the graphs' static buffers (Triton's
    interpreter): the tokens of one rank running all five, logprobs within 1e-4."""
    from runtime.engine import LLM
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    gen = torch.Generator().manual_seed(8)
    requests = [(i, torch.randint(0, 199998, (n,), generator=gen).tolist(), tokens)
                for i, (n, tokens) in enumerate(((7, 6), (12, 2), (3, 4), (9, 2), (5, 5)))]
    settings = dict(dtype="float32", device="cpu", max_batch_size=4, max_batch_tokens=64, kv_cache_tokens=256,
                    max_model_len=512)
    want = {r.id: (r.token_ids, r.logprobs) for r in LLM(two_layer_checkpoint, **settings).generate(
        [Request(i, ids, SamplingParams(max_tokens=tokens, temperature=0, logprobs=True), stop_token_ids=())
         for i, ids, tokens in requests])}
    ranks = _spawn_layout(_attention_dp_engine_worker, 2, dict(ep=2, attention_dp=True),
                          two_layer_checkpoint, requests, settings)
    got = {}
    decode_replays = []
    for rank, (results, (replays, counted)) in ranks:
        assert sum(replays.values()) > 0, rank  # decode steps went through the static buffers
        decode_replays.append((sum(replays.values()), counted))
        got.update(results)
    # The rank with fewer tokens to make replayed padding-only graphs while the other decoded: those
    # idle replays are not counted as its decode steps.
    assert any(counted < replayed for replayed, counted in decode_replays), decode_replays
    assert sorted(got) == sorted(want)
    for i, (tokens, logprobs) in want.items():
        assert got[i][0] == tokens, i
        assert max(abs(a - b) for a, b in zip(got[i][1], logprobs)) < 1e-4, i


def _tensor_parallel_graph_worker(parallel, checkpoint, requests, settings):
    from runtime import engine
    from runtime.cuda_graphs import DecodeGraphs
    from runtime.options import options
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    sent = []
    plain = engine.broadcast
    engine.broadcast = lambda t, g: sent.append(t.numel()) or plain(t, g)  # the sampled tokens' broadcasts
    with options.override(kernels_on_cpu=True):
        llm = engine.LLM(checkpoint, parallel=parallel, **settings)
        llm._graphs = DecodeGraphs(llm.model, llm.max_batch_size, llm.max_model_len, llm._sampled,
                                   replay=False)
        got = llm.generate([Request(i, ids, SamplingParams(max_tokens=tokens, temperature=temperature, seed=7,
                                                           logprobs=True), stop_token_ids=())
                            for i, ids, tokens, temperature in requests])
    return {r.id: (r.token_ids, r.logprobs) for r in got}, sum(llm._graphs.replays.values()), sent


def test_tensor_parallel_graph_steps_send_sampled_tokens_only_where_the_graph_did_not_choose_them(
        two_layer_checkpoint):
    """tp=2 decoding through the graphs' static buffers (Triton's interpreter), one greedy request of 6
    tokens beside one sampled request of 3: while the sampled one runs, the first rank broadcasts each
    step's tokens; after it, every row is greedy and each rank's graph writes the same argmax into its
    own buffer of sampled tokens, so none travel (the engine's _samples_to_send). The tokens are one
    rank's, logprobs within 1e-4: a follower that missed the sampled token would feed another one to
    its half of the heads."""
    from runtime.engine import LLM
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    gen = torch.Generator().manual_seed(11)
    requests = [(i, torch.randint(0, 199998, (n,), generator=gen).tolist(), tokens, temperature)
                for i, (n, tokens, temperature) in enumerate(((6, 6, 0), (9, 3, 0.8)))]
    settings = dict(dtype="float32", device="cpu", max_batch_size=2, max_batch_tokens=32, kv_cache_tokens=128,
                    max_model_len=256)
    want = {r.id: (r.token_ids, r.logprobs) for r in LLM(two_layer_checkpoint, **settings).generate(
        [Request(i, ids, SamplingParams(max_tokens=tokens, temperature=t, seed=7, logprobs=True),
                 stop_token_ids=()) for i, ids, tokens, t in requests])}
    (_, (results, replays, sent)), (_, (_, follower_replays, follower_sent)) = _spawn_layout(
        _tensor_parallel_graph_worker, 2, dict(tp=2), two_layer_checkpoint, requests, settings)
    assert replays == follower_replays == 5  # the decode steps went through the static buffers
    assert sent == follower_sent  # the ranks met in the same broadcasts
    # the prompts' step (eager) and two decode steps with a sampled row send; the greedy three do not
    assert sent == [2, 2, 2], sent
    assert sorted(results) == sorted(want)
    for i, (tokens, logprobs) in want.items():
        assert results[i][0] == tokens, i
        assert max(abs(a - b) for a, b in zip(results[i][1], logprobs)) < 1e-4, i
