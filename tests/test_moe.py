"""The Triton MoE kernels against the torch reference (CPU: Triton's interpreter, tiny shapes).

The interpreter runs the integer decode and fp32 dots: only the summation order differs from the
reference, so tolerances are fp32-tight (1e-4 absolute / 1e-5 relative). The PTX decode and bf16
MMAs are checked at the real shapes by the GPU tests below; the bit logic of the GEMV kernel's PTX
decode routes is checked here by emulating the PTX instruction by instruction.
"""

import dataclasses
import math
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime import mxfp4  # noqa: E402
from runtime.checkpoint import random_tensor, tensor_specs  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.moe import SWIGLU_ALPHA, expert_rows, swiglu  # noqa: E402
from runtime.kernels.moe_triton import (  # noqa: E402
    Tiles,
    choose_tiles,
    combine,
    expert_rows_triton,
    gemv_tiles_ok,
    grouped_mxfp4,
    moe_triton,
    plan,
)
from runtime.kernels.moe_triton_details.ptx import decode32_ptx  # noqa: E402
from runtime.kernels.router import route  # noqa: E402
from runtime.options import options  # noqa: E402


def random_experts(E, N, K, device="cpu"):
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(118, 126, (E, N, K // 32), dtype=torch.uint8, device=device)
    bias = torch.randn(E, N, device=device) * 0.1
    return blocks, scales, bias


# no rows; the one-program plan (<= 512 rows); the chunked one: 3 chunks of 256 (the last partial), 17
# (a 1,024-token decode's 4,096 rows and 3 more), and 129 experts (expert_rows_triton's extra bucket)
# over 128 chunks of 256 (an 8,192-token prefill's rows)
@pytest.mark.parametrize("rows, experts", [(0, 8), (1, 8), (50, 8), (300, 8), (700, 8), (4099, 32),
                                           (32768, 129)])
def test_plan_sorts_rows_by_expert_and_counts_them(rows, experts):
    experts, E = torch.randint(0, experts - 2, (rows,)), experts  # the last two experts get no row
    p = plan(experts, E)
    assert torch.equal(p.order.long(), torch.argsort(experts, stable=True))
    assert torch.equal(p.position.long(), torch.argsort(p.order.long()))
    assert p.counts.tolist() == torch.bincount(experts, minlength=E).tolist()
    assert p.offsets.tolist() == (torch.cumsum(p.counts, 0) - p.counts).tolist()
    used = sum(-(-c // 16) for c in p.counts.tolist())
    assert used <= p.max_tiles(16)


# 160, 416: K not a multiple of BLOCK_K (a masked last step after one to six whole ones)
@pytest.mark.parametrize("rows_per_expert, K", [([1, 0, 3, 0], 256), ([17, 5, 0, 40], 256),
                                                ([3, 2, 1, 9], 160), ([2, 6, 0, 1], 416)])
@pytest.mark.parametrize("tiles", [Tiles(8, 64, 128, 4, 1), Tiles(16, 32, 64, 4, 1)])
def test_grouped_gemm_matches_decode_then_matmul(rows_per_expert, K, tiles):
    """The GEMM reads blocks in kernel order (as the model keeps them): the checkpoint's blocks,
    transposed, against the checkpoint's decode."""
    E, N = 4, 128
    blocks, scales, bias = random_experts(E, N, K)
    stored = mxfp4.quad_transpose(blocks)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(rows_per_expert))
    experts = experts[torch.randperm(len(experts))]  # rows arrive in any order; the plan sorts them
    x = torch.randn(len(experts), K)
    p = plan(experts, E)
    poisoned = torch.full((len(experts), N), float("nan"))  # every element must be written
    got = grouped_mxfp4(x, p.order, 1, p, stored, scales, bias, torch.float32, tiles=tiles, out=poisoned)
    sorted_experts = experts[p.order.long()].tolist()
    want = torch.stack([mxfp4.decode(blocks[e], scales[e], torch.float32) @ x[p.order[i]] + bias[e]
                        for i, e in enumerate(sorted_experts)])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


# per expert: full tiles only, a tail of 1 and of tail_t rows, one more than tail_t (a partial full
# tile), none; tails of several experts side by side
@pytest.mark.parametrize("rows_per_expert", [[32, 17, 20, 0], [33, 48, 0, 16], [5, 0, 31, 64]])
@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_tail_tiles_match_whole_tiles(rows_per_expert, swiglu):
    """An expert's last rows in a narrow tail tile (`Tiles.tail_t`) give what whole tiles give, every
    output row written once (the output is poisoned first)."""
    E, N, K = 4, 64, 160
    blocks, scales, bias = random_experts(E, N, K)
    stored = mxfp4.quad_transpose(blocks)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(rows_per_expert))
    experts = experts[torch.randperm(len(experts))]
    x = torch.randn(len(experts), K)
    p = plan(experts, E)
    limit = 7.0 if swiglu else None
    width = N // 2 if swiglu else N
    whole = grouped_mxfp4(x, p.order, 1, p, stored, scales, bias, torch.float32, swiglu_limit=limit,
                          tiles=Tiles(16, 32, 64, 4, 1))
    for tail_t in (8, 16):
        poisoned = torch.full((len(experts), width), float("nan"))
        got = grouped_mxfp4(x, p.order, 1, p, stored, scales, bias, torch.float32, swiglu_limit=limit,
                            tiles=Tiles(32, 32, 64, 4, 1, tail_t=tail_t), out=poisoned)
        assert torch.allclose(got, whole, rtol=1e-5, atol=1e-5), (tail_t, (got - whole).abs().max())


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


@pytest.mark.parametrize("tokens", [1, 29])
def test_moe_triton_with_experts_split_over_two_ranks_sums_to_the_whole(tokens):
    """Each expert's intermediate dimension split in two (what tensor parallelism gives each rank):
    the two ranks' partial results, summed by `reduce`, plus the residual (added after the sum)
    equal the whole MoE; the first rank alone adds mlp2's bias."""
    E, d, inter, k = 8, 128, 128, 4
    w1 = random_experts(E, 2 * inter, d)
    w2 = random_experts(E, d, inter)
    h, residual = torch.randn(tokens, d), torch.randn(tokens, d)
    expert_ids, weights = route(torch.randn(tokens, E), k)
    whole = moe_triton(h, expert_ids, weights, *w1, *w2, 7.0, residual=residual)
    partials = []
    for rank, (lo, hi) in enumerate([(0, inter // 2), (inter // 2, inter)]):
        # (gate, linear) row pairs
        mlp1 = (w1[0][:, 2 * lo:2 * hi], w1[1][:, 2 * lo:2 * hi], w1[2][:, 2 * lo:2 * hi])
        mlp2 = (w2[0][:, :, lo // 32:hi // 32].contiguous(), w2[1][:, :, lo // 32:hi // 32].contiguous(),
                w2[2])
        moe_triton(h, expert_ids, weights, *mlp1, *mlp2, 7.0, residual=residual,
                   reduce=lambda t: partials.append(t) or t, first=rank == 0)
    assert all(t.dtype == torch.float32 for t in partials)
    assert torch.allclose(partials[0] + partials[1] + residual, whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 29])
def test_moe_triton_split_over_two_ranks_with_the_next_norm_adds_the_residual_after_the_sum(tokens):
    """With the next block's norm, every rank sums the partial rows without the residual, then adds
    it in the norm's launch: each rank returns the whole MoE's output and its RMSNorm."""
    E, d, inter, k = 8, 128, 128, 4
    w1 = random_experts(E, 2 * inter, d)
    w2 = random_experts(E, d, inter)
    h, residual, gain = torch.randn(tokens, d), torch.randn(tokens, d), torch.rand(d) + 0.5
    expert_ids, weights = route(torch.randn(tokens, E), k)
    whole, whole_normed = moe_triton(h, expert_ids, weights, *w1, *w2, 7.0, residual=residual,
                                     next_norm=(gain, 1e-5))
    halves = [(0, inter // 2), (inter // 2, inter)]

    def rank_output(rank, reduce):
        lo, hi = halves[rank]
        mlp1 = (w1[0][:, 2 * lo:2 * hi], w1[1][:, 2 * lo:2 * hi], w1[2][:, 2 * lo:2 * hi])
        mlp2 = (w2[0][:, :, lo // 32:hi // 32].contiguous(), w2[1][:, :, lo // 32:hi // 32].contiguous(),
                w2[2])
        return moe_triton(h, expert_ids, weights, *mlp1, *mlp2, 7.0, residual=residual, reduce=reduce,
                          first=rank == 0, next_norm=(gain, 1e-5))

    partials = []
    for rank in (0, 1):  # what each rank hands the all-reduce
        rank_output(rank, lambda t: partials.append(t.clone()) or t)
    for rank in (0, 1):  # and what it returns given the sum
        out, normed = rank_output(rank, lambda t: partials[0] + partials[1])
        assert torch.allclose(out, whole, rtol=1e-5, atol=1e-4), (out - whole).abs().max()
        assert torch.allclose(normed, whole_normed, rtol=1e-4, atol=1e-4), (normed - whole_normed).abs().max()


def test_combine_writes_every_element_in_k_order():
    y = torch.randn(12, 40)
    position = torch.randperm(12).to(torch.int32)
    weights = torch.rand(3, 4)
    got = combine(y, position, weights, None, torch.float32)
    want = (y[position.long()].view(3, 4, 40) * weights[..., None]).sum(1)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_with_the_next_norm_equals_combine_then_rms_norm(dtype):
    """The combine's fused RMSNorm (the next block's attention norm) normalizes the residual as
    rounded and stored, like rmsnorm.add_rms_norm on it; 2880 wide (not a power of two): masked."""
    from runtime.kernels.rmsnorm import add_rms_norm

    T, D = 3, 2880
    y = torch.randn(T * 4, D)
    position = torch.randperm(T * 4).to(torch.int32)
    weights = torch.rand(T, 4)
    residual = torch.randn(T, D).to(dtype)
    gain = torch.rand(D) + 0.5
    out, normed = combine(y, position, weights, residual, dtype, norm=(gain, 1e-5))
    assert torch.equal(out, combine(y, position, weights, residual, dtype))
    _, want = add_rms_norm(out, None, gain, 1e-5)
    # fp32: the sums' order alone; bf16: both round one fp32 value, at most one ulp (2^-7) apart
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert normed.dtype == dtype and torch.allclose(normed.float(), want.float(), rtol=rtol, atol=1e-5)


def test_programmatic_dependent_launch_is_off_on_cpu_and_when_disabled(monkeypatch):
    from runtime.kernels import pdl

    assert pdl.launch_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(options, "pdl", False)
    assert not pdl.enabled(torch.device("cuda", 0))  # read before any CUDA call: no GPU needed


# ------------------------------------------------------------------------------ the GEMV kernel (decode)
def grouped_reference(x, order, source_div, experts, blocks, scales, bias, limit):
    """fp32 decode-then-matmul per sorted row (then the clamped SwiGLU), the GEMMs' contract."""
    rows = []
    for i, e in enumerate(experts[order.long()].tolist()):
        rows.append(mxfp4.decode(blocks[e], scales[e], torch.float32, kernel_order=True)
                    @ x[order[i] // source_div].float()
                    + bias[e])
    y = torch.stack(rows)
    return swiglu(y, limit) if limit is not None else y


# 1, 2, 3, 4 rows per expert (each a specialised tile body), empty experts, more rows than a tile
# (several tiles of one expert), K = 9 blocks (K_BYTES 144: chunks of 2 or 4 blocks leave a partial
# one, as 2880 = 90 blocks does with 16), N not a multiple of block_n.
@pytest.mark.parametrize("rows_per_expert", [[1, 0, 1, 1], [2, 1, 0, 3], [4, 3, 2, 1], [0, 5, 9, 0]])
@pytest.mark.parametrize("tiles", [Tiles(1, 16, 128, 2, 1, "gemv"),
                                   Tiles(2, 16, 64, 1, 1, "gemv", unroll=False),
                                   Tiles(4, 8, 128, 1, 1, "gemv")])
def test_gemv_matches_decode_then_matmul(rows_per_expert, tiles):
    E, N, K = 4, 40, 288
    torch.manual_seed(sum(rows_per_expert) * 7 + tiles.block_t)
    blocks, scales, bias = random_experts(E, N, K)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(rows_per_expert))
    experts = experts[torch.randperm(len(experts))]
    x = torch.randn(len(experts), K)
    p = plan(experts, E)
    poisoned = torch.full((len(experts), N), float("nan"))  # every element must be written
    got = grouped_mxfp4(x, p.order, 1, p, blocks, scales, bias, torch.float32, tiles=tiles, out=poisoned)
    want = grouped_reference(x, p.order, 1, experts, blocks, scales, bias, None)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


# choose_tiles' one-row (up to E / 2 rows) and two-row GEMV tiles
@pytest.mark.parametrize("rows", [4, 16, 32])
def test_gemv_default_tiles_at_the_real_reduction_length(rows):
    """K = 2880 (90 blocks: 5 full steps of 16 and a partial one, or 2 of 32 and a partial one)."""
    E, N, K = 32, 32, 2880
    tiles = choose_tiles(rows, E, False)
    assert tiles.kernel == "gemv"
    torch.manual_seed(rows)
    blocks, scales, bias = random_experts(E, N, K)
    experts = torch.randint(0, E, (rows,))
    experts[:4] = experts[4:8] if rows >= 8 else experts[:4]  # some experts with more rows than the rest
    x = torch.randn(rows, K)
    p = plan(experts, E)
    poisoned = torch.full((rows, N), float("nan"))
    got = grouped_mxfp4(x, p.order, 1, p, blocks, scales, bias, torch.float32, tiles=tiles, out=poisoned)
    want = grouped_reference(x, p.order, 1, experts, blocks, scales, bias, None)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gemv_swiglu_gathered_rows_in_both_dtypes(out_dtype, x_dtype):
    """mlp1's call: rows gathered from tokens (source // top_k), fused clamped SwiGLU, fp32 or bf16."""
    E, N, K, top_k, tokens = 8, 64, 160, 4, 3
    torch.manual_seed(1)
    blocks, scales, bias = random_experts(E, N, K)
    experts = torch.stack([torch.randperm(E)[:top_k] for _ in range(tokens)]).reshape(-1)
    experts[1] = experts[5]  # token 0's second expert is token 1's too: a two-row tile
    experts[0], experts[4] = 6, 7
    x = torch.randn(tokens, K).to(x_dtype)
    p = plan(experts, E)
    poisoned = torch.full((len(experts), N // 2), float("nan"), dtype=out_dtype)
    got = grouped_mxfp4(x, p.order, top_k, p, blocks, scales, bias, out_dtype, swiglu_limit=1.5,
                        tiles=Tiles(2, 16, 64, 1, 1, "gemv"), out=poisoned)
    want = grouped_reference(x, p.order, top_k, experts, blocks, scales, bias, 1.5)
    assert torch.isfinite(got).all()
    if out_dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
    else:  # the interpreter truncates to bf16 (docs/environment.md): within 2 bf16 ulps
        assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-3), (got.float() - want).abs().max()


def test_gemv_is_what_moe_chooses_for_decode_and_matches_the_reference():
    """choose_tiles sends decode-sized batches to the GEMV; both entry points still match the reference."""
    assert choose_tiles(4, 32, True).kernel == "gemv" and choose_tiles(4, 32, True).block_t == 1
    assert choose_tiles(32, 32, True).kernel == "gemv" and choose_tiles(32, 32, True).block_t == 2
    assert choose_tiles(64, 32, True).kernel == "gemm"
    assert choose_tiles(4096, 32, True).kernel == "gemm"
    for n in (1, 16, 128, 512):
        for e in (32, 128):
            t = choose_tiles(n, e, True)
            assert t.kernel == "gemm" or gemv_tiles_ok(t), t
    E, d, inter, k, tokens = 8, 64, 64, 4, 2  # 8 rows over 8 experts: two-row tiles
    assert choose_tiles(tokens * k, E, True).block_t == 2
    w1 = random_experts(E, 2 * inter, d)
    w2 = random_experts(E, d, inter)
    torch.manual_seed(3)
    h = torch.randn(tokens, d)
    expert_ids, weights = route(torch.randn(tokens, E), k)
    expert_ids[1] = expert_ids[0]  # the same four experts: every tile holds two rows
    rows = expert_rows(h.repeat_interleave(k, 0), expert_ids.reshape(-1), *w1, *w2, 7.0)
    want = h + (rows.view(tokens, k, d) * weights[..., None]).sum(1)
    got = moe_triton(h, expert_ids, weights, *w1, *w2, 7.0, residual=h)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
    got = expert_rows_triton(h.repeat_interleave(k, 0), expert_ids.reshape(-1), *w1, *w2, 7.0)
    assert torch.allclose(got, rows, rtol=1e-5, atol=1e-4), (got - rows).abs().max()


def test_gemv_tile_shapes_the_decode_can_take():
    assert gemv_tiles_ok(Tiles(1, 32, 512, 4, 1, "gemv"))
    assert not gemv_tiles_ok(Tiles(1, 16, 128, 4, 1, "gemv"))  # 64 blocks for 128 threads
    assert not gemv_tiles_ok(Tiles(8, 32, 512, 4, 1, "gemv"))  # at most 4 rows per tile
    assert not gemv_tiles_ok(Tiles(1, 32, 96, 1, 1, "gemv"))
    with pytest.raises(AssertionError):
        E, N, K = 2, 16, 128
        blocks, scales, bias = random_experts(E, N, K)
        p = plan(torch.tensor([0, 1]), E)
        grouped_mxfp4(torch.randn(2, K), p.order, 1, p, blocks, scales, bias, torch.float32,
                      tiles=Tiles(1, 16, 128, 4, 1, "gemv"))


def _e4m3(b: int) -> float:
    e, m = (b >> 3) & 15, b & 7
    return (-1.0 if b & 128 else 1.0) * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def _integer_op(op: str, v: list[int]) -> int | None:
    """The 32-bit logic the decode routes use, on Python ints; None for any other op."""
    if op == "shl.b32":
        return (v[0] << v[1]) & 0xFFFFFFFF
    if op == "shr.u32":
        return v[0] >> v[1]
    if op == "and.b32":
        return v[0] & v[1]
    if op == "or.b32":
        return v[0] | v[1]
    if op == "add.u32":
        return (v[0] + v[1]) & 0xFFFFFFFF
    if op == "prmt.b32":  # byte i of d = byte (selector nibble i) of {a, b}; bit 3: sign replicate
        pool = [(v[0] >> 8 * i) & 255 for i in range(4)] + [(v[1] >> 8 * i) & 255 for i in range(4)]
        out = 0
        for i in range(4):
            sel = (v[2] >> 4 * i) & 15
            byte = pool[sel & 7] if not sel & 8 else (255 if pool[sel & 7] & 128 else 0)
            out |= byte << 8 * i
        return out
    return None


def emulate_ptx(ptx: str, inputs: list[int]) -> list[float]:
    """Runs the few PTX instructions the GEMV's decode uses on Python ints; returns $0.. as floats."""
    regs = {f"${32 + i}": v & 0xFFFFFFFF for i, v in enumerate(inputs)}

    def val(token):
        return regs[token] if token in regs else int(token, 0) & 0xFFFFFFFF

    for line in ptx.split("\n"):
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        unpack = re.fullmatch(r"\{\s*([\w$]+),\s*([\w$]+)\s*\},\s*([\w$]+)", rest.strip())
        if op == "mov.b32" and unpack:  # {low half, high half}
            v = val(unpack.group(3))
            regs[unpack.group(1)], regs[unpack.group(2)] = v & 0xFFFF, v >> 16
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        if (result := _integer_op(op, [val(t) for t in a])) is not None:
            regs[d] = result
        elif op == "cvt.rn.f16x2.e4m3x2":  # low byte to the low half
            h = val(a[0])
            halves = [int(np.array(_e4m3((h >> s) & 255), dtype=np.float16).view(np.uint16)) for s in (0, 8)]
            regs[d] = halves[0] | halves[1] << 16
        elif op == "cvt.f32.f16":
            regs[d] = float(np.array(val(a[0]), dtype=np.uint16).view(np.float16))
        else:
            raise ValueError(f"not emulated: {line}")
    return [regs[f"${i}"] for i in range(32)]


@pytest.mark.parametrize("e4m3, log2", [(False, 14), (True, 6)])
def test_gemv_ptx_decode_routes_emulated(e4m3, log2):
    """Every byte value in every position: given a block's words in kernel order, $e must be element e
    of the block times 2^-log2."""
    blocks = torch.cat([torch.arange(256, dtype=torch.uint8).view(16, 16),
                        torch.randint(0, 256, (16, 16), dtype=torch.uint8)])
    want = mxfp4.decode(blocks[:, None], torch.full((32, 1), 127, dtype=torch.uint8), torch.float32)
    ptx = decode32_ptx(e4m3)
    for block, expected in zip(mxfp4.quad_transpose(blocks), want):
        got = [v * 2.0 ** log2 for v in emulate_ptx(ptx, block.view(torch.int32).tolist())]
        assert got == expected.tolist()


# ---------------------------------------------------------------- the one-row GEMV on tensor cores (PTX)
def _bf16_bits_to_float(bits: int) -> float:
    return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])


def _float_to_bf16_bits(value: float) -> int:
    bits = int(np.array([value], dtype=np.float32).view(np.uint32)[0])
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF  # round to nearest even


def emulate_warp_ptx(ptx: str, lanes: list[dict], memory: dict[int, int] | None = None) -> None:
    """Runs the tensor-core GEMV's PTX for a whole warp, in place on each lane's registers (dicts
    from operand names such as "$8" to ints, fp32 operands as Python floats); loads read `memory`
    (address -> byte). mma.sync gathers the
    fragments from all 32 lanes as the PTX ISA lays out m16n8k16 (lane 4g + t: A rows g and g + 8 at
    k 2t, 2t + 1, 2t + 8, 2t + 9; B column g at the same k; D[g, 2t..2t+1] and D[g+8, 2t..2t+1])."""
    for lane, regs in enumerate(lanes):
        regs["%laneid"] = lane

    def val(regs, token):
        if token in regs:
            return regs[token]
        if token.startswith("0f"):
            return float(np.array([int(token[2:], 16)], dtype=np.uint32).view(np.float32)[0])
        return int(token, 0) & 0xFFFFFFFF

    for line in ptx.split("\n"):
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op.startswith("mma.sync"):
            groups = [[t.strip() for t in g.split(",")] for g in re.findall(r"\{([^}]*)\}", rest)]
            d, a, b, c = groups
            A, B = np.zeros((16, 16)), np.zeros((16, 8))
            C = np.zeros((16, 8))
            for lane, regs in enumerate(lanes):
                g, t = lane // 4, lane % 4
                halves = [[_bf16_bits_to_float(regs[r] & 0xFFFF), _bf16_bits_to_float(regs[r] >> 16)]
                          for r in a]
                A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = halves[0], halves[1]
                A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = halves[2], halves[3]
                bh = [[_bf16_bits_to_float(regs[r] & 0xFFFF), _bf16_bits_to_float(regs[r] >> 16)] for r in b]
                B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = bh[0], bh[1]
                C[g, 2 * t:2 * t + 2] = [regs[c[0]], regs[c[1]]]
                C[g + 8, 2 * t:2 * t + 2] = [regs[c[2]], regs[c[3]]]
            D = (A @ B + C).astype(np.float32)
            for lane, regs in enumerate(lanes):
                g, t = lane // 4, lane % 4
                for reg, value in zip(d, (D[g, 2 * t], D[g, 2 * t + 1],
                                          D[g + 8, 2 * t], D[g + 8, 2 * t + 1])):
                    regs[reg] = float(value)
            continue
        if op.startswith("ld.global"):
            for regs in lanes:
                m = re.fullmatch(r"(.*),\s*\[\s*([\w$]+)\s*(?:\+\s*(\d+))?\s*\]", rest)
                base = regs[m.group(2)] + int(m.group(3) or 0)
                if op == "ld.global.u8":
                    regs[m.group(1).strip()] = memory[base]
                else:  # ld.global.v4.b32 {a, b, c, d}
                    for n, reg in enumerate(t.strip() for t in m.group(1).strip("{} ").split(",")):
                        regs[reg] = sum(memory[base + 4 * n + i] << 8 * i for i in range(4))
            continue
        for regs in lanes:
            dst, *src = [t.strip() for t in rest.split(",")]
            v = [val(regs, s) for s in src]
            if op in ("mov.b32", "mov.u32", "mov.f32"):
                regs[dst] = v[0]
            elif (result := _integer_op(op, v)) is not None:
                regs[dst] = result
            elif op == "mul.rn.bf16x2":
                lo = _float_to_bf16_bits(_bf16_bits_to_float(v[0] & 0xFFFF)
                                         * _bf16_bits_to_float(v[1] & 0xFFFF))
                hi = _float_to_bf16_bits(_bf16_bits_to_float(v[0] >> 16) * _bf16_bits_to_float(v[1] >> 16))
                regs[dst] = lo | hi << 16
            elif op == "add.f32":
                regs[dst] = float(np.float32(v[0]) + np.float32(v[1]))
            elif op == "setp.eq.u32":
                regs[dst] = v[0] == v[1]
            elif op == "selp.f32":
                regs[dst] = v[0] if v[2] else v[1]
            else:
                raise ValueError(f"not emulated: {line}")


@pytest.mark.parametrize("fold", [False, True])
def test_gemm_ptx_decode_is_elementwise_emulated(fold):
    """The tensor-core GEMM's decode (`ptx.decode_ptx`): every byte value, each with its own random scale
    (the compiler may group bytes of different blocks into one asm call); $0, $1 must be the low
    nibbles' values of bytes (0, 1) and (2, 3), $2, $3 the high nibbles', exactly."""
    from runtime.kernels.moe_triton_details.ptx import decode_ptx

    packed = torch.cat([torch.arange(256, dtype=torch.uint8),
                        torch.randint(0, 256, (256,), dtype=torch.uint8)])
    scales = torch.randint(100, 129 if fold else 150, packed.shape, dtype=torch.uint8)  # fold needs <= 128
    # [byte, nibble]
    values = mxfp4.decode(packed.view(-1, 16)[:, None],
                          torch.full((packed.numel() // 16, 1), 127, dtype=torch.uint8),
                          torch.float32).view(-1, 2) * 2.0 ** (scales.double() - 127)[:, None]
    ptx = decode_ptx(fold)
    for word, scale, want in zip(packed.view(torch.int32).tolist(), scales.view(torch.int32).tolist(),
                                 values.view(-1, 4, 2).tolist()):
        regs = {"$4": word & 0xFFFFFFFF, "$5": scale & 0xFFFFFFFF}
        emulate_warp_ptx(ptx, [regs])
        got = [_bf16_bits_to_float((regs[f"${r}"] >> half) & 0xFFFF) for r in range(4) for half in (0, 16)]
        assert got == [want[b][nibble] for nibble in (0, 1) for b in range(4)], (hex(word), hex(scale))


def _set_step_operands(regs: dict, token_groups: int, blocks, even_row: int, block: int,
                       x_addresses: list[int]):
    """One lane's inputs to `ptx.tensor_core_step_ptx(token_groups)` (pack 4: each input 4 registers): block
    `block`'s words of rows even_row and even_row + 1, their scale bytes' addresses (scale of row r,
    block b at 1000 + 100 r + b in the emulated memory), and each token group's x address."""
    first = 8 * token_groups
    words_a = blocks[even_row, block].view(torch.int32).tolist()
    words_b = blocks[even_row + 1, block].view(torch.int32).tolist()
    for n in range(4):
        regs[f"${first + n}"], regs[f"${first + 4 + n}"] = words_a[n] & 0xFFFFFFFF, words_b[n] & 0xFFFFFFFF
        regs[f"${first + 8 + n}"] = 1000 + 100 * even_row + block
        regs[f"${first + 12 + n}"] = 1000 + 100 * (even_row + 1) + block
        for j, address in enumerate(x_addresses):
            regs[f"${first + 16 + 4 * j + n}"] = address


def _accumulators_back_in(lanes: list[dict], token_groups: int):
    """A step's outputs become the next step's incoming accumulators (the last inputs)."""
    first = 8 * token_groups
    for regs in lanes:
        for n in range(first):
            regs[f"${first + 16 + 4 * token_groups + n}"] = regs[f"${n}"]


def test_tensor_core_gemv_ptx_emulated_on_a_warp():
    """The one-row tensor-core GEMV's PTX (decode, scale, 8 MMAs per step, then the diagonal) on one
    warp laid out as tensor_core_row_tile's tiles are on the GPU (lane 16 r + b: block b of the even row
    2r and, in the second tensor, of the odd row 2r + 1): two steps of 16 blocks each; every row's
    sum of the kept values is its dot product with x, up to fp32 rounding. Scale bytes span the
    route's whole range, 66..192."""
    from runtime.kernels.moe_triton_details.ptx import (
        TENSOR_CORE_SCALE_OFFSET,
        tensor_core_row_result_ptx,
        tensor_core_step_ptx,
    )

    gen = torch.Generator().manual_seed(5)
    rows, steps = 4, 2  # even rows 0, 2 and odd rows 1, 3: lanes 0-15 hold rows 0-1, lanes 16-31 rows 2-3
    blocks = torch.randint(0, 256, (rows, steps * 16, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(66, 193, (rows, steps * 16), dtype=torch.uint8, generator=gen)
    scales[:, :4] = torch.tensor([66, 192, 127, 100])
    x = (torch.randn(steps * 16 * 32, generator=gen) * 2.0 ** torch.randint(-60, 40, (1,), generator=gen)).to(
        torch.bfloat16)
    weights = mxfp4.decode(blocks, scales, torch.float32, kernel_order=True).double()
    # the kernel multiplies 2^offset back later
    want = (weights * 2.0 ** -TENSOR_CORE_SCALE_OFFSET) @ x.double()
    lanes = [{f"${28 + n}": 0.0 for n in range(8)} for _ in range(32)]
    # memory: scale bytes of row r, block b at 1000 + 100 r + b; x at 1 << 16 (16-byte aligned)
    memory = {1000 + 100 * r + b: int(scales[r, b]) for r in range(rows) for b in range(steps * 16)}
    memory.update(enumerate(x.view(torch.uint8).tolist(), start=1 << 16))
    step_ptx = tensor_core_step_ptx()
    for step in range(steps):
        for lane, regs in enumerate(lanes):
            r, b = lane // 16, step * 16 + lane % 16
            _set_step_operands(regs, 1, blocks, 2 * r, b, [(1 << 16) + 64 * b])
        emulate_warp_ptx(step_ptx, lanes, memory)
        _accumulators_back_in(lanes, 1)
    for regs in lanes:
        for n in range(8):
            regs[f"${8 + n}"] = regs[f"${n}"]
    emulate_warp_ptx(tensor_core_row_result_ptx(), lanes)
    got = torch.zeros(rows, dtype=torch.float64)
    for lane, regs in enumerate(lanes):
        r = lane // 16
        assert all(regs[f"${n}"] == 0.0 for n in (1, 2, 3, 5, 6, 7))
        got[2 * r] += regs["$0"]
        got[2 * r + 1] += regs["$4"]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), (got, want)


@pytest.mark.parametrize("token_groups", [1, 2])
def test_tensor_core_rows_gemv_ptx_emulated_on_a_warp(token_groups):
    """The multi-row tensor-core GEMV's PTX on one warp laid out as tensor_core_rows_tile's tiles are on
    the GPU (lane 4g + t: block t of each 4-block chunk of the even row 2g and, in the second tensor,
    of the odd row 2g + 1; token g of each group of 8 as the B column): three chunks, 8 or 16 tokens;
    after `tensor_core_rows_result_ptx`, lane 4g + t holds in $0, $1 the even row's products with tokens
    2t, 2t + 1 of the group and in $4, $5 the odd row's, up to fp32 rounding. Scale bytes span the
    route's whole range, 66..192."""
    from runtime.kernels.moe_triton_details.ptx import (
        TENSOR_CORE_SCALE_OFFSET,
        tensor_core_rows_result_ptx,
        tensor_core_step_constraints,
        tensor_core_step_ptx,
    )

    gen = torch.Generator().manual_seed(6 + token_groups)
    rows, steps, tokens = 16, 3, 8 * token_groups
    K = steps * 4 * 32
    blocks = torch.randint(0, 256, (rows, steps * 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(66, 193, (rows, steps * 4), dtype=torch.uint8, generator=gen)
    scales[:4, 0] = torch.tensor([66, 192, 127, 100])
    x = (torch.randn(tokens, K, generator=gen)
         * 2.0 ** torch.randint(-60, 40, (1,), generator=gen)).to(torch.bfloat16)
    weights = mxfp4.decode(blocks, scales, torch.float32, kernel_order=True).double()
    # [rows, tokens]; the kernel undoes 2^-offset
    want = (weights * 2.0 ** -TENSOR_CORE_SCALE_OFFSET) @ x.double().T
    # the step's operands: outputs, 8 weight words, scale and x addresses, accumulators
    first = 8 * token_groups
    assert len(tensor_core_step_constraints(token_groups).split(",")) == first + 16 + 4 * token_groups + first
    lanes = [{f"${first + 16 + 4 * token_groups + n}": 0.0 for n in range(first)} for _ in range(32)]
    # memory: scale bytes of row r, block b at 1000 + 100 r + b; token n's x at (1 << 16) + 2 K n
    memory = {1000 + 100 * r + b: int(scales[r, b]) for r in range(rows) for b in range(steps * 4)}
    memory.update(enumerate(x.view(torch.uint8).reshape(-1).tolist(), start=1 << 16))
    step_ptx = tensor_core_step_ptx(token_groups)
    for step in range(steps):
        for lane, regs in enumerate(lanes):
            g, b = lane // 4, step * 4 + lane % 4
            x_addresses = [(1 << 16) + 2 * K * (8 * j + g) + 64 * b for j in range(token_groups)]
            _set_step_operands(regs, token_groups, blocks, 2 * g, b, x_addresses)
        emulate_warp_ptx(step_ptx, lanes, memory)
        _accumulators_back_in(lanes, token_groups)
    got = torch.full((rows, tokens), float("nan"), dtype=torch.float64)
    chains = [{n: regs[f"${n}"] for n in range(first)} for regs in lanes]
    for j in range(token_groups):
        for lane, regs in enumerate(lanes):
            for n in range(8):
                regs[f"${8 + n}"] = chains[lane][8 * j + n]
        emulate_warp_ptx(tensor_core_rows_result_ptx(), lanes)
        for lane, regs in enumerate(lanes):
            g, t = lane // 4, lane % 4
            assert ((regs["$2"], regs["$3"], regs["$6"], regs["$7"])
                    == (regs["$0"], regs["$1"], regs["$4"], regs["$5"]))
            for parity in (0, 1):
                got[2 * g, 8 * j + 2 * t + parity] = regs[f"${parity}"]
                got[2 * g + 1, 8 * j + 2 * t + parity] = regs[f"${4 + parity}"]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), (got - want).abs().max()


def test_multi_row_tensor_core_tiles():
    """The multi-row route's shape rules, and the tiles choose_tiles gives it on a GPU (not under the
    interpreter, which runs no PTX) for decode batches of both models."""
    assert gemv_tiles_ok(Tiles(8, 64, 128, 4, 1, "gemv", decode="tensor_core_rows"))
    assert gemv_tiles_ok(Tiles(16, 128, 128, 4, 1, "gemv", decode="tensor_core_rows"))
    # 4 blocks a lane in a chunk
    assert gemv_tiles_ok(Tiles(8, 32, 512, 2, 1, "gemv", decode="tensor_core_rows"))
    assert not gemv_tiles_ok(Tiles(8, 64, 1024, 4, 1, "gemv", decode="tensor_core_rows"))
    # a chunk is 4 lanes' blocks
    assert not gemv_tiles_ok(Tiles(8, 64, 64, 4, 1, "gemv", decode="tensor_core_rows"))
    assert not gemv_tiles_ok(Tiles(4, 64, 128, 4, 1, "gemv", decode="tensor_core_rows"))  # 8 or 16 rows
    # 16 rows for 4 warps
    assert not gemv_tiles_ok(Tiles(8, 32, 128, 4, 1, "gemv", decode="tensor_core_rows"))
    from runtime.kernels.moe_triton_details import tiles as tiles_module

    interpret = tiles_module.INTERPRET
    try:
        tiles_module.INTERPRET = False
        for experts, batches in ((32, (2, 4, 8, 16, 32, 64)), (128, (64, 128, 256, 512))):
            for batch in batches:
                for swiglu in (True, False):
                    t = tiles_module.choose_tiles(4 * batch, experts, swiglu)
                    assert t.kernel == "gemm" or gemv_tiles_ok(t), t
                    if experts < 2 * (4 * batch) and 4 * batch <= 8 * experts:
                        assert t.decode == "tensor_core_rows", (batch, experts, t)
    finally:
        tiles_module.INTERPRET = interpret


def test_swiglu_clamps_and_adds_one():
    h = torch.tensor([10.0, 10.0, -10.0, -10.0, 1.0, 0.5])  # (gate, linear) pairs
    out = swiglu(h, 7.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out[0].item() == pytest.approx(7 * sig(1.702 * 7) * 8)  # gate clamped to 7, linear to 7, +1
    assert out[1].item() == pytest.approx(-10 * sig(-17.02) * -6)  # gate not clamped below; linear to -7
    assert out[2].item() == pytest.approx(1 * sig(1.702) * 1.5)


def quick_gelu_glu(g, l):
    return g / (1 + math.exp(-SWIGLU_ALPHA * g)) * (l + 1)


@pytest.mark.parametrize("limit, pairs, expected", [
    # (gate, linear) pairs, interleaved as gate = even channel, linear = odd channel.
    (7.0, [(10.0, 0.0)], [quick_gelu_glu(7.0, 0.0)]),            # gate clamped above to 7
    (7.0, [(1.0, 10.0)], [quick_gelu_glu(1.0, 7.0)]),             # linear clamped above to 7
    (7.0, [(1.0, -10.0)], [quick_gelu_glu(1.0, -7.0)]),           # linear clamped below to -7
    (1.0, [(-3.0, 0.5)], [quick_gelu_glu(-3.0, 0.5)]),            # gate not clamped below
    (1.0, [(0.5, -0.25), (2.0, -2.0)], [quick_gelu_glu(0.5, -0.25), quick_gelu_glu(1.0, -1.0)]),
])
def test_swiglu_by_hand(limit, pairs, expected):
    h = torch.tensor([x for pair in pairs for x in pair], dtype=torch.float64)
    out = swiglu(h, limit)
    assert out.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("tokens", [1, 5, 61, 100, 700, 4096])
def test_triton_experts_match_the_reference_at_real_shapes(name, tokens):
    """Every tile shape choose_tiles picks (1 to 4096 tokens), the PTX decode, both entry points."""
    from runtime.kernels.moe import expert_rows
    from runtime.kernels.moe_triton import (
        expert_rows_triton,
        grouped_mxfp4,
        moe_triton,
        plan,
    )
    from runtime.kernels.router import route

    cfg = preset(name)
    specs = tensor_specs(cfg)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    args = [random_tensor(specs[f"block.0.mlp.{k}"], gen, "cuda") for k in
            ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias", "mlp2_weight.blocks",
             "mlp2_weight.scales", "mlp2_bias")]
    expert_ids, weights = route(torch.randn(tokens, cfg.num_experts, device="cuda"), cfg.experts_per_token)
    h = torch.randn(tokens, cfg.hidden_size, device="cuda")
    rows = h.repeat_interleave(cfg.experts_per_token, 0)
    experts = expert_ids.reshape(-1)
    # fp32 activations: the dots run in fp32 (ieee), so only the decode could make a large error.
    # the biases, as an fp32 model holds them
    fp32_args = [a.float() if a.is_floating_point() else a for a in args]
    ref = expert_rows(rows, experts, *fp32_args, cfg.swiglu_limit)
    got = expert_rows_triton(rows, experts, *fp32_args, cfg.swiglu_limit)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    # bf16 activations and operands, fp32 accumulation in both.
    hb = h.to(torch.bfloat16)
    ref = expert_rows(hb.repeat_interleave(cfg.experts_per_token, 0), experts, *args, cfg.swiglu_limit)
    want = (ref.view(tokens, -1, cfg.hidden_size) * weights[..., None]).sum(1)
    got = moe_triton(hb, expert_ids, weights, *args, cfg.swiglu_limit).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel
    p = plan(experts, cfg.num_experts)
    poisoned = torch.full((len(experts), cfg.intermediate_size), float("nan"), device="cuda",
                          dtype=torch.bfloat16)
    grouped_mxfp4(hb, p.order, cfg.experts_per_token, p, *args[:3], torch.bfloat16,
                  swiglu_limit=cfg.swiglu_limit, out=poisoned)
    assert torch.isfinite(poisoned).all()  # every element written


def _random_experts(E, n, k, gen):
    """Random MXFP4 experts [E, n, k] on the GPU (blocks, scales, bf16 bias), some scale bytes at the
    tensor-core routes' lower end (66)."""
    blocks = torch.randint(0, 256, (E, n, k // 32, 16), dtype=torch.uint8, device="cuda", generator=gen)
    scales = torch.randint(110, 131, (E, n, k // 32), dtype=torch.uint8, device="cuda", generator=gen)
    scales[:, ::7, ::5] = 66
    return blocks, scales, torch.randn(E, n, device="cuda", generator=gen).to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
# 2: each expert's intermediate dimension halved (tensor parallelism)
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("tokens", [1, 4])
def test_moe_gemv_on_tensor_cores_matches_the_cuda_core_route(name, split, tokens):
    """The one-row GEMV on tensor cores (decode "tensor_core_row") against the CUDA-core one on the same bf16
    inputs, mlp1 (SwiGLU) and mlp2: both sum exact products in fp32, so only the order of the sums
    differs. K = 2880 and 1440 end in a partial chunk; every output element is written (poisoned
    first); some scale bytes sit at the route's lower end (66)."""
    from runtime.kernels.moe_triton import (
        choose_tiles,
        grouped_mxfp4,
        plan,
        tensor_core_gemv_fits,
    )
    from runtime.kernels.router import route

    cfg = preset(name)
    E, d, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size // split
    gen = torch.Generator(device="cuda").manual_seed(tokens + 10 * split)

    w1, w2 = _random_experts(E, 2 * inter, d, gen), _random_experts(E, d, inter, gen)
    expert_ids, _ = route(torch.randn(tokens, E, device="cuda", generator=gen), cfg.experts_per_token)
    p = plan(expert_ids.reshape(-1), E)
    h = torch.randn(tokens, d, device="cuda", generator=gen).to(torch.bfloat16)
    # the model's tiles
    tiles1, tiles2 = choose_tiles(p.num_rows, E, True), choose_tiles(p.num_rows, E, False)
    assert tiles1.decode == tiles2.decode == "tensor_core_row"
    assert tensor_core_gemv_fits(h, w1[1], tiles1) and tensor_core_gemv_fits(h, w2[1], tiles2)
    outs = {}
    for decode in ("tensor_core_row", "fp16"):
        act = torch.full((p.num_rows, inter), float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w1, torch.bfloat16,
                      swiglu_limit=cfg.swiglu_limit, tiles=dataclasses.replace(tiles1, decode=decode),
                      out=act)
        # the same mlp2 input for both routes
        act_in = outs["tensor_core_row"][0] if decode == "fp16" else act
        y = torch.full((p.num_rows, d), float("nan"), dtype=torch.float32, device="cuda")
        grouped_mxfp4(act_in, None, 1, p, *w2, torch.float32,
                      tiles=dataclasses.replace(tiles2, decode=decode), out=y)
        assert torch.isfinite(act).all() and torch.isfinite(y).all()
        outs[decode] = (act, y)
    (act, y), (act_ref, y_ref) = outs["tensor_core_row"], outs["fp16"]
    # bf16 outputs of fp32 sums that differ in order: one bf16 rounding apart, or cancellation's noise
    a, b = act.float(), act_ref.float()
    assert ((a - b).abs() <= 2 ** -7 * b.abs() + 1e-4 * b.abs().max()).all()
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("block_t", [8, 16])
@pytest.mark.parametrize("tokens", [3, 16, 64])
def test_moe_multi_row_gemv_on_tensor_cores_matches_the_cuda_core_route(name, block_t, tokens):
    """The multi-row tensor-core GEMV (decode "tensor_core_rows", 8 or 16 rows a tile) against the CUDA-core
    GEMV with one row a tile, on the same bf16 inputs, mlp1 (SwiGLU, rows gathered from the tokens)
    and mlp2: both sum exact products in fp32, so only the order of the sums differs. Experts get
    from 1 to over 16 rows (one expert is given a whole batch's worth), so tiles are full, partial,
    and an expert spans several; every output element is written (poisoned first)."""

    from runtime.kernels.moe_triton import (
        PROBE_REFERENCE_TILES,
        Tiles,
        grouped_mxfp4,
        plan,
        tensor_core_gemv_fits,
    )
    from runtime.kernels.router import route

    cfg = preset(name)
    E, d, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device="cuda").manual_seed(tokens + 100 * block_t)

    w1, w2 = _random_experts(E, 2 * inter, d, gen), _random_experts(E, d, inter, gen)
    expert_ids, _ = route(torch.randn(tokens, E, device="cuda", generator=gen), cfg.experts_per_token)
    expert_ids[:, 0] = 5  # one expert on every token
    p = plan(expert_ids.reshape(-1), E)
    h = torch.randn(tokens, d, device="cuda", generator=gen).to(torch.bfloat16)
    tiles = Tiles(block_t, 64, 128, 4, 1, "gemv", decode="tensor_core_rows")
    assert tensor_core_gemv_fits(h, w1[1], tiles) and tensor_core_gemv_fits(h, w2[1], tiles)
    outs = {}
    for t in (tiles, PROBE_REFERENCE_TILES):
        act = torch.full((p.num_rows, inter), float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped_mxfp4(h, p.order, cfg.experts_per_token, p, *w1, torch.bfloat16,
                      swiglu_limit=cfg.swiglu_limit, tiles=t, out=act)
        act_in = outs[tiles][0] if t is PROBE_REFERENCE_TILES else act  # the same mlp2 input for both routes
        y = torch.full((p.num_rows, d), float("nan"), dtype=torch.float32, device="cuda")
        grouped_mxfp4(act_in, None, 1, p, *w2, torch.float32, tiles=t, out=y)
        assert torch.isfinite(act).all() and torch.isfinite(y).all()
        outs[t] = (act, y)
    (act, y), (act_ref, y_ref) = outs[tiles], outs[PROBE_REFERENCE_TILES]
    # bf16 outputs of fp32 sums that differ in order: one bf16 rounding apart, or cancellation's noise
    a, b = act.float(), act_ref.float()
    assert ((a - b).abs() <= 2 ** -7 * b.abs() + 1e-4 * b.abs().max()).all()
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("top_scale", [128, 131])  # <= 128: the folded one-multiply decode; above: two
def test_triton_decode_at_both_scale_ranges(top_scale):
    from runtime.kernels.moe import expert_rows
    from runtime.kernels.moe_triton import expert_rows_triton, scales_fold

    E, d, inter = 4, 256, 256
    w1 = [torch.randint(0, 256, (E, 2 * inter, d // 32, 16), dtype=torch.uint8, device="cuda"),
          torch.randint(top_scale - 8, top_scale + 1, (E, 2 * inter, d // 32), dtype=torch.uint8,
                        device="cuda"),
          torch.randn(E, 2 * inter, device="cuda")]
    w2 = [torch.randint(0, 256, (E, d, inter // 32, 16), dtype=torch.uint8, device="cuda"),
          torch.randint(top_scale - 8, top_scale + 1, (E, d, inter // 32), dtype=torch.uint8, device="cuda"),
          torch.randn(E, d, device="cuda")]
    assert scales_fold(w1[1]) == (top_scale <= 128)
    experts = torch.randint(0, E, (40,), device="cuda")
    x = torch.randn(40, d, device="cuda") * 2.0 ** (120 - top_scale)
    ref = expert_rows(x, experts, *w1, *w2, 1e30)  # no clamp: exercise the decode's whole range
    got = expert_rows_triton(x, experts, *w1, *w2, 1e30)
    assert torch.isfinite(ref).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel


# ------------------------------------------------------------------------------ the tile table
def _frozen_choose_tiles(rows, num_experts, swiglu, interpret):
    """choose_tiles and mma_tiles as if/elif chains before they became a table (new names; mlp2's
    GEMM tiles from 49 rows per expert since the blocks are in kernel order, from 65 since session 17,
    with 64-row tiles up to 64 rows, mlp2's register-capped)."""
    cuda_core = {True: "fp16", False: "e4m3"}

    def gemm(rows, num_experts, swiglu):
        per_expert = rows / max(1, min(rows, num_experts))
        if per_expert <= 2:
            return Tiles(8, 64, 128, 4, 4) if swiglu else Tiles(8, 32, 128, 2, 4)
        if per_expert <= 16:
            return Tiles(32, 128, 64, 8, 3)
        if per_expert <= 64:
            return Tiles(64, 128, 64, 4, 3) if swiglu else Tiles(64, 128, 64, 4, 3, maxnreg=128)
        if per_expert <= 128:
            return Tiles(128, 128, 64, 8, 3)  # mlp1's was 128, 64, 64, 4, 3 until session 21
        return Tiles(256, 128, 64, 8, 4) if swiglu else Tiles(128, 128, 64, 8, 3)

    per_expert = rows / max(1, min(rows, num_experts))
    if rows * 2 <= num_experts:
        mma = options.moe_tensor_core_gemv
        wide = mma and not interpret and rows * 8 <= num_experts
        tiles = Tiles(1, 16, 1024 if wide else 512, 4, 1, "gemv",
                      decode="tensor_core_row" if mma else cuda_core[swiglu])
    elif per_expert <= 8 and not interpret and options.moe_tensor_core_rows:
        wide = per_expert <= 2 and (swiglu or num_experts >= 128)
        return (Tiles(8, 64, 256 if wide else 128, 4, 1, "gemv", decode="tensor_core_rows"),
                gemm(rows, num_experts, swiglu))
    elif per_expert <= 1:
        tiles = Tiles(2, 32, 256, 4, 1, "gemv", decode="e4m3" if swiglu else "fp16", unroll=False)
    else:
        return gemm(rows, num_experts, swiglu), gemm(rows, num_experts, swiglu)
    tiles = dataclasses.replace(tiles, block_n=128, decode=cuda_core[swiglu]) if interpret else tiles
    return tiles, gemm(rows, num_experts, swiglu)


def test_tile_table_matches_the_frozen_if_chains(monkeypatch):
    from runtime.kernels.moe_triton_details import tiles as tiles_module

    grid = sorted(set(range(0, 600)) | set(range(600, 20001, 37)) | {1023, 1024, 1025, 4096, 16384, 20000})
    checked = 0
    for interpret in (True, False):
        monkeypatch.setattr(tiles_module, "INTERPRET", interpret)
        for row_gemv in (True, False):
            for rows_gemv in (True, False):
                with options.override(moe_tensor_core_gemv=row_gemv, moe_tensor_core_rows=rows_gemv):
                    for experts in (32, 128):
                        for rows in grid:
                            for swiglu in (True, False):
                                want, want_gemm = _frozen_choose_tiles(rows, experts, swiglu, interpret)
                                assert tiles_module.choose_tiles(rows, experts, swiglu) == want, \
                                    (rows, experts)
                                assert tiles_module.gemm_tiles(rows, experts, swiglu) == want_gemm
                                checked += 1
    assert checked > 10000
