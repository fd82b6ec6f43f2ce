"""The reference model: parity with Hugging Face transformers, both checkpoint layouts, the KV cache
(decode, chunked prefill, batching), bfloat16, and the reference ops against hand formulas
(docs/gpt-oss-spec.md §4)."""

import dataclasses

import pytest
import torch
import transformers
from routing_probe import RouteRecorder, all_pages, first_route_change

from runtime.checkpoint import CheckpointReader
from runtime.config import preset
from runtime.model import GptOss
from runtime.options import options
from runtime.step import SequenceChunk, Step


def prompt(length, seed):
    """Random ordinary token ids (below the specials at 199998), reproducible from `seed`."""
    return torch.randint(0, 199998, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, tokens, start=0, cache=None, logits_at=None):
    """One sequence's chunk `tokens` at positions start.. in one Step; logits at `logits_at` (default all)."""
    n = len(tokens)
    cache = model.new_cache() if cache is None else cache
    indices = torch.arange(n) if logits_at is None else torch.tensor(logits_at)
    return model(Step(torch.tensor(tokens), torch.arange(start, start + n), [SequenceChunk(start, n, cache)],
                      indices))


def load(path, dtype):
    reader = CheckpointReader(path)
    return GptOss(reader.config, dtype).load(reader)


@pytest.fixture(scope="module")
def f32(tiny_checkpoints):
    return load(tiny_checkpoints["hf"], torch.float32)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    # Eager attention: transformers' sdpa path drops the sinks (docs/environment.md). On CPU the MXFP4
    # experts load only dequantized; the values are exact in any float dtype.
    model = transformers.GptOssForCausalLM.from_pretrained(
        tiny_checkpoints["hf"], dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    return model.float().eval()


# ------------------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("length, seed", [(9, 0), (23, 1), (40, 2)])
def test_float32_logits_match_transformers(f32, hf_model, length, seed):
    """Every position of prompts longer than the tiny sliding window (8), against GptOssForCausalLM.

    Tolerance 1e-4 on logits and on log-probabilities: both models run in float32 from bit-identical
    weights (MXFP4 decodes exactly), so only the summation order differs; we measured ~4e-6 on logits
    of magnitude ~5. A wrong formula (mask, sink, RoPE, routing, clamp) moves logits by >1e-2.
    """
    tokens = prompt(length, seed)
    with torch.no_grad():
        expected = hf_model(torch.tensor([tokens])).logits[0].float()
    got = run(f32, tokens)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape == (length, f32.cfg.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got.log_softmax(-1) - expected.log_softmax(-1)).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_both_layouts_give_identical_logits(f32, tiny_checkpoints):
    original = load(tiny_checkpoints["original"], torch.float32)
    tokens = prompt(17, 5)
    assert torch.equal(run(original, tokens), run(f32, tokens))


def test_load_refuses_a_checkpoint_of_another_shape(tiny_checkpoints):
    other = dataclasses.replace(preset("tiny"), num_hidden_layers=2)
    with pytest.raises(ValueError, match="config"):
        GptOss(other, torch.float32).load(CheckpointReader(tiny_checkpoints["original"]))


def test_layers_alternate_sliding_and_full(f32):
    windows = [block.attn.window for block in f32.block]
    assert windows == [8, None, 8, None]  # docs/gpt-oss-spec.md §1.3: even layers are banded


# ------------------------------------------------------------------------------ KV cache
def test_cached_greedy_decode_equals_full_recompute(f32):
    # Cached: prefill once, then one token per Step. Recompute: a fresh cache and the whole sequence
    # every time. Float32 on both sides, so only summation order differs: 1e-5 on logits of ~5.
    tokens = prompt(10, 11)
    cache = f32.new_cache()
    logits = run(f32, tokens, cache=cache, logits_at=[len(tokens) - 1])[0]
    cached_tokens, cached_logits = [], []
    for _ in range(12):
        cached_logits.append(logits)
        cached_tokens.append(int(logits.argmax()))
        position = len(tokens) + len(cached_tokens) - 1
        logits = run(f32, cached_tokens[-1:], start=position, cache=cache, logits_at=[0])[0]

    sequence = list(tokens)
    for i in range(12):
        full = run(f32, sequence, logits_at=[len(sequence) - 1])[0]
        assert (full - cached_logits[i]).abs().max().item() <= 1e-5, f"generated token {i}"
        sequence.append(int(full.argmax()))
    assert sequence[len(tokens):] == cached_tokens


def test_chunked_prefill_equals_one_shot(f32):
    tokens = prompt(23, 12)
    one_shot = run(f32, tokens)
    cache, pieces, start = f32.new_cache(), [], 0
    for size in (5, 7, 11):  # the last chunk is longer than the window and starts past it
        pieces.append(run(f32, tokens[start:start + size], start=start, cache=cache))
        start += size
    chunked = torch.cat(pieces)
    assert (chunked[-1] - one_shot[-1]).abs().max().item() <= 1e-5
    assert (chunked - one_shot).abs().max().item() <= 1e-5  # every position, not only the last


def test_batched_step_equals_each_sequence_alone(f32):
    a, b = prompt(11, 21), prompt(19, 22)
    cache_a, cache_b = f32.new_cache(), f32.new_cache()
    step = Step(torch.tensor(a + b), torch.cat((torch.arange(11), torch.arange(19))),
                [SequenceChunk(0, 11, cache_a), SequenceChunk(0, 19, cache_b)], torch.tensor([29, 3, 10, 11]))
    both = f32(step)
    alone_a, alone_b = run(f32, a), run(f32, b)
    expected = torch.stack((alone_b[18], alone_a[3], alone_a[10], alone_b[0]))
    assert (both - expected).abs().max().item() <= 1e-5

    # Next step mixes a decode token of `a` (position 11) with a 6-token prompt chunk of `b` (19..24).
    next_a, more_b = 1234, prompt(6, 23)
    step = Step(torch.tensor([next_a] + more_b), torch.cat((torch.tensor([11]), torch.arange(19, 25))),
                [SequenceChunk(11, 1, cache_a), SequenceChunk(19, 6, cache_b)], torch.arange(7))
    mixed = f32(step)
    assert (mixed[0] - run(f32, a + [next_a], logits_at=[11])[0]).abs().max().item() <= 1e-5
    assert (mixed[1:] - run(f32, b + more_b)[19:]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------ bfloat16
def test_bfloat16_model_is_close_to_float32(f32, tiny_checkpoints):
    """bf16 activations against the float32 model on the same weights (docs/gpt-oss-spec.md §5.3 bf16-rounding
    tolerances): log-softmax max |diff| <= 0.1 and mean <= 0.02 (one bf16 ulp at |logit| ~ 5 is 0.03;
    we measured 0.056 / 0.0075), greedy top-1 agreement on >= 90% of the positions (measured 100%).
    The prompt is seeded: on some other prompts a router near-tie flips one expert and, as
    docs/gpt-oss-spec.md §5.2 says, that alone moves a position's log-probabilities by ~1, which is
    not a bug."""
    bf16 = load(tiny_checkpoints["hf"], torch.bfloat16)
    tokens = prompt(16, 0)
    got, expected = run(bf16, tokens), run(f32, tokens)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    diff = (got.log_softmax(-1) - expected.log_softmax(-1)).abs()
    assert diff.max().item() <= 0.1
    assert diff.mean().item() <= 0.02
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9
    assert not torch.equal(got, expected)  # it really ran in bf16


def test_randomize_is_deterministic_in_the_seed():
    cfg = dataclasses.replace(preset("tiny"), vocab_size=512, num_hidden_layers=2)
    a, b, c = (GptOss(cfg, torch.float32).randomize(s) for s in (3, 3, 4))
    tokens = prompt(12, 0)
    tokens = [t % 512 for t in tokens]
    la, lb, lc = run(a, tokens), run(b, tokens), run(c, tokens)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb) and not torch.equal(la, lc)


def full_logits(model, tokens):
    n = len(tokens)
    step = Step(torch.tensor(tokens, device=model.device), torch.arange(n, device=model.device),
                [SequenceChunk(0, n, model.new_cache())], torch.arange(n, device=model.device))
    return model(step)


@pytest.mark.gpu
def test_bf16_on_gpu_matches_fp32_on_cpu(tiny_checkpoints):
    reader = CheckpointReader(tiny_checkpoints["hf"])
    ref = GptOss(reader.config, torch.float32, "cpu").load(reader)
    gpu = GptOss(reader.config, torch.bfloat16, "cuda").load(reader)
    tokens = torch.randint(0, 199998, (48,)).tolist()
    a = torch.log_softmax(full_logits(ref, tokens), -1)
    b = torch.log_softmax(full_logits(gpu, tokens).cpu(), -1)
    # bf16 activations (8 bits of mantissa) through 4 layers: a few bf16 ulps of the logits
    # (docs/gpt-oss-spec.md §5.3 expects a mean |diff| of ~1e-2; measured 0.012-0.020 on an H100). The max
    # over all 10M entries is not bounded tightly: a flipped near-tie in routing moves single positions a lot.
    diff = (a - b).abs()
    assert diff.mean() < 0.05 and diff.amax(-1).median() < 0.5, (diff.mean(), diff.amax(-1).median())
    # Top-1 of a random tiny model is often a near-tie among 201,088 logits: a loose bound.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


@pytest.mark.gpu
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


@pytest.mark.gpu
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
    tokens = torch.randint(0, 199998, (200,),
                           generator=torch.Generator().manual_seed(seed)).tolist()  # > window
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
    print(f"{ops} {dtype}: incremental vs recompute log-softmax |diff| mean {diff.mean():.3g} "
          f"max {diff.max():.3g}, "
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
