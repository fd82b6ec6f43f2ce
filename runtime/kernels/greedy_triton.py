"""Greedy sampling in two small launches: each row's argmax token and its logprob.

The reference is `runtime.sampling.greedy` (torch's argmax, a gather and a logsumexp: about ten
launches a step at batch 1, 201k logits a row). Here a first launch reduces slices of each row to
(max, first index of the max, sum of exp(logit - max)), and a second combines a row's slices:
the token is the first maximal id (torch.argmax's tie rule), and its logprob is
logit - logsumexp = max - (max + log sum) = -log(sum over slices of sum_i * exp(max_i - max)).

Both launches are captured in the decode CUDA graphs (runtime/cuda_graphs.py), which write the tokens
straight into the buffer the next step's decode rows read and the (token, logprob) pairs the host
copies, so an all-greedy decode step launches nothing to sample.

`masked_greedy_into` runs the same two launches over some rows only, each with a token bitmask
(structured outputs, runtime/structured.py): the token is the first maximal id among the allowed
ones, its logprob still the model's own (the logsumexp over every logit). A step whose constrained
rows are greedy thus re-samples just those rows after the graph, in one pass over their logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SLICE = 4096  # logits a program of the first launch reduces (201,088 a row: 50 programs)


@triton.jit
def _slice_kernel(logits_ptr, stride, vocab, rows_ptr, bitmask_ptr, words, max_ptr, pick_ptr, index_ptr,
                  sum_ptr, SLICE: tl.constexpr, MASKED: tl.constexpr):
    """Slice program_id(1) of row program_id(0) (rows[program_id(0)] when MASKED): its max and
    sum exp(x - max) over every logit; the max over the allowed ones (all, unless MASKED) and the
    first index holding it."""
    r, piece = tl.program_id(0), tl.program_id(1)
    row = tl.load(rows_ptr + r) if MASKED else r
    cols = piece * SLICE + tl.arange(0, SLICE)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab, other=float("-inf"))
    top = tl.max(x, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)  # a slice all -inf: exp(-inf) = 0, no -inf - -inf
    total = tl.sum(tl.exp(x - shift), 0)
    if MASKED:  # bit t % 32 of word t // 32; ids past the mask's words are not allowed
        word = tl.load(bitmask_ptr + r.to(tl.int64) * words + cols // 32, mask=cols < words * 32, other=0)
        x = tl.where(((word >> (cols % 32)) & 1) != 0, x, float("-inf"))
    pick = tl.max(x, 0)
    first = tl.min(tl.where(x == pick, cols, vocab), 0)  # the first maximal id, as torch.argmax
    out = r * tl.num_programs(1) + piece
    tl.store(max_ptr + out, top)
    tl.store(pick_ptr + out, pick)
    tl.store(index_ptr + out, first)
    tl.store(sum_ptr + out, total)


@triton.jit
def _combine_kernel(max_ptr, pick_ptr, index_ptr, sum_ptr, slices, rows_ptr, vocab, tokens_ptr, pairs_ptr,
                    SLICES_POW2: tl.constexpr, MASKED: tl.constexpr):
    """Row program_id(0): the token from the first slice holding the row's largest allowed logit, and
    its logprob (that logit - the logsumexp of every logit); the token into tokens (int64) and
    (token, logprob) into pairs (float64, [rows, 2]), at the row's own index."""
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r) if MASKED else r
    s = tl.arange(0, SLICES_POW2)
    ok = s < slices
    tops = tl.load(max_ptr + r * slices + s, mask=ok, other=float("-inf"))
    picks = tl.load(pick_ptr + r * slices + s, mask=ok, other=float("-inf"))
    top, pick = tl.max(tops, 0), tl.max(picks, 0)
    first_slice = tl.min(tl.where(ok & (picks == pick), s, SLICES_POW2), 0)
    # a row allowing nothing (never given: a grammar always allows its end) gets a valid id anyway
    token = tl.minimum(tl.load(index_ptr + r * slices + first_slice), vocab - 1).to(tl.int64)
    sums = tl.load(sum_ptr + r * slices + s, mask=ok, other=0.0)
    logprob = (pick - top) - tl.log(tl.sum(sums * tl.exp(tops - top), 0))
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
    _launch(logits, rows, None, None, tokens, pairs)


def masked_greedy_into(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor,
                       tokens: torch.Tensor, pairs: torch.Tensor) -> None:
    """For each i, row rows[i] of fp32 logits [M, vocab]: its first maximal id among those whose bit
    is set in bitmask[i] (int32 [len(rows), words]) into tokens[rows[i]], and (that token, its logprob
    under all the logits) into pairs[rows[i]]; the other rows are left as they are."""
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, (logits.dtype, logits.stride())
    assert rows.dtype == torch.int64 and bitmask.dtype == torch.int32 and bitmask.is_contiguous()
    assert bitmask.shape[0] == rows.shape[0], (bitmask.shape, rows.shape)
    assert tokens.dtype == torch.int64 and pairs.dtype == torch.float64 and pairs.is_contiguous()
    _launch(logits, rows.shape[0], rows, bitmask, tokens, pairs)


def _launch(logits, rows: int, row_ids, bitmask, tokens, pairs) -> None:
    if rows == 0:
        return
    vocab = logits.shape[1]
    masked = bitmask is not None
    slices = triton.cdiv(vocab, SLICE)
    tops, picks, sums = (torch.empty((rows, slices), dtype=torch.float32, device=logits.device)
                         for _ in range(3))
    firsts = torch.empty((rows, slices), dtype=torch.int32, device=logits.device)
    row_ids = row_ids if masked else tokens  # unread when not masked (any pointer will do)
    words = bitmask.shape[1] if masked else 0
    _slice_kernel[(rows, slices)](logits, logits.stride(0), vocab, row_ids, bitmask if masked else tops,
                                  words, tops, picks, firsts, sums, SLICE=SLICE, MASKED=masked, num_warps=4)
    _combine_kernel[(rows,)](tops, picks, firsts, sums, slices, row_ids, vocab, tokens, pairs,
                             SLICES_POW2=triton.next_power_of_2(slices), MASKED=masked, num_warps=1)
