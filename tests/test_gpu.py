"""On a CUDA GPU: the model in bfloat16 against the float32 reference, the real shapes, the batch job.

Skipped where torch sees no GPU (CI); run on the device before saying a GPU change is done.
"""

import json

import pytest
import torch

from runtime import mxfp4
from runtime.checkpoint import CheckpointReader, random_tensor, tensor_specs
from runtime.config import preset
from runtime.engine import LLM
from runtime.model import GptOss
from runtime.step import SequenceChunk, Step
from runtime.options import options
from routing_probe import RouteRecorder, all_pages, first_route_change

pytestmark = pytest.mark.gpu


def full_logits(model, tokens):
    n = len(tokens)
    step = Step(torch.tensor(tokens, device=model.device), torch.arange(n, device=model.device),
                [SequenceChunk(0, n, model.new_cache())], torch.arange(n, device=model.device))
    return model(step)


def test_bf16_on_gpu_matches_fp32_on_cpu(tiny_checkpoints):
    reader = CheckpointReader(tiny_checkpoints["hf"])
    ref = GptOss(reader.config, torch.float32, "cpu").load(reader)
    gpu = GptOss(reader.config, torch.bfloat16, "cuda").load(reader)
    tokens = torch.randint(0, 199998, (48,)).tolist()
    a = torch.log_softmax(full_logits(ref, tokens), -1)
    b = torch.log_softmax(full_logits(gpu, tokens).cpu(), -1)
    # bf16 activations (8 bits of mantissa) through 4 layers: a few bf16 ulps of the logits
    # (spec §5.3 expects a mean |diff| of ~1e-2; measured 0.012-0.020 on an H100). The max over all
    # 10M entries is not bounded tightly: a flipped near-tie in routing moves single positions a lot.
    diff = (a - b).abs()
    assert diff.mean() < 0.05 and diff.amax(-1).median() < 0.5, (diff.mean(), diff.amax(-1).median())
    # Top-1 of a random tiny model is often a near-tie among 201,088 logits: a loose bound.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_dummy_20b_triton_experts_match_the_reference_model(monkeypatch):
    """The whole 20b model (float32) on the Triton kernels against the same model on the reference ops."""
    cfg = preset("gpt-oss-20b")
    model = GptOss(cfg, torch.float32, "cuda").randomize(0)
    tokens = torch.randint(0, 199998, (64,)).tolist()
    routes = RouteRecorder(monkeypatch, cfg.num_hidden_layers)
    fast = torch.log_softmax(full_logits(model, tokens), -1)
    fast_routes = routes.take()
    monkeypatch.setattr(options, "reference", True)
    ref = torch.log_softmax(full_logits(model, tokens), -1)
    change = first_route_change(fast_routes, routes.take(), cfg.experts_per_token)
    per_token = (fast - ref).abs().amax(-1)
    print(f"triton vs reference ops, 20b fp32, max |dlogp| per token: median {per_token.median():.3g}, "
          f"max {per_token.max():.3g}; first route change {change}")
    # fp32 throughout, so only summation order differs; positions from a near-tied route that
    # rounding flipped on may differ (tests/routing_probe.py), a route changed without a tie may not.
    if change is not None:
        assert change.gap < 1e-3 * change.scale, change
    assert (per_token[:64 if change is None else change.position] < 1e-3).all(), (change, per_token)


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_mxfp4_decode_on_gpu_is_exact_at_real_shapes(name):
    spec = tensor_specs(preset(name))["block.0.mlp.mlp1_weight.blocks"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = random_tensor(spec, gen, "cuda")[:2]
    scales = random_tensor(tensor_specs(preset(name))["block.0.mlp.mlp1_weight.scales"], gen, "cuda")[:2]
    gpu = mxfp4.decode(blocks, scales, torch.bfloat16)
    cpu = mxfp4.decode(blocks.cpu(), scales.cpu(), torch.float32)
    assert torch.equal(gpu.cpu().float(), cpu)


@pytest.mark.parametrize("ops, dtype", [("reference", torch.float32), ("reference", torch.bfloat16),
                                        ("triton", torch.float32)])
def test_dummy_20b_kv_cache_decode_matches_recompute(ops, dtype, monkeypatch):
    """Prefill 150 then decode 49 one at a time == one 200-token forward (paged KV, window crossed)."""
    monkeypatch.setattr(options, "reference", ops == "reference")
    cfg = preset("gpt-oss-20b")
    model = GptOss(cfg, dtype, "cuda").randomize(0)
    model.new_cache().release()  # makes the KV pool: poison it, so reading an unwritten slot shows
    for pages in all_pages(model):
        pages.fill_(float("nan"))
    seed = int(torch.randint(0, 2**31, ()))  # fresh tokens each run; the seed is in any failure message
    tokens = torch.randint(0, 199998, (200,), generator=torch.Generator().manual_seed(seed)).tolist()  # > window
    routes = RouteRecorder(monkeypatch, cfg.num_hidden_layers)
    full = full_logits(model, tokens)
    full_routes = routes.take()
    assert torch.isfinite(full).all()
    cache = model.new_cache()
    dev = model.device
    prefix = Step(torch.tensor(tokens[:150], device=dev), torch.arange(150, device=dev),
                  [SequenceChunk(0, 150, cache)], torch.tensor([149], device=dev))
    last = [model(prefix)]
    for pos in range(150, 199):
        step = Step(torch.tensor([tokens[pos]], device=dev), torch.tensor([pos], device=dev),
                    [SequenceChunk(pos, 1, cache)], torch.tensor([0], device=dev))
        last.append(model(step))
    a, b = torch.log_softmax(full[149:199], -1), torch.log_softmax(torch.cat(last), -1)
    diff = (a - b).abs()
    change = first_route_change(full_routes, routes.take(), cfg.experts_per_token)
    print(f"{ops} {dtype}: incremental vs recompute log-softmax |diff| mean {diff.mean():.3g} max {diff.max():.3g}, "
          f"top-1 agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}; first route change {change}")
    if dtype == torch.float32:
        # Same math in fp32 (no TF32): only summation order differs between the GEMM shapes. Positions
        # from the first changed route on may legitimately differ, if that change was a near tie.
        if change is not None:
            assert change.gap < 1e-3 * change.scale, (seed, change)  # else a real difference, not rounding
        agree = diff.amax(-1)[:max(0, (199 if change is None else change.position) - 149)]
        assert (agree < 1e-3).all(), (seed, change, agree)
    else:
        # A random 24-layer model amplifies bf16 rounding (and flips near-tied routes), so only a loose
        # bound holds; the fp32 case above is the exactness check.
        assert diff.mean() < 1.0


def test_batch_llm_on_cuda_bf16(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["original"], dtype="bfloat16", device="cuda")
    results = llm.generate([{"id": i, "prompt_token_ids": [1000 + i] * (5 + i), "max_tokens": 6, "temperature": 0,
                             "ignore_eos": True} for i in range(4)])
    assert [len(r.token_ids) for r in results] == [6] * 4
    assert json.dumps([r.to_json() for r in results])


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("tokens", [1, 5, 61, 100, 700, 4096])
def test_triton_experts_match_the_reference_at_real_shapes(name, tokens):
    """Every tile shape choose_tiles picks (1 to 4096 tokens), the PTX decode, both entry points."""
    from runtime.kernels.moe import expert_rows, route
    from runtime.kernels.moe_gemm import expert_rows_triton, grouped_mxfp4, moe_triton, plan

    cfg = preset(name)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    args = [random_tensor(specs[f"block.0.mlp.{k}"], gen, "cuda") for k in
            ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias", "mlp2_weight.blocks", "mlp2_weight.scales",
             "mlp2_bias")]
    expert_ids, weights = route(torch.randn(tokens, cfg.num_experts, device="cuda"), cfg.experts_per_token)
    h = torch.randn(tokens, cfg.hidden_size, device="cuda")
    rows = h.repeat_interleave(cfg.experts_per_token, 0)
    experts = expert_ids.reshape(-1)
    # fp32 activations: the dots run in fp32 (ieee), so only the decode could make a large error.
    fp32_args = [a.float() if a.is_floating_point() else a for a in args]  # the biases, as an fp32 model holds them
    ref = expert_rows(rows, experts, *fp32_args, cfg.swiglu_limit)
    got = expert_rows_triton(rows, experts, *fp32_args, cfg.swiglu_limit)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    # bf16 activations and operands, fp32 accumulation in both.
    hb = h.to(torch.bfloat16)
    ref = expert_rows(hb.repeat_interleave(cfg.experts_per_token, 0), experts, *args, cfg.swiglu_limit)
    want = (ref.view(tokens, -1, cfg.hidden_size) * weights[..., None]).sum(1)
    got = moe_triton(hb, expert_ids, weights, *args, cfg.swiglu_limit).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel
    p = plan(experts, cfg.num_experts)
    poisoned = torch.full((len(experts), cfg.intermediate_size), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_mxfp4(hb, p.order, cfg.experts_per_token, p, *args[:3], torch.bfloat16, swiglu_limit=cfg.swiglu_limit,
                  out=poisoned)
    assert torch.isfinite(poisoned).all()  # every element written


def _random_experts(E, n, k, gen):
    """Random MXFP4 experts [E, n, k] on the GPU (blocks, scales, bf16 bias), some scale bytes at the
    tensor-core routes' lower end (66)."""
    blocks = torch.randint(0, 256, (E, n, k // 32, 16), dtype=torch.uint8, device="cuda", generator=gen)
    scales = torch.randint(110, 131, (E, n, k // 32), dtype=torch.uint8, device="cuda", generator=gen)
    scales[:, ::7, ::5] = 66
    return blocks, scales, torch.randn(E, n, device="cuda", generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("split", [1, 2])  # 2: each expert's intermediate dimension halved (tensor parallelism)
@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_gemv_on_tensor_cores_matches_the_cuda_core_route(name, split, tokens):
    """The one-row GEMV on tensor cores (decode "mma") against the CUDA-core one on the same bf16
    inputs, mlp1 (SwiGLU) and mlp2: both sum exact products in fp32, so only the order of the sums
    differs. K = 2880 and 1440 end in a partial chunk; every output element is written (poisoned
    first); some scale bytes sit at the route's lower end (66)."""
    import dataclasses

    from runtime.kernels.moe import route
    from runtime.kernels.moe_gemm import choose_tiles, grouped_mxfp4, mma_gemv_fits, plan

    cfg = preset(name)
    E, d, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size // split
    gen = torch.Generator(device="cuda").manual_seed(tokens + 10 * split)

    w1, w2 = _random_experts(E, 2 * inter, d, gen), _random_experts(E, d, inter, gen)
    expert_ids, _ = route(torch.randn(tokens, E, device="cuda", generator=gen), cfg.experts_per_token)
    p = plan(expert_ids.reshape(-1), E)
    h = torch.randn(tokens, d, device="cuda", generator=gen).to(torch.bfloat16)
    mma1, mma2 = choose_tiles(p.num_rows, E, True), choose_tiles(p.num_rows, E, False)  # the model's tiles
    assert mma1.decode == mma2.decode == "mma"
    assert mma_gemv_fits(h, w1[1], mma1) and mma_gemv_fits(h, w2[1], mma2)
    outs = {}
    for decode in ("mma", "fp16"):
        act = torch.full((p.num_rows, inter), float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w1, torch.bfloat16, swiglu_limit=cfg.swiglu_limit,
                      tiles=dataclasses.replace(mma1, decode=decode), out=act)
        act_in = outs["mma"][0] if decode == "fp16" else act  # the same mlp2 input for both routes
        y = torch.full((p.num_rows, d), float("nan"), dtype=torch.float32, device="cuda")
        grouped_mxfp4(act_in, None, 1, p, *w2, torch.float32, tiles=dataclasses.replace(mma2, decode=decode), out=y)
        assert torch.isfinite(act).all() and torch.isfinite(y).all()
        outs[decode] = (act, y)
    (act, y), (act_ref, y_ref) = outs["mma"], outs["fp16"]
    # bf16 outputs of fp32 sums that differ in order: one bf16 rounding apart, or cancellation's noise
    a, b = act.float(), act_ref.float()
    assert ((a - b).abs() <= 2 ** -7 * b.abs() + 1e-4 * b.abs().max()).all()
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-5


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("block_t", [8, 16])
@pytest.mark.parametrize("tokens", [3, 16, 64])
def test_moe_multi_row_gemv_on_tensor_cores_matches_the_cuda_core_route(name, block_t, tokens):
    """The multi-row tensor-core GEMV (decode "mma_rows", 8 or 16 rows a tile) against the CUDA-core
    GEMV with one row a tile, on the same bf16 inputs, mlp1 (SwiGLU, rows gathered from the tokens)
    and mlp2: both sum exact products in fp32, so only the order of the sums differs. Experts get
    from 1 to over 16 rows (one expert is given a whole batch's worth), so tiles are full, partial,
    and an expert spans several; every output element is written (poisoned first)."""
    import dataclasses

    from runtime.kernels.moe import route
    from runtime.kernels.moe_gemm import PROBE_REFERENCE_TILES, Tiles, grouped_mxfp4, mma_gemv_fits, plan

    cfg = preset(name)
    E, d, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device="cuda").manual_seed(tokens + 100 * block_t)

    w1, w2 = _random_experts(E, 2 * inter, d, gen), _random_experts(E, d, inter, gen)
    expert_ids, _ = route(torch.randn(tokens, E, device="cuda", generator=gen), cfg.experts_per_token)
    expert_ids[:, 0] = 5  # one expert on every token
    p = plan(expert_ids.reshape(-1), E)
    h = torch.randn(tokens, d, device="cuda", generator=gen).to(torch.bfloat16)
    tiles = Tiles(block_t, 64, 128, 4, 1, "gemv", decode="mma_rows")
    assert mma_gemv_fits(h, w1[1], tiles) and mma_gemv_fits(h, w2[1], tiles)
    outs = {}
    for t in (tiles, PROBE_REFERENCE_TILES):
        act = torch.full((p.num_rows, inter), float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w1, torch.bfloat16, swiglu_limit=cfg.swiglu_limit,
                      tiles=t, out=act)
        act_in = outs[tiles][0] if t is PROBE_REFERENCE_TILES else act  # the same mlp2 input for both routes
        y = torch.full((p.num_rows, d), float("nan"), dtype=torch.float32, device="cuda")
        grouped_mxfp4(act_in, None, 1, p, *w2, torch.float32, tiles=t, out=y)
        assert torch.isfinite(act).all() and torch.isfinite(y).all()
        outs[t] = (act, y)
    (act, y), (act_ref, y_ref) = outs[tiles], outs[PROBE_REFERENCE_TILES]
    # bf16 outputs of fp32 sums that differ in order: one bf16 rounding apart, or cancellation's noise
    a, b = act.float(), act_ref.float()
    assert ((a - b).abs() <= 2 ** -7 * b.abs() + 1e-4 * b.abs().max()).all()
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-5


@pytest.mark.parametrize("top_scale", [128, 131])  # <= 128: the folded one-multiply decode; above: two
def test_triton_decode_at_both_scale_ranges(top_scale):
    from runtime.kernels.moe import expert_rows
    from runtime.kernels.moe_gemm import expert_rows_triton, scales_fold

    E, d, inter = 4, 256, 256
    w1 = [torch.randint(0, 256, (E, 2 * inter, d // 32, 16), dtype=torch.uint8, device="cuda"),
          torch.randint(top_scale - 8, top_scale + 1, (E, 2 * inter, d // 32), dtype=torch.uint8, device="cuda"),
          torch.randn(E, 2 * inter, device="cuda")]
    w2 = [torch.randint(0, 256, (E, d, inter // 32, 16), dtype=torch.uint8, device="cuda"),
          torch.randint(top_scale - 8, top_scale + 1, (E, d, inter // 32), dtype=torch.uint8, device="cuda"),
          torch.randn(E, d, device="cuda")]
    assert scales_fold(w1[1]) == (top_scale <= 128)
    experts = torch.randint(0, E, (40,), device="cuda")
    x = torch.randn(40, d, device="cuda") * 2.0 ** (120 - top_scale)
    ref = expert_rows(x, experts, *w1, *w2, 1e30)  # no clamp: exercise the decode's whole range
    got = expert_rows_triton(x, experts, *w1, *w2, 1e30)
    assert torch.isfinite(ref).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel


def test_cuda_graph_decode_replays_the_static_forward_exactly():
    """Decode steps replayed from CUDA graphs (the engine's default on CUDA) give bit for bit the
    tokens and logprobs of the same static-buffer forward run without graphs, over several padded
    sizes, preemption and sampled requests. (That forward equals the reference engine's tokens:
    tests/test_kernel_path.py checks it on CPU.)"""
    import dataclasses

    from runtime.cuda_graphs import DecodeGraphs
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    gen = torch.Generator().manual_seed(11)
    reqs = [Request(i, torch.randint(0, 199998, (n,), generator=gen).tolist(),
                    SamplingParams(max_tokens=20 + 7 * i, temperature=0.8 if i % 3 == 2 else 0, seed=i, logprobs=True),
                    stop_token_ids=()) for i, n in enumerate((40, 300, 7, 1200, 90, 33, 500))]
    results = {}
    for replay in (True, False):
        llm = LLM("dummy", model=cfg, max_batch_size=6, max_batch_tokens=512, kv_cache_tokens=1536,
                  max_model_len=4096)
        if replay:
            assert llm._graphs is not None and llm._graphs.replay  # on by default on CUDA
        else:
            llm._graphs = DecodeGraphs(llm.model, llm.max_batch_size, llm.max_model_len, llm._sampled, replay=False)
        results[replay] = llm.generate(reqs)
        assert llm.preemptions > 0 and len(llm._graphs.replays) >= 3, (llm.preemptions, llm._graphs.replays)
    for a, b in zip(results[True], results[False]):
        assert a.error is None and a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_cuda_graph_decode_follows_the_eager_engine():
    """Graphs against the eager engine (whose attention splits the key range by the actual lengths,
    so sums differ in order): float32, so the tokens agree and their logprobs are close (a route
    flip needs a router near-tie of ~1e-6 in 4 layers x 9 decode steps: not expected)."""
    import dataclasses

    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    gen = torch.Generator().manual_seed(12)
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(), "max_tokens": 4,
             "temperature": 0, "logprobs": True, "ignore_eos": True} for i, n in enumerate((17, 260, 1000))]
    out = [LLM("dummy", model=cfg, dtype="float32", max_batch_size=4, kv_cache_tokens=4096,
               enforce_eager=eager).generate(reqs) for eager in (False, True)]
    for graph, eager in zip(*out):
        assert graph.token_ids == eager.token_ids
        assert max(abs(a - b) for a, b in zip(graph.logprobs, eager.logprobs)) < 1e-3


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
    reqs = [{"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(), "max_tokens": 12,
             "temperature": 0, "logprobs": True, "ignore_eos": True} for i, n in enumerate((9, 700, 130))]
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setattr(options, "pdl", flag == "1")
        llm = LLM("dummy", model=cfg, max_batch_size=4, kv_cache_tokens=4096)
        results[flag] = llm.generate(reqs[:1]) + llm.generate(reqs)
    for a, b in zip(results["1"], results["0"]):
        assert a.error is None and a.token_ids == b.token_ids and a.logprobs == b.logprobs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graphs_capture_tensor_parallel_collectives(tmp_path):
    """tp=2 on two GPUs (NCCL): decode steps replayed from graphs, with the all-reduces and the
    logits' all-gather captured inside them, give the eager tp=2 engine's tokens, and logprobs within
    1e-3 (float32; the graph's attention splits the key range as for max_model_len, so sums differ
    in order). Both runs must have replayed graphs, or the test would compare eager with eager."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    gen = torch.Generator().manual_seed(21)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt_token_ids": torch.randint(0, 199998, (n,), generator=gen).tolist(),
                                       "max_tokens": 6, "temperature": 0, "logprobs": True, "ignore_eos": True}) + "\n"
                           for i, n in enumerate((9, 130, 700))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    out = {}
    for eager in (False, True):
        path = tmp_path / f"eager_{eager}.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "launch.batch",
             "checkpoint=dummy", "model=gpt-oss-20b", "model.num_hidden_layers=4", "dtype=float32", "device=cuda",
             f"input={inp}", f"output={path}", "progress=false", "parallel.tp=2", "kv_cache_tokens=4096",
             "max_batch_size=4", f"enforce_eager={str(eager).lower()}"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        replays = int(done.stderr.split(" decode steps replayed from CUDA graphs")[0].rsplit(" ", 1)[-1])
        assert (replays == 0) if eager else (replays > 0), done.stderr[-1000:]
        out[eager] = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    for i, graph in out[False].items():
        eager = out[True][i]
        assert graph.get("error") is None and graph["token_ids"] == eager["token_ids"], (graph, eager)
        assert max(abs(a - b) for a, b in zip(graph["logprobs"], eager["logprobs"])) < 1e-3
