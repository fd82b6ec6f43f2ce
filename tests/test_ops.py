"""Reference operations against formulas worked by hand (spec §4)."""

import math

import pytest
import torch

from runtime.kernels.attention import attention
from runtime.kernels.moe import route, swiglu
from runtime.kernels.rmsnorm import rms_norm
from runtime.kernels.rope import apply_rope, cos_sin, yarn_frequencies


def test_yarn_frequencies_match_the_spec():
    inv_freq, c = yarn_frequencies(64, 150000.0, 32.0, 4096, 1.0, 32.0)
    expected = [1.0, 0.68904, 0.47478, 0.32715, 0.22542, 0.15532, 0.10702, 0.073745, 0.050813, 0.031706,
                0.019335, 0.011592, 0.0067950, 0.0038604, 0.0020938, 0.0010526, 4.5648e-4, 1.2932e-4, 3.8309e-5]
    assert inv_freq[: len(expected)].tolist() == pytest.approx(expected, rel=1e-4)
    assert inv_freq[-1].item() == pytest.approx(3.0235e-7, rel=1e-3)
    assert c == 1.3465735902799727


def test_rope_rotates_half_split_pairs():
    x = torch.randn(3, 2, 8)
    inv_freq = torch.tensor([1.0, 0.5, 0.25, 0.125])
    cos, sin = cos_sin(torch.tensor([0, 1, 5]), inv_freq, 2.0, torch.float32)
    out = apply_rope(x, cos, sin)
    t, i = 2, 1  # position 5, pair (1, 5)
    angle = 5 * 0.5
    a, b = x[t, :, i], x[t, :, i + 4]
    assert torch.allclose(out[t, :, i], 2 * (a * math.cos(angle) - b * math.sin(angle)), atol=1e-5)
    assert torch.allclose(out[t, :, i + 4], 2 * (b * math.cos(angle) + a * math.sin(angle)), atol=1e-5)
    assert torch.allclose(out[0], 2 * x[0])  # position 0: no rotation, only the concentration


def test_rms_norm():
    x, g = torch.randn(4, 16), torch.randn(16)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g
    assert torch.allclose(rms_norm(x, g, 1e-5), expected, atol=1e-6)


def test_sink_takes_probability_mass():
    # One query that sees only itself: p = exp(s) / (exp(s) + exp(sink)), output = p * v.
    q, k, v = torch.randn(1, 2, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    sinks = torch.tensor([0.3, -1.2])
    out = attention(q, k, v, sinks, q_start=0, k_start=0, sm_scale=0.5, window=None)
    for h in range(2):
        s = float(q[0, h] @ k[0, 0]) * 0.5
        p = math.exp(s) / (math.exp(s) + math.exp(float(sinks[h])))
        assert torch.allclose(out[0, h], p * v[0, 0], atol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_masks_causal_and_sliding(window):
    # With keys of zero logit and one-hot values, the output shows exactly which keys each query sees.
    n = 7
    q, k = torch.zeros(n, 1, n), torch.zeros(n, 1, n)
    v = torch.eye(n).view(n, 1, n)
    out = attention(q, k, v, torch.tensor([-100.0]), q_start=0, k_start=0, sm_scale=1.0, window=window)
    for t in range(n):
        seen = set(torch.nonzero(out[t, 0] > 1e-6).flatten().tolist())
        first = 0 if window is None else max(0, t - window + 1)
        assert seen == set(range(first, t + 1))  # keys t-W+1 .. t, the query's own position included


def test_gqa_maps_query_heads_to_kv_heads_in_groups():
    q = torch.randn(1, 4, 8)  # 4 query heads, 2 KV heads: heads 0,1 -> kv 0; heads 2,3 -> kv 1
    k, v = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    out = attention(q, k, v, torch.full((4,), -100.0), q_start=0, k_start=0, sm_scale=1.0, window=None)
    assert torch.allclose(out[0, 1], v[0, 0], atol=1e-5) and torch.allclose(out[0, 2], v[0, 1], atol=1e-5)


def test_route_softmax_over_the_chosen_four():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5, -3.0, 1.0]])
    experts, weights = route(logits, 4)
    assert experts.tolist() == [[1, 5, 3, 7]]  # by descending logit
    chosen = torch.tensor([3.0, 2.5, 2.0, 1.0])
    assert torch.allclose(weights[0], torch.softmax(chosen, -1)) and weights.sum().item() == pytest.approx(1.0)


def test_swiglu_clamps_and_adds_one():
    h = torch.tensor([10.0, 10.0, -10.0, -10.0, 1.0, 0.5])  # (gate, linear) pairs
    out = swiglu(h, 7.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out[0].item() == pytest.approx(7 * sig(1.702 * 7) * 8)  # gate clamped to 7, linear to 7, +1
    assert out[1].item() == pytest.approx(-10 * sig(-17.02) * -6)  # gate not clamped below; linear to -7
    assert out[2].item() == pytest.approx(1 * sig(1.702) * 1.5)
