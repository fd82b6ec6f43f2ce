"""Paged attention: the torch reference against `attention`, the Triton kernels against the reference.

CPU runs the kernels in Triton's interpreter with fp32 operands at tiny shapes; the GPU tests (bf16,
the real head shapes, contexts up to 131,072) are marked and run on the device.
"""

import math
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime.kernels.attention import attention, paged_attention  # noqa: E402
from runtime.kv_cache import to_cache_dtype  # noqa: E402
from runtime.kernels.attention_triton import (  # noqa: E402
    H100_SMS,
    choose_num_splits,
    paged_attention_triton,
)

# fp32 everywhere on CPU: only the summation order differs from the reference.
ATOL = 1e-4
# A flat batch: (q_start, n) per sequence. First-token decode, decode deep in the cache, prefill
# from scratch, and prefill chunks over a cached prefix longer than the test window.
MIXED = [(0, 5), (37, 1), (20, 11), (0, 1), (70, 1), (9, 23)]


def cdiv(a, b):
    return -(-a // b)


def paged_batch(seqs, *, kv_heads, group, head_dim, page_size, window, dtype=torch.float32, device="cpu"):
    """Random q, sinks and a shuffled page pool holding each sequence's keys.

    Every pool slot the kernel has no business reading is NaN: free pages, the tail of each last
    page, and keys older than the window. Released pages (wholly older than the first visible key)
    get block-table entry -1 or point at a NaN page, as a reused page would.
    """
    num_heads = kv_heads * group
    pages_per_seq = [cdiv(start + n, page_size) for start, n in seqs]
    num_pages = sum(pages_per_seq) + 3
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_pages = torch.full(shape, float("nan"), dtype=dtype, device=device)
    physical = torch.randperm(num_pages).tolist()
    nan_page = physical.pop()
    block_table = torch.full((len(seqs), max(pages_per_seq) + 2), -1, dtype=torch.int32)
    keys, values = [], []
    for s, (start, n) in enumerate(seqs):
        end = start + n
        first = 0 if window is None else max(0, start - window + 1)
        k = torch.randn(end, kv_heads, head_dim, device=device).to(dtype)
        v = torch.randn(end, kv_heads, head_dim, device=device).to(dtype)
        keys.append(k)
        values.append(v)
        for i in range(pages_per_seq[s]):
            page = physical.pop()
            if (i + 1) * page_size <= first:  # released: older than anything this step can see
                block_table[s, i] = -1 if i % 2 else nan_page
                continue
            block_table[s, i] = page
            a, b = max(i * page_size, first), min((i + 1) * page_size, end)
            k_pages[page, a - i * page_size:b - i * page_size] = k[a:b]
            v_pages[page, a - i * page_size:b - i * page_size] = v[a:b]
    lengths = torch.tensor([n for _, n in seqs])
    cu_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(lengths, 0)
    return SimpleNamespace(
        q=torch.randn(int(cu_q[-1]), num_heads, head_dim, device=device).to(dtype), k_pages=k_pages,
        v_pages=v_pages, block_table=block_table.to(device), cu_q=cu_q.to(device),
        q_start=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        sinks=torch.randn(num_heads, device=device), keys=keys, values=values,
        sm_scale=head_dim ** -0.5, window=window)


def args(b):
    return (b.q, b.k_pages, b.v_pages, b.block_table, b.cu_q, b.q_start, b.sinks)


def reference(b):
    return paged_attention(*args(b), sm_scale=b.sm_scale, window=b.window)


def triton_poisoned(b, **kw):
    """The kernel writing into a NaN-filled output, so any element it fails to write shows."""
    out = torch.full_like(b.q, float("nan"))
    got = paged_attention_triton(*args(b), sm_scale=b.sm_scale, window=b.window, out=out, **kw)
    assert got is out
    return got


def assert_close(got, want, atol=ATOL):
    assert torch.isfinite(got).all(), "unwritten or NaN-reading output"
    err = (got.float() - want.float()).abs().max().item()
    assert err < atol, err


@pytest.mark.parametrize("window", [None, 8])
def test_reference_matches_attention_on_contiguous_keys(window):
    b = paged_batch(MIXED, kv_heads=2, group=4, head_dim=32, page_size=16, window=window)
    got = reference(b)
    assert torch.isfinite(got).all()
    for s, (start, n) in enumerate(MIXED):
        rows = slice(int(b.cu_q[s]), int(b.cu_q[s + 1]))
        want = attention(b.q[rows], b.keys[s], b.values[s], b.sinks, q_start=start, k_start=0,
                         sm_scale=b.sm_scale, window=window)
        assert torch.allclose(got[rows], want, atol=1e-6), s


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_mixed_batch_small_tiles(group, window, page_size):
    # Small tiles (32 rows, 16 keys) so every sequence spans several query and key tiles.
    b = paged_batch(MIXED, kv_heads=2, group=group, head_dim=32, page_size=page_size, window=window)
    assert_close(triton_poisoned(b, block_m=32, block_n=16, num_splits=1), reference(b))


@pytest.mark.parametrize("window", [None, 8])
def test_default_tiles_at_the_tiny_model_shape(window):
    """The GPU tile shapes (128-row prefill tiles of 64 keys, 16-row decode tiles of 128 keys)."""
    b = paged_batch(MIXED + [(150, 40)], kv_heads=4, group=4, head_dim=32, page_size=16, window=window)
    assert_close(triton_poisoned(b, num_splits=1), reference(b))
    decode = paged_batch([(0, 1), (200, 1), (63, 1), (131, 1)], kv_heads=4, group=4, head_dim=32,
                         page_size=32, window=window)
    assert_close(triton_poisoned(decode, num_splits=1), reference(decode))


def to_float8(b):
    """The batch with its pages as a float8 cache stores them (kv_cache_dtype=fp8); NaN poison stays NaN."""
    return SimpleNamespace(**{**vars(b), "k_pages": to_cache_dtype(b.k_pages, torch.float8_e4m3fn),
                              "v_pages": to_cache_dtype(b.v_pages, torch.float8_e4m3fn)})


@pytest.mark.parametrize("window", [None, 8])
def test_float8_cache(window):
    """A float8 cache read by the kernels as the reference reads it (both widen each value exactly):
    prefill and decode tiles, split and not."""
    b = to_float8(paged_batch(MIXED + [(150, 40)], kv_heads=2, group=4, head_dim=32, page_size=16,
                              window=window))
    assert b.k_pages.dtype == torch.float8_e4m3fn
    want = reference(b)
    assert_close(triton_poisoned(b, num_splits=1), want)
    assert_close(triton_poisoned(b, block_m=32, block_n=16, num_splits=3), want)
    decode = to_float8(paged_batch([(0, 1), (200, 1), (63, 1)], kv_heads=2, group=4, head_dim=32,
                                   page_size=16, window=window))
    assert_close(triton_poisoned(decode, num_splits=2), reference(decode))


@pytest.mark.parametrize("window", [None, 8])
def test_float8_cache_with_bf16_queries_takes_fp16_dots(window):
    """bf16 queries over a float8 cache: the GPU's route (dots on fp16 operands, which the interpreter
    computes right), decodes beside prompt chunks, split and not. Against the fp32 reference over the
    same pages: p rounded to fp16 (2^-11) and the output to bf16 (2^-9) are the differences."""
    b = to_float8(paged_batch(DECODES_FIRST + [(150, 40)], kv_heads=2, group=4, head_dim=32, page_size=16,
                              window=window, dtype=torch.bfloat16))
    want = reference(b).float()
    scale = want.abs().max().item()
    for kw in ({"num_splits": 1, "decodes": 3}, {"block_m": 32, "block_n": 16, "num_splits": 3}):
        got = triton_poisoned(b, **kw)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert (got.float() - want).abs().max().item() < 1e-2 * scale, kw


# A mixed step as the scheduler plans it: decodes first (fewest tokens to compute), then prompt chunks.
DECODES_FIRST = [(37, 1), (0, 1), (70, 1), (0, 5), (20, 11), (9, 23), (3, 1)]


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("window", [None, 8])
def test_decodes_of_a_mixed_step_in_their_own_launch(window, num_splits):
    """decodes=3: the leading single-query sequences run in decode-shaped tiles, the rest (a late
    one-query chunk too) in prefill tiles; the output is the reference's either way."""
    from runtime.kv_cache import PagePool, SequenceKV
    from runtime.step import PagedStep, SequenceChunk

    b = paged_batch(DECODES_FIRST, kv_heads=2, group=4, head_dim=32, page_size=16, window=window)
    want = reference(b)
    assert_close(triton_poisoned(b, num_splits=num_splits, decodes=3), want)
    assert_close(triton_poisoned(b, num_splits=num_splits, decodes=0), want)
    # The step description counts the leading decodes (not the late one-query chunk).
    pool = PagePool([0], 2, 32, torch.float32, "cpu", num_pages=32)
    chunks = []
    for start, n in DECODES_FIRST:
        kv = SequenceKV(pool)
        kv.reserve(0, start + n)
        chunks.append(SequenceChunk(start, n, kv))
    assert PagedStep.of(chunks, "cpu").decodes == 3
    assert PagedStep.of(chunks[3:], "cpu").decodes == 0 and PagedStep.of(chunks[:3], "cpu").decodes == 3


@pytest.mark.parametrize("num_splits", [3, 5])
@pytest.mark.parametrize("window", [None, 8])
def test_split_k(window, num_splits):
    # Decode at several depths (a 1-key one leaves most slices empty) and a short chunk, all split.
    seqs = [(299, 1), (16, 1), (0, 1), (100, 3), (47, 1)]
    b = paged_batch(seqs, kv_heads=2, group=8, head_dim=16, page_size=16, window=window)
    assert_close(triton_poisoned(b, block_n=16, num_splits=num_splits), reference(b))


# Unmasked key tiles (those every row of a query tile sees whole) and the masked ones around them, at
# 8-token query tiles and 16-key tiles. Query tiles that start 3 key tiles in (54), mid key tile
# (37, 45, 53), two keys short of a tile edge (14, 30, 46: the tile ending at their next key must
# stay masked), one key short (47: the tile ending at 47 needs no mask) and on an edge (48); ragged
# ends (61 keys); a 2-token tile (48, 49), whose last query's window starts one key after its first
# query's; decode at 101 and 64 keys.
BOUNDARIES = [(6, 55), (37, 19), (47, 9), (48, 2), (100, 1), (63, 1)]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 8, 40])
def test_unmasked_tiles_and_masked_edges(window, num_splits):
    # Window 40 leaves a query tile of 8 tokens one unmasked key tile between two masked ones (the
    # window's edge, the diagonal); window 8 leaves none. Three splits cut the unmasked run short.
    b = paged_batch(BOUNDARIES, kv_heads=1, group=4, head_dim=16, page_size=16, window=window)
    assert_close(triton_poisoned(b, block_m=32, block_n=16, num_splits=num_splits), reference(b))


def test_split_k_chosen_automatically():
    b = paged_batch([(1000, 1)], kv_heads=1, group=8, head_dim=16, page_size=32, window=None)
    assert choose_num_splits(1, 1001, H100_SMS) == 1001 // 256  # the split the call below takes
    assert_close(triton_poisoned(b, block_n=32), reference(b))


def test_split_choice_fills_an_h100():
    # One 131k-token sequence, 8 KV heads: enough slices for several programs per SM.
    splits = choose_num_splits(8, 131072, 132)
    assert 8 * splits >= 2 * 132 and splits <= 128
    assert choose_num_splits(64 * 8, 4096, 132) == 1  # batch 64 already covers the SMs
    assert choose_num_splits(8, 128, 132) == 1  # a sliding layer's 128 keys: nothing to split
    assert choose_num_splits(8, 1024, 132) == 4


def test_strided_q_and_out():
    """q and out as head slices of wider rows (as from a fused QKV projection)."""
    b = paged_batch(MIXED, kv_heads=2, group=2, head_dim=32, page_size=16, window=None)
    want = reference(b)
    wide = torch.randn(b.q.shape[0], b.q.shape[1] + 3, 32)
    wide[:, 1:1 + b.q.shape[1]] = b.q
    b.q = wide[:, 1:1 + b.q.shape[1]]
    out_wide = torch.full_like(wide, float("nan"))
    out = out_wide[:, 2:2 + b.q.shape[1]]
    paged_attention_triton(*args(b), sm_scale=b.sm_scale, window=None, out=out, block_m=32, block_n=16,
                           max_q_len=23, max_k_len=71)
    assert_close(out, want)
    assert out_wide[:, :2].isnan().all() and out_wide[:, 2 + b.q.shape[1]:].isnan().all()


# --- GPU: bf16 at the real shapes (H=64, KVH=8, D=64, page 16) ---------------------------------

def assert_bf16_close(got, want):
    # bf16 q/k/v, probabilities rounded to bf16 for the PV dot, bf16 output: a few bf16 ulps of
    # the output's scale (2^-8 = 3.9e-3 per rounding).
    assert torch.isfinite(got).all()
    err = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err < 2e-2 * scale, (err, scale)


def fp32_reference(b):
    return paged_attention(b.q.float(), b.k_pages.float(), b.v_pages.float(), b.block_table, b.cu_q,
                           b.q_start, b.sinks, sm_scale=b.sm_scale, window=b.window)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("context", [1024, 32768, 131072])
def test_gpu_decode_real_shapes(context, window):
    b = paged_batch([(context - 1, 1)], kv_heads=8, group=8, head_dim=64, page_size=16, window=window,
                    dtype=torch.bfloat16, device="cuda")
    if window is None:  # the full layer takes the split-K path
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert choose_num_splits(8, context, sms) > 1
    want = fp32_reference(b)
    assert_bf16_close(triton_poisoned(b), want)
    assert_bf16_close(triton_poisoned(b, num_splits=1), want)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_prefill_chunk_over_cached_prefix(window):
    # 2048 queries over a 4096-token prefix; the fp32 reference peaks near 16 GB here.
    b = paged_batch([(4096, 2048)], kv_heads=8, group=8, head_dim=64, page_size=16, window=window,
                    dtype=torch.bfloat16, device="cuda")
    assert_bf16_close(triton_poisoned(b), fp32_reference(b))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_mixed_batch_real_shapes(window, page_size):
    seqs = [(0, 300), (5000, 1), (700, 1), (0, 1), (2000, 129), (9000, 1), (130, 64)]
    b = paged_batch(seqs, kv_heads=8, group=8, head_dim=64, page_size=page_size, window=window,
                    dtype=torch.bfloat16, device="cuda")
    want = fp32_reference(b)
    assert_bf16_close(triton_poisoned(b), want)
    assert_bf16_close(triton_poisoned(b, num_splits=4), want)
    # fp32 on the GPU (ieee dots): the tight tolerance of the CPU tests.
    b32 = SimpleNamespace(**{**vars(b), "q": b.q.float(), "k_pages": b.k_pages.float(),
                             "v_pages": b.v_pages.float()})
    assert_close(triton_poisoned(b32), want)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_mixed_step_decodes_in_their_own_launch(window):
    seqs = [(1535, 1)] * 96 + [(5000, 1), (0, 1)] + [(0, 300), (2000, 129), (130, 64)]
    b = paged_batch(seqs, kv_heads=8, group=8, head_dim=64, page_size=16, window=window,
                    dtype=torch.bfloat16, device="cuda")
    want = fp32_reference(b)
    assert_bf16_close(triton_poisoned(b, decodes=98), want)
    assert_bf16_close(triton_poisoned(b, decodes=98, num_splits=4), want)


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


# ------------------------------------------------------------------------------ ops by hand
def test_attention_sink_with_only_the_diagonal_visible():
    # window=1: query t sees only key t, so p = exp(s) / (exp(s) + exp(sink)), o = p * v_t.
    n, heads, kv_heads, dim = 5, 6, 3, 8
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    sinks = torch.randn(heads)
    sm_scale = 0.3
    out = attention(q, k, v, sinks, q_start=0, k_start=0, sm_scale=sm_scale, window=1)
    for t in range(n):
        for h in range(heads):
            kv = h // (heads // kv_heads)  # GQA: query head h reads KV head h // group
            s = sum(q[t, h, i].item() * k[t, kv, i].item() for i in range(dim)) * sm_scale
            p = math.exp(s) / (math.exp(s) + math.exp(sinks[h].item()))
            torch.testing.assert_close(out[t, h], p * v[t, kv], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 1, 4])
def test_attention_mask_visibility(window):
    # Zero queries give every visible key score 0; the sink is 0 too, so each visible key gets
    # 1 / (visible + 1). One-hot values make output column j the weight given to key j.
    q_start, n, k_start, keys = 10, 5, 3, 12  # queries at 10..14, keys at 3..14
    q = torch.zeros(n, 2, keys)
    v = torch.eye(keys)[:, None, :].expand(keys, 1, keys).contiguous()
    out = attention(q, torch.randn(keys, 1, keys), v, torch.zeros(2), q_start=q_start, k_start=k_start,
                    sm_scale=0.125, window=window)
    for i in range(n):
        t = q_start + i
        first = k_start if window is None else max(k_start, t - window + 1)
        visible = list(range(first, t + 1))  # t - W + 1 .. t, and never a future key
        expected = torch.zeros(keys)
        expected[[j - k_start for j in visible]] = 1 / (len(visible) + 1)
        for h in range(2):
            torch.testing.assert_close(out[i, h], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_float8_cache_real_shapes(window):
    """bf16 queries over a float8 cache (kv_cache_dtype=fp8): decodes beside prompt chunks, split and
    not, against the fp32 reference over the same float8 pages (widened exactly)."""
    seqs = [(1535, 1)] * 40 + [(9000, 1), (0, 1)] + [(0, 300), (2000, 129), (130, 64)]
    b = to_float8(paged_batch(seqs, kv_heads=8, group=8, head_dim=64, page_size=16, window=window,
                              dtype=torch.bfloat16, device="cuda"))
    want = fp32_reference(b)
    assert_bf16_close(triton_poisoned(b, decodes=42), want)
    assert_bf16_close(triton_poisoned(b, num_splits=4), want)
