"""The Triton MoE kernels against the torch reference (CPU: Triton's interpreter, tiny shapes).

The interpreter runs the integer decode and fp32 dots: only the summation order differs from the
reference, so tolerances are fp32-tight (1e-4 absolute / 1e-5 relative). The PTX decode and bf16
MMAs are checked at the real shapes in tests/test_gpu.py.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime import mxfp4  # noqa: E402
from runtime.kernels.moe import expert_rows, route  # noqa: E402
from runtime.kernels.moe_gemm import (Tiles, combine, expert_rows_triton, grouped_mxfp4, moe_triton,  # noqa: E402
                                      plan)


def random_experts(E, N, K, device="cpu"):
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(118, 126, (E, N, K // 32), dtype=torch.uint8, device=device)
    bias = torch.randn(E, N, device=device) * 0.1
    return blocks, scales, bias


@pytest.mark.parametrize("rows", [1, 50, 300, 700])  # the one-program plan (<= 512 rows) and torch.sort
def test_plan_sorts_rows_by_expert_and_counts_them(rows):
    experts = torch.randint(0, 6, (rows,))
    p = plan(experts, 8)
    assert torch.equal(p.order.long(), torch.argsort(experts, stable=True))
    assert torch.equal(p.position.long(), torch.argsort(p.order.long()))
    assert p.counts.tolist() == torch.bincount(experts, minlength=8).tolist()
    assert p.offsets.tolist() == (torch.cumsum(p.counts, 0) - p.counts).tolist()
    used = sum(-(-c // 16) for c in p.counts.tolist())
    assert used <= p.max_tiles(16)


@pytest.mark.parametrize("rows_per_expert, K", [([1, 0, 3, 0], 256), ([17, 5, 0, 40], 256),
                                                ([3, 2, 1, 9], 160)])  # 160: K not a multiple of BLOCK_K
@pytest.mark.parametrize("tiles", [Tiles(8, 64, 128, 4, 1), Tiles(16, 32, 64, 4, 1)])
def test_grouped_gemm_matches_decode_then_matmul(rows_per_expert, K, tiles):
    E, N = 4, 128
    blocks, scales, bias = random_experts(E, N, K)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(rows_per_expert))
    experts = experts[torch.randperm(len(experts))]  # rows arrive in any order; the plan sorts them
    x = torch.randn(len(experts), K)
    p = plan(experts, E)
    poisoned = torch.full((len(experts), N), float("nan"))  # every element must be written
    got = grouped_mxfp4(x, p.order, 1, p, blocks, scales, bias, torch.float32, tiles=tiles, out=poisoned)
    sorted_experts = experts[p.order.long()].tolist()
    want = torch.stack([mxfp4.decode(blocks[e], scales[e], torch.float32) @ x[p.order[i]] + bias[e]
                        for i, e in enumerate(sorted_experts)])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


def test_expert_rows_matches_the_reference_with_swiglu():
    E, d, inter = 4, 128, 128
    w1 = random_experts(E, 2 * inter, d)
    w2 = random_experts(E, d, inter)
    experts = torch.randint(0, E, (37,))
    x = torch.randn(37, d)
    ref = expert_rows(x, experts, *w1, *w2, 7.0)
    got = expert_rows_triton(x, experts, *w1, *w2, 7.0)
    assert torch.isfinite(got).all()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("tokens", [1, 3, 29])
def test_moe_triton_matches_route_experts_combine(tokens):
    """The single-rank path: gather by token, both GEMMs, weighted sum onto the residual."""
    E, d, inter, k = 8, 128, 64, 4
    w1 = random_experts(E, 2 * inter, d)
    w2 = random_experts(E, d, inter)
    h = torch.randn(tokens, d)
    residual = torch.randn(tokens, d)
    expert_ids, weights = route(torch.randn(tokens, E), k)
    rows = expert_rows(h.repeat_interleave(k, 0), expert_ids.reshape(-1), *w1, *w2, 7.0)
    want = residual + (rows.view(tokens, k, d) * weights[..., None]).sum(1)
    got = moe_triton(h, expert_ids, weights, *w1, *w2, 7.0, residual=residual)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


def test_combine_writes_every_element_in_k_order():
    y = torch.randn(12, 40)
    position = torch.randperm(12).to(torch.int32)
    weights = torch.rand(3, 4)
    got = combine(y, position, weights, None, torch.float32)
    want = (y[position.long()].view(3, 4, 40) * weights[..., None]).sum(1)
    assert torch.allclose(got, want, atol=1e-6)
