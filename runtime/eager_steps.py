"""The eager steps' kernels, compiled at start-up beside the graphs' (runtime/kernels/compile_ahead.py).

Steps with prompt chunks run eagerly (or, up to mixed_graph_tokens, as graph pieces with eager
attentions between them), and their kernels differ from a decode step's: the MoE's GEMM tiles follow
the rows an expert gets, the attention's tiles and split count the longest chunk and the context.
On a machine whose Triton cache is empty each such kernel compiled the first time a step met it,
seconds at a time inside the run (about 10 s of the first 1k/1k timed run on an H100 in session 24).
At start-up the engine now runs a dry pass over synthetic steps that span those choices (a prompt of
each power-of-two length up to max_batch_tokens, short chunks beside decodes over a long context, a
full step of decodes and a prompt), and what they would compile compiles at once on threads. Nothing
of them runs on the device: their page tables point at page 0 and their tokens are zeros.
"""

from __future__ import annotations

import concurrent.futures
import time

import torch

from runtime import warm_up
from runtime.kernels import compile_ahead
from runtime.kv_cache import pages_for
from runtime.model import GptOss
from runtime.step import PagedLayers, PagedStep

SHORT_CONTEXT = 4096  # the context of the short chunks' steps: long enough that attention splits keys
BESIDE_DECODES = 8  # decode rows beside a short chunk (the attention's two launches of a mixed step)


def step_shapes(max_batch_tokens: int, max_model_len: int) -> list[tuple[int, int, int]]:
    """(decodes, chunk length, chunk start) of each synthetic step: one prompt chunk of every power of
    two from 16 to max_batch_tokens and of max_batch_tokens itself (the MoE's tiles by rows an expert,
    the attention's prefill tiles, split or not); chunks of 1 to 8 tokens at the end of a long context
    beside decodes (the attention's narrow tiles and the decodes' own launch); and a step of as many
    decodes as a quarter of max_batch_tokens beside a prompt filling the rest."""
    lengths = sorted({1 << n for n in range(4, max_batch_tokens.bit_length()) if 1 << n <= max_batch_tokens}
                     | {max_batch_tokens})
    shapes = [(0, n, 0) for n in lengths if n <= max_model_len]
    start = max(0, min(SHORT_CONTEXT, max_model_len - 8))
    shapes += [(BESIDE_DECODES, q, start) for q in (1, 2, 4, 8)]
    decodes = max_batch_tokens // 4
    if 0 < max_batch_tokens - decodes <= max_model_len:
        shapes.append((decodes, max_batch_tokens - decodes, 0))
    return shapes


def dry_step(model: GptOss, decodes: int, length: int, start: int):
    """A body that runs the forward of one synthetic step (`decodes` single tokens, then one chunk of
    `length` tokens, every sequence at position `start`) over page 0 of the model's pools: for a dry
    pass, where nothing it launches runs. Its device tensors are made here, outside the capture."""
    device = model.device
    lengths = [1] * decodes + [length]
    n = decodes + length
    cu_q = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.full((decodes,), start), torch.arange(start, start + length)]).to(device)
    pages = pages_for(start + length)

    def layers(pool) -> PagedLayers:
        return PagedLayers(pool, torch.zeros(n, dtype=torch.int64, device=device),
                           torch.zeros((len(lengths), pages), dtype=torch.int32, device=device))

    sliding = layers(model.sliding_pool) if model.sliding_pool is not None else None
    q_start = torch.full((len(lengths),), start, dtype=torch.int32, device=device)
    paged = PagedStep(layers(model.pool), sliding, cu_q, q_start, max_q_len=length, max_k_len=start + length,
                      decodes=decodes if length > 1 else n)
    tokens = torch.zeros(n, dtype=torch.int64, device=device)
    last = (cu_q[1:] - 1).to(torch.int64)  # each sequence's last token: the rows sampled
    return lambda: model.forward_paged(tokens, positions, paged, last)


def compile_kernels(model: GptOss, max_batch_tokens: int, max_model_len: int) -> warm_up.Report:
    """Compile, on threads, the kernels of every synthetic step (step_shapes) this process has not
    compiled yet; the Report's `ahead` says how many and how long (its wall time includes them; None
    where this Triton cannot compile ahead)."""
    began = time.perf_counter()
    bodies = [dry_step(model, *shape) for shape in step_shapes(max_batch_tokens, max_model_len)]
    with concurrent.futures.ThreadPoolExecutor(warm_up.compile_threads()) as pool:
        ahead = compile_ahead.compile_ahead(bodies, model.device, pool)
    return warm_up.Report(time.perf_counter() - began, {}, ahead)
