"""Sampling parameters and the sampler on its own (no model): ranges, greedy rows, seeds."""

import math

import pytest

from runtime.requests import RequestError, parse_request
from runtime.sampling import SamplingParams


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
