"""Sampling parameters and the sampler on its own (no model): ranges, greedy rows, seeds."""

import math

import pytest
import torch

from runtime.requests import RequestError, parse_request
from runtime.sampling import SamplingParams, make_generator, sample_on_device


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
])
def test_out_of_range_parameters_are_refused_alike_from_python_and_json(field, value, message):
    """One table of ranges: SamplingParams built in Python (the LLM API) is checked as a JSON request is."""
    with pytest.raises(ValueError) as from_python:
        SamplingParams(**{field: value})
    with pytest.raises(RequestError) as from_json:
        parse(**{field: value})
    assert str(from_python.value) == str(from_json.value) == message
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1e-9, top_k=-1)  # each bound itself is allowed
    SamplingParams(max_tokens=2**31, temperature=100.0, top_p=1.0, top_k=2**31)


def test_nan_temperature_is_refused_from_python():
    with pytest.raises(ValueError, match="field 'temperature' must be in"):
        SamplingParams(temperature=math.nan)


def tied_rows(temperature: float, rows: int = 64) -> set[int]:
    """The tokens `rows` differently seeded rows draw where tokens 3 and 7 tie for the largest logit, a
    logit that overflows when divided by 1e-38."""
    logits = torch.zeros(rows, 1000)
    logits[:, [3, 7]] = 5.0
    tokens, _ = sample_on_device(logits, [SamplingParams(temperature=temperature)] * rows,
                                 [make_generator(seed, torch.device("cpu")) for seed in range(rows)])
    return set(tokens.tolist())


@pytest.mark.parametrize("temperature", [0.0, 1e-38, 1e-6])
def test_temperatures_below_1e_5_are_greedy(temperature):
    assert SamplingParams(temperature=temperature).greedy
    assert tied_rows(temperature) == {3}  # the first maximal id, as argmax takes it


def test_a_temperature_of_1e_4_samples():
    assert not SamplingParams(temperature=1e-4).greedy
    assert tied_rows(1e-4) == {3, 7}
