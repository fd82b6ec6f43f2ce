"""The model's Triton path (paged attention, fused norm and RoPE, MoE GEMMs) against its reference
path, on CPU through Triton's interpreter (GPT_OSS_TRITON=1): the same tiny fp32 model, a batch
mixing a prompt chunk over a cached prefix with single-token decodes, across several steps.

Only the summation order differs (fp32 everywhere), so log-probabilities agree to 1e-4.
"""

import os
import sys
from pathlib import Path

import torch

assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

sys.path.insert(0, str(Path(__file__).parent))

from routing_probe import RouteRecorder, first_route_change, poison  # noqa: E402

from runtime.checkpoint import CheckpointReader  # noqa: E402
from runtime.model import GptOss  # noqa: E402
from runtime.options import options  # noqa: E402
from runtime.step import SequenceChunk, Step  # noqa: E402


def steps(model, plan, seed):
    """Run `plan` (a list of steps, each a list of (sequence, new tokens)) and return the log-probs of
    every step's last token per sequence."""
    gen = torch.Generator().manual_seed(seed)
    caches, lengths, out = {}, {}, []
    for step in plan:
        ids, positions, chunks, last = [], [], [], []
        for seq, n in step:
            cache = caches.setdefault(seq, model.new_cache())
            start = lengths.get(seq, 0)
            ids += torch.randint(0, 199998, (n,), generator=gen).tolist()
            positions += list(range(start, start + n))
            chunks.append(SequenceChunk(start, n, cache))
            lengths[seq] = start + n
            last.append(len(ids) - 1)
        s = Step(torch.tensor(ids), torch.tensor(positions), chunks, torch.tensor(last))
        out.append(torch.log_softmax(model(s), -1))
    return out


# window 8 in the tiny model: prompts of 11 and 21 tokens cross it; page size 16 puts sequences over pages.
PLAN = [[(0, 11), (1, 3)], [(0, 1), (1, 21), (2, 5)], [(0, 1), (1, 1), (2, 1)], [(2, 17), (0, 1)]]


def test_triton_path_matches_the_reference_path(two_layer_checkpoint, monkeypatch):
    """The plan's steps (chunks, decodes, pages and the window crossed) on the kernel path against the
    reference path: log-probs within 1e-4 (the two-layer cut: one sliding and one full layer)."""
    reader = CheckpointReader(two_layer_checkpoint)
    model = GptOss(reader.config, torch.float32, "cpu").load(reader)
    monkeypatch.setattr(options, "kernels_on_cpu", True)
    poison(model)
    fast = steps(model, PLAN, seed=7)
    assert model.pool is not None and model.pool.num_pages >= 4
    monkeypatch.setattr(options, "kernels_on_cpu", False)
    model.pool = None  # a fresh pool: the reference path runs on its own caches
    poison(model)
    ref = steps(model, PLAN, seed=7)
    for a, b in zip(fast, ref):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() < 1e-4, (a - b).abs().max()


def test_kernel_path_decode_matches_one_forward(two_layer_checkpoint, monkeypatch):
    """Prefill 21 tokens, decode 9 one at a time (window 8, pages of 16 crossed) == one 30-token
    forward, on the kernel path; positions after a rounding-flipped near-tied route excepted."""
    reader = CheckpointReader(two_layer_checkpoint)
    model = GptOss(reader.config, torch.float32, "cpu").load(reader)
    monkeypatch.setattr(options, "kernels_on_cpu", True)
    poison(model)
    tokens = torch.randint(0, 199998, (30,)).tolist()
    routes = RouteRecorder(monkeypatch, reader.config.num_hidden_layers)
    full = steps_of(model, tokens, [30])
    full_routes = routes.take()
    incremental = steps_of(model, tokens, [21] + [1] * 8)
    change = first_route_change(full_routes, routes.take(), reader.config.experts_per_token)
    if change is not None:
        assert change.gap < 1e-3 * change.scale, change
    end = 29 if change is None else change.position
    for pos in range(20, end):
        assert (full[pos] - incremental[pos]).abs().max() < 1e-4, pos


def steps_of(model, tokens, lengths):
    """Log-probs at every position, feeding `tokens` in steps of the given lengths through one cache."""
    cache, start, out = model.new_cache(), 0, []
    for n in lengths:
        s = Step(torch.tensor(tokens[start:start + n]), torch.arange(start, start + n),
                 [SequenceChunk(start, n, cache)], torch.arange(n))
        out.append(torch.log_softmax(model(s), -1))
        start += n
    return torch.cat(out)


def test_first_route_change_finds_the_earliest_flip_and_its_gap():
    a = [torch.randn(6, 8) for _ in range(3)]
    b = [t.clone() for t in a]
    assert first_route_change(a, b, 2) is None
    top = torch.topk(b[2][4], 3).indices  # swap the 2nd and 3rd experts of position 4, layer 2
    b[2][4, top[1]], b[2][4, top[2]] = b[2][4, top[2]].item(), b[2][4, top[1]].item()
    b[1][5] = -b[1][5]  # a later, larger change must not be reported first
    change = first_route_change(a, b, 2)
    assert (change.position, change.layer) == (4, 2) and change.gap > 0


def test_engine_on_the_kernel_path_matches_the_reference_engine(two_layer_checkpoint, monkeypatch):
    """The whole engine (fixed KV pool, preemption, sliding pages given back mid-sequence) on the
    Triton kernels, interpreted, gives the reference engine's tokens, on a float8 KV cache
    (kv_cache_dtype=fp8: its stores round alike on both paths, tests/test_kv_fp8.py; a cache of the
    model's dtype runs the same kernels in tests/test_cuda_graphs.py's engine test). Against the exact
    cache, the first token (before any sampled token feeds back) moves only by the rounding of the
    prompt's keys and values."""
    from runtime.engine import LLM
    from runtime.kv_cache import RELEASED
    from runtime.requests import Request
    from runtime.sampling import SamplingParams

    gen = torch.Generator().manual_seed(3)
    reqs = [Request(i, torch.randint(0, 199998, (n,), generator=gen).tolist(),
                    SamplingParams(max_tokens=6, temperature=0, logprobs=True), stop_token_ids=())
            for i, n in enumerate((26, 19, 30))]
    settings = dict(dtype="float32", device="cpu", max_batch_size=3, max_batch_tokens=32, kv_cache_tokens=64,
                    schedule_conservativeness=0)
    exact = LLM(two_layer_checkpoint, **settings).generate(reqs)
    ref = LLM(two_layer_checkpoint, kv_cache_dtype="fp8", **settings)
    assert ref.model.pool.dtype == torch.float8_e4m3fn
    want = ref.generate(reqs)
    monkeypatch.setattr(options, "kernels_on_cpu", True)
    fast = LLM(two_layer_checkpoint, kv_cache_dtype="fp8", **settings)
    released = []
    forward = fast.model.forward

    def watched(step):
        released.append(sum(p == RELEASED for c in step.chunks for p in c.cache.sliding_pages))
        return forward(step)

    fast.model.forward = watched
    got = fast.generate(reqs)
    for g, w, e in zip(got, want, exact):
        assert g.error is None and g.token_ids == w.token_ids
        # fp32 sums in another order can put a key or value on the other side of a float8 rounding
        # boundary (one step of 2^-3 relative): logprobs within 5e-3 (measured up to 8e-4), not 1e-4.
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 5e-3
        assert 0 < abs(w.logprobs[0] - e.logprobs[0]) < 0.5
    assert max(released) > 0 and fast.preemptions > 0  # both paths really ran
