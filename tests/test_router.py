"""The router kernels (gate projection, top-k, softmax over the chosen; with the rows sorted by
expert; with the residual add and RMSNorm before them) against moe.route, moe_triton.plan and
rmsnorm.add_rms_norm, and the fused launches against the unfused ones.

CPU: Triton's interpreter in fp32, where logits are distinct, so the experts must be the
reference's exactly and the weights equal to 1e-5. GPU: bf16 at the real shapes, where the
kernel's dot sums in another order than cuBLAS and bf16 logits can tie: the chosen experts' logits
must be the reference's top-k values to within a bf16 rounding, and the weights close. The
one-launch add + norm + router (norm_route_and_plan) must also equal the unfused launches bit for
bit (interpreter, fp32 and bf16; GPU: the norm), every buffer it allocates poisoned first, and
leave its counter at zero (GPU: also replayed from a CUDA graph). Inputs are fresh random numbers each
run; the seed is printed.
"""

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime.kernels.moe_triton import plan  # noqa: E402
from runtime.kernels.rmsnorm import add_rms_norm  # noqa: E402
from runtime.kernels.rmsnorm_triton import add_rms_norm_triton  # noqa: E402
from runtime.kernels.router import route  # noqa: E402
from runtime.kernels.router_triton import (  # noqa: E402
    FUSED_PLAN_TOKENS,
    _done_counter,
    _last_to_finish,
    norm_route_and_plan,
    route_and_plan,
    route_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gate(gen, tokens, experts, width, dtype):
    h = torch.randn(tokens, width, generator=gen, device=DEVICE).to(dtype)
    weight = (torch.randn(experts, width, generator=gen, device=DEVICE) / width**0.5).to(dtype)
    bias = (torch.randn(experts, generator=gen, device=DEVICE) * 0.1).to(dtype)
    return h, weight, bias


# up to 64 tokens the GEMV + top-k kernels, beyond the one fused tl.dot kernel
@pytest.mark.parametrize("tokens, experts, width, k", [(1, 32, 96, 4), (5, 4, 64, 2), (37, 128, 160, 4),
                                                       (17, 20, 300, 3), (70, 32, 96, 4), (130, 128, 64, 4)])
def test_route_triton_matches_the_reference_fp32(gen, tokens, experts, width, k):
    h, weight, bias = gate(gen, tokens, experts, width, torch.float32)
    want_ids, want_weights = route(torch.nn.functional.linear(h, weight, bias), k)
    for ids_dtype in (torch.int64, torch.int32):
        ids, weights = route_triton(h, weight, bias, k, ids_dtype)
        assert ids.dtype == ids_dtype and ids.shape == (tokens, k) and weights.shape == (tokens, k)
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)


# up to 16 tokens the sort runs inside the top-k program; beyond, moe_triton.plan
@pytest.mark.parametrize("tokens, experts, k", [(1, 32, 4), (7, 8, 4), (16, 128, 4), (16, 4, 3), (17, 32, 4)])
def test_route_and_plan_equals_route_then_plan(gen, tokens, experts, k):
    h, weight, bias = gate(gen, tokens, experts, 96, torch.float32)
    ids, weights, rows = route_and_plan(h, weight, bias, k)
    want_ids, want_weights = route_triton(h, weight, bias, k, torch.int32)
    want = plan(want_ids, experts)
    assert ids.dtype == torch.int32 and torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    for name in ("order", "position", "counts", "offsets"):
        assert torch.equal(getattr(rows, name), getattr(want, name)), name
    assert (rows.num_rows, rows.num_experts) == (tokens * k, experts)


@pytest.mark.parametrize("tokens", [2, 80])
def test_route_triton_breaks_ties_toward_the_lower_expert(tokens):
    h = torch.ones(tokens, 32, device=DEVICE)
    weight = torch.zeros(8, 32, device=DEVICE)
    bias = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0, -1.0], device=DEVICE)
    ids, weights = route_triton(h, weight, bias, 4)
    assert ids.tolist() == [[1, 3, 6, 2]] * tokens
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[1.0, 1.0, 1.0, 0.5]] * tokens,
                                                                   device=DEVICE), -1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at the real shapes needs a GPU")
@pytest.mark.parametrize("experts", [32, 128])  # gpt-oss-20b, gpt-oss-120b
@pytest.mark.parametrize("tokens", [1, 64, 300, 4096])
def test_route_triton_bf16_at_real_shapes(gen, experts, tokens):
    h, weight, bias = gate(gen, tokens, experts, 2880, torch.bfloat16)
    logits = torch.nn.functional.linear(h, weight, bias).float()
    ids, weights = route_triton(h, weight, bias, 4, torch.int32)
    assert_routes_within_bf16(logits, ids, weights)


def assert_routes_within_bf16(logits, ids, weights):
    """Four distinct experts per token whose logits are within two bf16 ulps of the top four (the
    kernel's logits round from another summation order), and their softmax weights to 2e-2."""
    want_values, _ = torch.topk(logits, 4, dim=-1)
    got_values = logits.gather(1, ids.long())
    assert (ids.long().sort(-1).values.diff(dim=-1) > 0).all()
    ulp = 2.0**-7 * want_values.abs().amax(-1, keepdim=True)
    assert ((got_values - want_values).abs() <= 2 * ulp).all()
    torch.testing.assert_close(weights, torch.softmax(got_values, -1), rtol=0, atol=2e-2)


# --- residual add + RMSNorm + router + plan in one launch (norm_route_and_plan) -------------------

EPS = 1e-5


def norm_inputs(gen, tokens, experts, width, dtype, delta_dtype=None):
    """x (the residual, scale 3 as between blocks), delta (attention's output), the norm's gain and a gate."""
    x = (torch.randn(tokens, width, generator=gen, device=DEVICE) * 3.0).to(dtype)
    delta = torch.randn(tokens, width, generator=gen, device=DEVICE).to(delta_dtype or dtype)
    gain = torch.rand(width, generator=gen, device=DEVICE) + 0.5
    _, weight, bias = gate(gen, 1, experts, width, dtype)
    return x, delta, gain, weight, bias


def fused(x, delta, gain, weight, bias, k):
    """norm_route_and_plan with every buffer it allocates poisoned (NaN, or -1 for integers: no
    expert, no row), so an element the kernel leaves unwritten, or a logit read before it was
    written, shows up; the counter must be back at zero afterwards."""
    import runtime.kernels.router_triton as router_triton

    def poisoned(empty):
        def make(*args, **kwargs):
            t = empty(*args, **kwargs)
            return t.fill_(float("nan") if t.is_floating_point() else -1)
        return make

    real = torch.empty, torch.empty_like
    torch.empty, torch.empty_like = poisoned(torch.empty), poisoned(torch.empty_like)
    try:
        out = norm_route_and_plan(x, delta, gain, EPS, weight, bias, k)
    finally:
        torch.empty, torch.empty_like = real
    if 0 < x.shape[0] <= FUSED_PLAN_TOKENS:
        assert router_triton._DONE_COUNTERS[x.device].item() == 0
    return out


def assert_same(got, want):
    """Outputs of norm_route_and_plan equal elementwise (the plans field by field)."""
    *tensors, rows = got
    *want_tensors, want_rows = want
    for a, b in zip(tensors, want_tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for name in ("order", "position", "counts", "offsets"):
        assert torch.equal(getattr(rows, name), getattr(want_rows, name)), name
    assert (rows.num_rows, rows.num_experts) == (want_rows.num_rows, want_rows.num_experts)


# 9 tokens: the block sizes of 16 (BLOCK_T 16, 64 rows to sort) in about half the interpreter's programs
@pytest.mark.parametrize("tokens, experts, width, k", [(1, 32, 64, 4), (4, 8, 256, 4), (7, 20, 96, 3),
                                                       (16, 32, 160, 4), (9, 128, 64, 4)])
def test_norm_route_and_plan_matches_the_references_fp32(gen, tokens, experts, width, k):
    """fp32 in the interpreter against add_rms_norm, moe.route of the gate's linear and moe_triton.plan.
    x + delta and the routed experts are exact (the sum is one fp32 add; random fp32 logits do not
    tie); h and the weights differ only by summation order (1e-5 relative, measured ~1e-7)."""
    x, delta, gain, weight, bias = norm_inputs(gen, tokens, experts, width, torch.float32)
    x_before, delta_before = x.clone(), delta.clone()
    residual, h, ids, weights, rows = fused(x, delta, gain, weight, bias, k)
    want_residual, want_h = add_rms_norm(x, delta, gain, EPS)
    assert torch.equal(x, x_before) and torch.equal(delta, delta_before)  # inputs untouched
    assert residual.shape == h.shape == x.shape and residual.dtype == h.dtype == x.dtype
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-6)
    want_ids, want_weights = route(torch.nn.functional.linear(want_h, weight, bias), k)
    assert ids.dtype == torch.int32 and ids.shape == (tokens, k) and torch.equal(ids.long(), want_ids)
    assert weights.dtype == torch.float32 and weights.shape == (tokens, k)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    want = plan(want_ids, experts)
    for name in ("order", "position", "counts", "offsets"):
        assert torch.equal(getattr(rows, name), getattr(want, name)), name
    assert (rows.num_rows, rows.num_experts) == (tokens * k, experts)


@pytest.mark.parametrize("dtype, delta_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("tokens, experts, width", [(1, 32, 128), (5, 8, 200), (9, 32, 256)])
def test_norm_route_and_plan_is_the_unfused_kernels_bit_for_bit(gen, dtype, delta_dtype, tokens, experts,
                                                                width):
    """Against add_rms_norm_triton then route_and_plan: residual, h, experts, weights and plan
    identical, in bf16 too (the interpreter's bf16 casts truncate, but the same way in both). h
    because the fused kernel repeats add_rms_norm_triton's arithmetic; the logits because up to
    256 wide the gate GEMV's one 256-column chunk sums in the fused row's order, so even bf16 ties
    break alike. Called twice: the second call (the counter reset by the first) gives the same bits."""
    x, delta, gain, weight, bias = norm_inputs(gen, tokens, experts, width, dtype, delta_dtype)
    want_residual, want_h = add_rms_norm_triton(x, delta, gain, EPS)
    want = (want_residual, want_h) + route_and_plan(want_h, weight, bias, 4)
    first = fused(x, delta, gain, weight, bias, 4)
    assert_same(first, want)
    assert_same(fused(x, delta, gain, weight, bias, 4), first)


@pytest.mark.parametrize("tokens", [0, 17, 40])
def test_norm_route_and_plan_falls_back_beyond_the_fused_sizes(gen, tokens):
    """No tokens, or more than one top-k program sorts: add_rms_norm_triton then route_and_plan."""
    x, delta, gain, weight, bias = norm_inputs(gen, tokens, 32, 96, torch.float32)
    got = fused(x, delta, gain, weight, bias, 4)
    want_residual, want_h = add_rms_norm_triton(x, delta, gain, EPS)
    assert_same(got, (want_residual, want_h) + route_and_plan(want_h, weight, bias, 4))


def test_norm_route_and_plan_breaks_ties_toward_the_lower_expert():
    """Equal logits from a zero gate: the bias decides, ties to the lower index, as route_triton."""
    x, delta = torch.ones(3, 32, device=DEVICE), torch.ones(3, 32, device=DEVICE)
    bias = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0, -1.0], device=DEVICE)
    gain, weight = torch.ones(32, device=DEVICE), torch.zeros(8, 32, device=DEVICE)
    _, _, ids, weights, rows = fused(x, delta, gain, weight, bias, 4)
    assert ids.tolist() == [[1, 3, 6, 2]] * 3
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[1.0, 1.0, 1.0, 0.5]] * 3,
                                                                   device=DEVICE), -1))
    assert rows.counts.tolist() == [0, 3, 3, 3, 0, 0, 3, 0]


@triton.jit
def count_last(counter_ptr, lasts_ptr, num_programs):
    if _last_to_finish(counter_ptr, num_programs):
        tl.atomic_add(lasts_ptr, 1)


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (16, 32)])
def test_exactly_one_program_is_last_to_finish(grid):
    """_last_to_finish: one program of the grid sees every other one done (whichever finishes last:
    on the GPU any, in the interpreter the last it runs), and the counter is back at zero."""
    lasts = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    counter = _done_counter(lasts.device)
    for _ in range(2):
        count_last[grid](counter, lasts, grid[0] * grid[1])
    assert lasts.item() == 2 and counter.item() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at the real shapes needs a GPU")
@pytest.mark.parametrize("experts", [32, 128])  # gpt-oss-20b, gpt-oss-120b (both d = 2880)
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_norm_route_and_plan_bf16_at_real_shapes(gen, experts, tokens):
    """bf16, d = 2880: x + delta and h bit for bit add_rms_norm_triton's (the same arithmetic, the
    same [1, 4096] row tiles over 8 warps, so the same sum of squares), and the routing as
    test_route_triton_bf16_at_real_shapes checks it (chosen logits within two bf16 ulps of the top
    k, weights to 2e-2) against the logits of that h; the plan is moe_triton.plan of the ids. Run
    many times over, in a loop of launches: a program reading a logit before it was written, or
    the counter left off zero, would show up as a changed route."""
    x, delta, gain, weight, bias = norm_inputs(gen, tokens, experts, 2880, torch.bfloat16)
    want_residual, want_h = add_rms_norm_triton(x, delta, gain, EPS)
    residual, h, ids, weights, rows = fused(x, delta, gain, weight, bias, 4)
    assert torch.equal(residual, want_residual) and torch.equal(h, want_h)
    assert_routes_within_bf16(torch.nn.functional.linear(h, weight, bias).float(), ids, weights)
    want = plan(ids, experts)
    for name in ("order", "position", "counts", "offsets"):
        assert torch.equal(getattr(rows, name), getattr(want, name)), name
    first = (residual, h, ids, weights, rows)
    for _ in range(200):  # the same inputs: every launch must give the same bits
        assert_same(norm_route_and_plan(x, delta, gain, EPS, weight, bias, 4), first)
    from runtime.kernels.router_triton import _DONE_COUNTERS

    assert _DONE_COUNTERS[x.device].item() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_norm_route_and_plan_replays_in_a_cuda_graph(gen):
    """Captured after an eager call (as runtime/cuda_graphs.py does), replays on fresh inputs give the
    eager call's bits: the counter is at zero at every replay and the logits are read after all
    were written. gpt-oss-120b's shapes, 4 tokens."""
    x, delta, gain, weight, bias = norm_inputs(gen, 4, 128, 2880, torch.bfloat16)
    norm_route_and_plan(x, delta, gain, EPS, weight, bias, 4)  # eager first: compiles, makes the counter
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = norm_route_and_plan(x, delta, gain, EPS, weight, bias, 4)
    for _ in range(20):
        x.copy_(torch.randn(x.shape, generator=gen, device=DEVICE) * 3.0)
        delta.copy_(torch.randn(delta.shape, generator=gen, device=DEVICE))
        graph.replay()
        assert_same(out, norm_route_and_plan(x, delta, gain, EPS, weight, bias, 4))


def test_route_softmax_over_the_chosen_four():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5, -3.0, 1.0]])
    experts, weights = route(logits, 4)
    assert experts.tolist() == [[1, 5, 3, 7]]  # by descending logit
    chosen = torch.tensor([3.0, 2.5, 2.0, 1.0])
    assert (torch.allclose(weights[0], torch.softmax(chosen, -1))
            and weights.sum().item() == pytest.approx(1.0))


def test_route_picks_the_top_4_and_softmaxes_over_them():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.5, 0.0, 1.0, -2.0]])
    experts, weights = route(logits, 4)
    assert experts.tolist() == [[1, 4, 3, 6]]
    z = sum(math.exp(x) for x in (3.0, 2.5, 2.0, 1.0))
    assert weights[0].tolist() == pytest.approx([math.exp(x) / z for x in (3.0, 2.5, 2.0, 1.0)], rel=1e-6)

    logits = torch.randn(64, 32)
    experts, weights = route(logits, 4)
    assert experts.shape == weights.shape == (64, 4)
    for row in range(64):
        assert set(experts[row].tolist()) == set(logits[row].argsort(descending=True)[:4].tolist())
        torch.testing.assert_close(weights[row], torch.softmax(logits[row, experts[row]], -1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
