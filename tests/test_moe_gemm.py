"""The Triton grouped MXFP4 GEMM against the torch reference (CPU: Triton's interpreter, tiny shapes)."""

import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime import mxfp4  # noqa: E402
from runtime.kernels.moe import expert_rows  # noqa: E402
from runtime.kernels.moe_gemm import expert_rows_triton, grouped_mxfp4, tiles_by_expert  # noqa: E402


def random_experts(E, N, K, device="cpu"):
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(118, 126, (E, N, K // 32), dtype=torch.uint8, device=device)
    bias = torch.randn(E, N, device=device) * 0.1
    return blocks, scales, bias


@pytest.mark.parametrize("rows_per_expert, K", [([1, 0, 3, 0], 256), ([17, 5, 0, 40], 256),
                                                ([3, 2, 1, 9], 160)])  # 160: K not a multiple of BLOCK_K
def test_grouped_gemm_matches_decode_then_matmul(rows_per_expert, K):
    E, N = 4, 128
    blocks, scales, bias = random_experts(E, N, K)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(rows_per_expert))
    x = torch.randn(len(experts), K)
    tiles = tiles_by_expert(experts, E, 16)
    poisoned = torch.full((len(experts), N), float("nan"))  # every element must be written
    got = grouped_mxfp4(x, tiles, blocks, scales, bias, torch.float32, block_m=16, block_n=64, block_k=128,
                        out=poisoned)
    want = torch.stack([mxfp4.decode(blocks[e], scales[e], torch.float32) @ x[i] + bias[e]
                        for i, e in enumerate(experts.tolist())]) if len(experts) else torch.empty(0, N)
    # fp32 operands in the interpreter: only summation order differs.
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


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
