"""Greedy sampling in two small launches: each row's argmax token and its logprob.

The reference is `runtime.sampling.greedy` (torch's argmax, a gather and a logsumexp: about ten
launches a step at batch 1, 201k logits a row). Here a first launch reduces slices of each row to
(max, first index of the max, sum of exp(logit - max)), and a second combines a row's slices:
the token is the first maximal id (torch.argmax's tie rule), and its logprob is
logit - logsumexp = max - (max + log sum) = -log(sum over slices of sum_i * exp(max_i - max)).

Both launches are captured in the decode CUDA graphs (runtime/cuda_graphs.py), which write the tokens
straight into the buffer the next step's decode rows read and the (token, logprob) pairs the host
copies, so an all-greedy decode step launches nothing to sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SLICE = 4096  # logits a program of the first launch reduces (201,088 a row: 50 programs)


@triton.jit
def _slice_kernel(logits_ptr, stride, vocab, max_ptr, index_ptr, sum_ptr, SLICE: tl.constexpr):
    """Slice program_id(1) of row program_id(0): its max, the first index holding it, sum exp(x - max)."""
    row, piece = tl.program_id(0), tl.program_id(1)
    cols = piece * SLICE + tl.arange(0, SLICE)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab, other=float("-inf"))
    top = tl.max(x, 0)
    first = tl.min(tl.where(x == top, cols, vocab), 0)  # the first maximal id, as torch.argmax
    shift = tl.where(top == float("-inf"), 0.0, top)  # a slice all -inf: exp(-inf) = 0, no -inf - -inf
    total = tl.sum(tl.exp(x - shift), 0)
    out = row * tl.num_programs(1) + piece
    tl.store(max_ptr + out, top)
    tl.store(index_ptr + out, first)
    tl.store(sum_ptr + out, total)


@triton.jit
def _combine_kernel(max_ptr, index_ptr, sum_ptr, slices, tokens_ptr, pairs_ptr, SLICES_POW2: tl.constexpr):
    """Row program_id(0): the token from the first slice holding the row's max, and its logprob;
    the token into tokens (int64) and (token, logprob) into pairs (float64, [rows, 2])."""
    row = tl.program_id(0)
    s = tl.arange(0, SLICES_POW2)
    ok = s < slices
    tops = tl.load(max_ptr + row * slices + s, mask=ok, other=float("-inf"))
    top = tl.max(tops, 0)
    first_slice = tl.min(tl.where(ok & (tops == top), s, SLICES_POW2), 0)
    token = tl.load(index_ptr + row * slices + first_slice).to(tl.int64)
    sums = tl.load(sum_ptr + row * slices + s, mask=ok, other=0.0)
    logprob = -tl.log(tl.sum(sums * tl.exp(tops - top), 0))
    tl.store(tokens_ptr + row, token)
    tl.store(pairs_ptr + 2 * row, token.to(tl.float64))
    tl.store(pairs_ptr + 2 * row + 1, logprob.to(tl.float64))


def greedy_into(logits: torch.Tensor, tokens: torch.Tensor, pairs: torch.Tensor) -> None:
    """For fp32 logits [rows, vocab] (no NaN; -inf allowed where a row has a finite logit):
    tokens[r] = argmax of row r (int64, [rows]) and pairs[r] = (that token, its logprob) (float64,
    [rows, 2], contiguous), in two launches."""
    rows, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, (logits.dtype, logits.stride())
    assert tokens.shape == (rows,) and tokens.dtype == torch.int64 and tokens.is_contiguous(), tokens.shape
    assert pairs.shape == (rows, 2) and pairs.dtype == torch.float64 and pairs.is_contiguous(), pairs.shape
    if rows == 0:
        return
    slices = triton.cdiv(vocab, SLICE)
    tops = torch.empty((rows, slices), dtype=torch.float32, device=logits.device)
    firsts = torch.empty((rows, slices), dtype=torch.int32, device=logits.device)
    sums = torch.empty((rows, slices), dtype=torch.float32, device=logits.device)
    _slice_kernel[(rows, slices)](logits, logits.stride(0), vocab, tops, firsts, sums, SLICE=SLICE,
                                  num_warps=4)
    _combine_kernel[(rows,)](tops, firsts, sums, slices, tokens, pairs,
                             SLICES_POW2=triton.next_power_of_2(slices), num_warps=1)
