"""A float8 e4m3 KV cache (kv_cache_dtype=fp8): every writer rounds as kv_cache.to_cache_dtype does,
bit for bit (the reference's torch cast, Triton's interpreter with integer rounding, the GPU's cvt),
and the pools hold it. The engine on a float8 cache, kernels against the reference:
tests/test_kernel_path.py (CPU) and tests/test_cuda_graphs.py (GPU); the attention kernels' reads
of a float8 cache: tests/test_attention.py (`test_float8_cache*`).
"""

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernel_inputs import DEVICE, gpt_oss_yarn, randn  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.engine_config import EngineConfig  # noqa: E402
from runtime.kernels.kv_store_triton import to_cache  # noqa: E402
from runtime.kernels.linear_triton import Rope, linear_gemv  # noqa: E402
from runtime.kernels.rope import rope_qk  # noqa: E402
from runtime.kernels.rope_triton import rope_qk_triton  # noqa: E402
from runtime.kv_cache import FP8_E4M3_MAX, to_cache_dtype  # noqa: E402
from runtime.model import GptOss  # noqa: E402

FP8 = torch.float8_e4m3fn
POISON = 0x7F  # an e4m3fn NaN: what the pages hold where nothing was stored


@triton.jit
def _store_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, to_cache(tl.load(x_ptr + offs, mask=ok), out_ptr), mask=ok)


def stored_by_kernel(x: torch.Tensor) -> torch.Tensor:
    out = torch.full(x.shape, POISON, dtype=torch.uint8, device=x.device).view(FP8)
    _store_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def e4m3_edges() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (the ties), points just off each tie,
    values past the saturation point, and the subnormal range, both signs, as fp32."""
    codes = torch.arange(0x7F, dtype=torch.uint8)  # 0 .. 448, NaN (0x7F) left out
    values = codes.view(FP8).float()
    mid = (values[1:] + values[:-1]) / 2
    off = torch.cat((mid * (1 + 2.0 ** -20), mid * (1 - 2.0 ** -20)))
    big = torch.tensor([448.0, 449.0, 464.0, 465.0, 480.0, 1e4, 3e38, float("inf")])
    tiny = torch.linspace(0, 2.0 ** -6, 1001)
    x = torch.cat((values, mid, off, big, tiny))
    return torch.cat((x, -x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_cache_rounds_as_the_reference(dtype):
    """Nearest with ties to even, saturating at +-448: every bf16 bit pattern (bar NaN), and for fp32
    every e4m3 value, tie and near-tie."""
    if dtype == torch.bfloat16:
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        x = x[~x.isnan()]
    else:
        x = e4m3_edges()
    x = x.to(DEVICE)
    got, want = stored_by_kernel(x), to_cache_dtype(x, FP8)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert want.float().abs().max() == FP8_E4M3_MAX and not want.float().isnan().any()


def test_to_cache_keeps_a_cache_of_the_values_dtype(gen):
    x = randn(300, gen=gen)
    out = torch.full_like(x, float("nan"))
    _store_kernel[(1,)](x, out, x.numel(), BLOCK=512)
    assert torch.equal(out, x)


def fp8_pages(pages, kv_heads, head_dim):
    return torch.full((pages, 16, kv_heads, head_dim), POISON, dtype=torch.uint8, device=DEVICE).view(FP8)


def assert_stored(pages, slots, rows):
    """The pages hold to_cache_dtype(rows) at the slots, bit for bit, and the poison everywhere else."""
    flat = pages.flatten(0, 1).view(torch.uint8)
    assert torch.equal(flat[slots], to_cache_dtype(rows, FP8).view(torch.uint8))
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert (flat[untouched] == POISON).all()


@pytest.mark.parametrize("rows", [1, 9, 40])
def test_rope_stores_float8_keys_and_values(gen, rows):
    heads, kv_heads, head_dim = 16, 4, 32
    # Scaled so that some values pass 448 and some fall under the smallest normal.
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, gen=gen, scale=200.0)
    positions = torch.randint(0, 131072, (rows,), generator=gen, device=DEVICE)
    inv_freq, c = gpt_oss_yarn(head_dim)
    k_pages, v_pages = fp8_pages(6, kv_heads, head_dim), fp8_pages(6, kv_heads, head_dim)
    slots = torch.randperm(96, generator=gen, device=DEVICE)[:rows]
    _, k, v = rope_qk_triton(qkv, positions, inv_freq, c, heads, kv_heads, head_dim,
                             cache=(k_pages, v_pages, slots))
    assert_stored(k_pages, slots, k)
    assert_stored(v_pages, slots, v)


def test_fused_qkv_epilogue_stores_float8_keys_and_values(gen):
    """Batch-1 decode's projection + RoPE + store in one launch (linear_triton) rounds the same way."""
    heads, kv_heads, head_dim, k_in = 4, 2, 16, 96
    x = randn(1, k_in, gen=gen)
    weight = randn((heads + 2 * kv_heads) * head_dim, k_in, gen=gen, scale=30.0)
    positions = torch.randint(0, 131072, (1,), generator=gen, device=DEVICE)
    inv_freq, c = gpt_oss_yarn(head_dim)
    rope = Rope(positions, inv_freq, c, head_dim, heads, kv_heads)
    k_pages, v_pages = fp8_pages(2, kv_heads, head_dim), fp8_pages(2, kv_heads, head_dim)
    slots = torch.randperm(32, generator=gen, device=DEVICE)[:1]
    qkv = linear_gemv(x, weight, rope=rope, cache=(k_pages, v_pages, slots))
    _, k, v = qkv.unflatten(-1, (-1, head_dim)).split([heads, kv_heads, kv_heads], 1)
    assert_stored(k_pages, slots, k)
    assert_stored(v_pages, slots, v)
    # and the values are RoPE'd projections (tests/test_rope.py's fp32 tolerance)
    _, ref_k, _ = rope_qk(torch.nn.functional.linear(x, weight), positions, inv_freq, c, heads, kv_heads,
                          head_dim)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-4)


def test_float8_pages_hold_twice_the_positions():
    cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=2)
    auto = GptOss(cfg, torch.bfloat16)
    fp8 = GptOss(cfg, torch.bfloat16, kv_dtype=FP8)
    assert fp8.kv_page_bytes() * 2 == auto.kv_page_bytes()
    assert fp8.kv_page_bytes(sliding=True) * 2 == auto.kv_page_bytes(sliding=True)
    pool = fp8.make_pool(8, 8)
    assert pool.dtype == FP8 and all(p.dtype == FP8 for p in pool.keys.values())
    assert fp8.sliding_pool.dtype == FP8


def test_kv_cache_dtype_is_checked():
    for name in ("auto", "fp8", "fp8_e4m3"):
        EngineConfig(kv_cache_dtype=name)
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported; use one of auto, fp8"):
        EngineConfig(kv_cache_dtype="int8")
