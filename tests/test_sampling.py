"""Sampling parameters and the sampler on its own (no model): ranges, greedy rows, seeds."""

import math

import pytest
import torch

from runtime.requests import RequestError, parse_request
from runtime.sampling import SamplingParams, SeededNoise, default_seed, sample_on_device


def parse(**fields):
    obj = {"id": "r", "prompt_token_ids": [1, 2, 3], **fields}
    return parse_request(obj, max_model_len=64, vocab_size=1000, default_max_tokens=4)


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", -1, "field 'max_tokens' must be in [1, 2147483648], got -1"),
    ("max_tokens", 2**31 + 1, "field 'max_tokens' must be in [1, 2147483648], got 2147483649"),
    ("temperature", -0.5, "field 'temperature' must be in [0.0, 100.0], got -0.5"),
    ("temperature", 100.5, "field 'temperature' must be in [0.0, 100.0], got 100.5"),
    ("top_p", 0.0, "field 'top_p' must be in [1e-09, 1.0], got 0.0"),
    ("top_p", 1.5, "field 'top_p' must be in [1e-09, 1.0], got 1.5"),
    ("top_k", -2, "field 'top_k' must be in [-1, 2147483648], got -2"),
    ("seed", 2**64, "field 'seed' must be in [-9223372036854775808, 18446744073709551615], "
                    "got 18446744073709551616"),
    ("seed", -(2**63) - 1, "field 'seed' must be in [-9223372036854775808, 18446744073709551615], "
                           "got -9223372036854775809"),
    ("top_logprobs", 21, "field 'top_logprobs' must be in [0, 20], got 21"),
    ("stop", 5, "field 'stop' must be a string or a list of up to 4 non-empty strings, got 5"),
    ("stop", ["a"] * 5, "field 'stop' must be a string or a list of up to 4 non-empty strings, "
                        "got ['a', 'a', 'a', 'a', 'a']"),
    ("stop", [""], "field 'stop' must be a string or a list of up to 4 non-empty strings, got ['']"),
])
def test_out_of_range_parameters_are_refused_alike_from_python_and_json(field, value, message):
    """One table of ranges: SamplingParams built in Python (the LLM API) is checked as a JSON request is."""
    with pytest.raises(ValueError) as from_python:
        SamplingParams(**{field: value})
    with pytest.raises(RequestError) as from_json:
        parse(**{field: value})
    assert str(from_python.value) == str(from_json.value) == message
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1e-9, top_k=-1, seed=-(2**63))  # the bounds pass
    SamplingParams(max_tokens=2**31, temperature=100.0, top_p=1.0, top_k=2**31, seed=2**64 - 1)


def test_nan_temperature_is_refused_from_python():
    with pytest.raises(ValueError, match="field 'temperature' must be in"):
        SamplingParams(temperature=math.nan)


def tied_rows(temperature: float, rows: int = 64) -> set[int]:
    """The tokens `rows` differently seeded rows draw where tokens 3 and 7 tie for the largest logit, a
    logit that overflows when divided by 1e-38."""
    logits = torch.zeros(rows, 1000)
    logits[:, [3, 7]] = 5.0
    tokens, _ = sample_on_device(logits, [SamplingParams(temperature=temperature)] * rows,
                                 [SeededNoise(seed, "cpu") for seed in range(rows)])
    return set(tokens.tolist())


@pytest.mark.parametrize("temperature", [0.0, 1e-38, 1e-6])
def test_temperatures_below_1e_5_are_greedy(temperature):
    assert SamplingParams(temperature=temperature).greedy
    assert tied_rows(temperature) == {3}  # the first maximal id, as argmax takes it


def test_a_temperature_of_1e_4_samples():
    assert not SamplingParams(temperature=1e-4).greedy
    assert tied_rows(1e-4) == {3, 7}


def noise(seed, device="cpu", n=4096):
    return SeededNoise(seed, device).exponential(n)


def sampled_tokens(seed, device="cpu", steps=16):
    """Tokens one request draws from a flat distribution over 1000 tokens, step after step."""
    source, logits = SeededNoise(seed, device), torch.zeros(1, 1000, device=device)
    return [int(sample_on_device(logits, [SamplingParams()], [source])[0]) for _ in range(steps)]


def test_seeds_count_to_64_bits_on_cpu():
    """torch's CPU generator keeps only a seed's low 32 bits: 1 and 1 + 2**32 sampled alike."""
    assert sampled_tokens(1) != sampled_tokens(1 + 2**32)
    assert sampled_tokens(2**32) != sampled_tokens(2**33)  # the same (zero) low bits
    assert sampled_tokens(-1) == sampled_tokens(2**64 - 1)  # seeds are taken mod 2**64
    assert sampled_tokens(1 + 2**32) == sampled_tokens(1 + 2**32)


@pytest.mark.parametrize("seed", [7, 7 + 2**40])
def test_cpu_noise_is_exp_1_finite_and_positive(seed):
    """Both CPU paths: one generator (high bits zero), and the mix of two."""
    draws = noise(seed, n=200_000)
    assert draws.dtype == torch.float32 and bool(torch.isfinite(draws).all()) and bool((draws > 0).all())
    draws = draws.double()
    # Exp(1): mean 1 and P(E > 1) = 1/e, each within ~5 standard errors over 200k draws
    assert float(draws.mean()) == pytest.approx(1.0, abs=0.012)
    assert float((draws > 1).double().mean()) == pytest.approx(math.exp(-1), abs=0.006)


@pytest.mark.gpu
def test_seeds_count_to_64_bits_on_cuda():
    assert sampled_tokens(1, "cuda") != sampled_tokens(1 + 2**32, "cuda")
    assert sampled_tokens(-1, "cuda") == sampled_tokens(2**64 - 1, "cuda")
    assert sampled_tokens(1 + 2**32, "cuda") == sampled_tokens(1 + 2**32, "cuda")
    # CUDA draws exactly what torch's own generator does with the seed (Philox keeps all 64 bits)
    torch_draws = torch.empty(4096, device="cuda").exponential_(
        generator=torch.Generator("cuda").manual_seed(1 + 2**32))
    assert torch.equal(noise(1 + 2**32, "cuda"), torch_draws)


def test_default_seeds_are_a_stable_hash_of_the_engine_seed_and_the_id():
    # Pinned: the same in every process and Python version (hash() of a str is salted per process).
    assert default_seed(0, "r1") == 10175615044903777583
    assert default_seed(0, 7) != default_seed(0, "7")
    assert default_seed(0, 7) != default_seed(1, 7)
    assert 0 <= default_seed(-5, "x" * 1000) < 2**64
