"""The greedy sampling kernel (runtime/kernels/greedy_triton.py) against runtime.sampling.greedy.

Runs under Triton's interpreter on CPU and compiled on a GPU (the same tests). Logits are fresh
random numbers each run (the seed is printed), with planted ties. Tokens must be the reference's
exactly (the first maximal id); logprobs within 2e-5 (fp32 sums over up to 201,088 logits in
another order). Outputs are poisoned first, so every element must be written.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime.kernels.greedy import greedy  # noqa: E402
from runtime.kernels.greedy_triton import SLICE, greedy_into  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_kernel(logits):
    tokens = torch.full((logits.shape[0],), -7, dtype=torch.int64, device=DEVICE)
    pairs = torch.full((logits.shape[0], 2), float("nan"), dtype=torch.float64, device=DEVICE)
    greedy_into(logits, tokens, pairs)
    return tokens, pairs


@pytest.mark.parametrize("rows, vocab", [(1, 201_088), (3, 2 * SLICE + 5), (5, 1000), (2, SLICE)])
def test_greedy_kernel_matches_the_reference(gen, rows, vocab):
    logits = torch.randn(rows, vocab, generator=gen, device=DEVICE) * 4
    tokens, pairs = run_kernel(logits)
    want_tokens, want_logprobs = greedy(logits)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(pairs[:, 0], want_tokens.double())
    assert torch.allclose(pairs[:, 1], want_logprobs.double(), rtol=0, atol=2e-5), \
        (pairs[:, 1], want_logprobs)


def test_greedy_kernel_takes_the_first_maximal_id(gen):
    """Ties across slices, inside one slice, and at the row's last logit: torch.argmax's first id."""
    vocab = 3 * SLICE + 17
    logits = torch.randn(4, vocab, generator=gen, device=DEVICE)
    top = logits.max().item() + 1.0
    cols = torch.randperm(vocab, generator=gen, device=DEVICE).cpu()
    logits[0, [SLICE + 3, 2 * SLICE + 9]] = top  # two slices
    logits[1, [int(cols[0]), int(cols[1]), int(cols[2])]] = top  # anywhere, possibly one slice
    logits[2, [5, 6]] = top  # the same slice, neighbours
    logits[3, [vocab - 1]] = top  # the ragged last slice
    tokens, pairs = run_kernel(logits)
    want_tokens, want_logprobs = greedy(logits)
    assert tokens.tolist() == want_tokens.tolist() == [SLICE + 3, int(cols[:3].min()), 5, vocab - 1]
    assert torch.allclose(pairs[:, 1], want_logprobs.double(), rtol=0, atol=2e-5)


def test_greedy_kernel_with_whole_slices_at_minus_infinity(gen):
    """Masked logits (-inf) over whole slices and scattered: they add nothing to the logsumexp."""
    vocab = 4 * SLICE + 100
    logits = torch.randn(3, vocab, generator=gen, device=DEVICE)
    logits[0, :3 * SLICE] = float("-inf")
    logits[1, SLICE:] = float("-inf")
    logits[2, ::3] = float("-inf")
    tokens, pairs = run_kernel(logits)
    want_tokens, want_logprobs = greedy(logits)
    assert torch.equal(tokens, want_tokens)
    assert (torch.isfinite(pairs).all()
            and torch.allclose(pairs[:, 1], want_logprobs.double(), rtol=0, atol=2e-5))


def test_greedy_kernel_with_no_rows_writes_nothing():
    logits = torch.randn(0, 300, device=DEVICE)
    tokens, pairs = run_kernel(logits)
    assert tokens.numel() == 0 and pairs.numel() == 0
