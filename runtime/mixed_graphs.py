"""CUDA graphs for mixed steps (prompt chunks beside decodes): the forward between attentions replayed.

A decode step has one query per sequence, so runtime/cuda_graphs.py captures its whole forward per
padded batch size. A mixed step's attention depends on how its tokens split into sequences (query
runs, tiles, the decodes' own launch), which no fixed shape captures; the rest of the forward (the
embedding, norms, QKV projection with RoPE and the cache store, output projection, router, experts)
depends only on the token count. So, as vLLM's piecewise graphs do, `MixedGraphs` captures per
padded token count (a bucket) the pieces of `GptOss.pieces` between the attentions, one graph
each, and a step replays them with each layer's attention run eagerly in between, from the step's
own page tables, on fixed buffers: the pieces leave q in one, the attention writes its output into
another, which the next piece reads.

Padding rows are token 0 at position 0, stored into the KV pools' scratch page (which no sequence
owns) and never attended to; the experts compute them as they would real rows. Larger steps keep
running eagerly: from a few thousand tokens a mixed step's kernels outlast its ~600 launches from
Python, so the GPU is busy either way (docs/performance.md, "Offline throughput"), and padding to
a bucket would cost real work there. Expert parallelism and attention_dp are not captured here:
their exchanges are sized on the host, or agreed between ranks, per step.
"""

from __future__ import annotations

import torch

from runtime import cuda_graphs, warm_up
from runtime.kv_cache import PAGE_SIZE
from runtime.model import GptOss
from runtime.step import PagedLayers, PagedStep
from runtime.step_plan import StepPlan


def token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts with graphs: 16, 32, 64, 128, then every 128 to 1,024 and every 256 beyond,
    up to max_tokens (itself the last); none when max_tokens is 0."""
    buckets, size = [], 16
    while size < max_tokens:
        buckets.append(size)
        size = size * 2 if size < 128 else size + (128 if size < 1024 else 256)
    return buckets + [max_tokens] if max_tokens > 0 else []


def supported(model: GptOss, replay: bool = True) -> str | None:
    """Why mixed steps of this model cannot replay graphs, or None when they can."""
    reason = cuda_graphs.supported(model, replay)
    if reason is not None:
        return reason
    if model.parallel.layout.attention_dp:  # partitioned experts of shared tokens size nothing per step
        return "attention_dp sizes its exchanges per step"
    return None


class MixedGraphs:
    """replay=False runs the same pieces on the same fixed buffers without capturing them: how the
    CPU tests check the staging and the padding through Triton's interpreter."""

    def __init__(self, model: GptOss, max_tokens: int, sampled: torch.Tensor, replay: bool = True):
        reason = supported(model, replay)
        if reason is not None:
            raise ValueError(f"graphs for mixed steps are not possible here: {reason}")
        self.model, self.replay = model, replay
        self.buckets = token_buckets(max_tokens)
        rows, dev, cfg = self.buckets[-1], model.device, model.cfg
        self._sampled = sampled  # rows whose token the step in flight samples read it here
        self.pools = {False: model.pool}
        if model.sliding_pool is not None:
            self.pools[True] = model.sliding_pool
        pinned = dev.type == "cuda"
        # Per row: token id, position, the row of `sampled` holding its token when the host does not
        # have it (else -1), and 1 for a real row (0 for padding): one host-to-device copy.
        self._host_ints = torch.zeros((rows, 4), dtype=torch.int64, pin_memory=pinned)
        self._ints = torch.zeros((rows, 4), dtype=torch.int64, device=dev)
        self._slots = {kind: torch.empty(rows, dtype=torch.int64, device=dev) for kind in self.pools}
        self._pad_slots(0, rows)
        attn = model.block[0].attn
        # The attentions' inputs and outputs, shared by every bucket and layer (replays never overlap).
        self._q = torch.zeros((rows, attn.heads, cfg.head_dim), dtype=model.dtype, device=dev)
        self._out = torch.zeros_like(self._q)
        self._x = torch.zeros((rows, cfg.hidden_size), dtype=model.dtype, device=dev)
        no_table = torch.zeros((0, 1), dtype=torch.int32, device=dev)  # the pieces read no block table
        self._layers = {kind: PagedLayers(pool, self._slots[kind], no_table)
                        for kind, pool in self.pools.items()}
        self._pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._memory = None  # the graphs' shared memory pool
        self._inputs_read = None  # event: the last step's host-to-device copies are done
        self.replays: dict[int, int] = {}  # steps run per bucket, for reports and tests
        self.warm_up: warm_up.Report | None = None  # capture_all's warm-ups, timed

    def fits(self, plan: StepPlan) -> bool:
        """A mixed step (a prompt chunk among its chunks) of at most the largest bucket's tokens."""
        return len(plan.ids) <= self.buckets[-1] and any(c.length > 1 for c in plan.chunks)

    @torch.inference_mode()
    def run(self, plan: StepPlan, logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] (fp32) of the plan's step (pages already reserved)."""
        tokens = len(plan.ids)
        size = next(b for b in self.buckets if b >= tokens)
        paged = PagedStep.of(plan.chunks, self.model.device)  # the real step, for the attentions
        self._stage(plan, paged, size)
        if self.replay and size not in self._pieces:
            self._capture(size)
        self._run(size, paged, tokens)
        self.replays[size] = self.replays.get(size, 0) + 1
        return self.model.logits(self._x[:tokens], logits_indices)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now, largest first (the shared memory pool is sized by the first),
        after running them once side by side (warm_all), so that their kernels compile at the same
        time."""
        self.warm_all()
        for size in reversed(self.buckets):
            if size not in self._pieces:
                self._stage_padding(size)
                self._capture(size, warmed=True)

    def warm_all(self, threads: int | None = None) -> None:
        """Every bucket's pieces once, side by side on threads (runtime/warm_up.py), every row padding:
        their kernels compile at the same time, before the captures."""
        self._stage_padding(self.buckets[-1])
        self.warm_up = warm_up.run_side_by_side({size: lambda size=size: self._run_pieces(size)
                                                 for size in self.buckets if size not in self._pieces},
                                                self.model.device,
                                                cuda_graphs.warm_up_threads(self.model, threads),
                                                cuda_graphs.compile_ahead_allowed(self.model))

    # ------------------------------------------------------------------------------- inputs
    def _stage(self, plan: StepPlan, paged: PagedStep, size: int) -> None:
        if self._inputs_read is not None:
            self._inputs_read.synchronize()  # the host buffer is about to be overwritten
        tokens = len(plan.ids)
        ints = self._host_ints.numpy()
        ints[:tokens, 0] = plan.ids
        ints[:tokens, 1] = plan.positions
        ints[:tokens, 2] = -1
        for row, source in plan.pending.items():
            ints[row, 2] = source
        ints[:tokens, 3] = 1
        ints[tokens:size] = (0, 0, -1, 0)
        self._ints[:size].copy_(self._host_ints[:size], non_blocking=True)
        if self.model.device.type == "cuda":
            self._inputs_read = torch.cuda.Event()
            self._inputs_read.record()
        for kind in self.pools:
            self._slots[kind][:tokens].copy_(paged.layers(kind).slots)
        self._pad_slots(tokens, size)

    def _stage_padding(self, size: int) -> None:
        self._ints[:size] = torch.tensor((0, 0, -1, 0), dtype=torch.int64)
        self._pad_slots(0, size)

    def _pad_slots(self, start: int, end: int) -> None:
        """Rows start..end-1 store their keys and values into the scratch page."""
        for kind, pool in self.pools.items():
            self._slots[kind][start:end].fill_(pool.scratch * PAGE_SIZE)

    # ------------------------------------------------------------------------------ pieces
    def _pieces_of(self, size: int):
        """GptOss.pieces over the fixed buffers of `size` rows. Each piece copies its q into the fixed
        buffer the attention reads (and the last its output into `_x`): tensors made inside a graph
        live in its memory pool, which the next bucket's capture may reuse."""
        ints = self._ints[:size]
        source = ints[:, 2]
        tokens = torch.where(source >= 0, self._sampled[source.clamp(min=0)], ints[:, 0])
        layers = {kind: PagedLayers(view.pool, view.slots[:size], view.block_table)
                  for kind, view in self._layers.items()}
        step = PagedStep(layers[False], layers.get(True), cu_q=ints[:0, 0].int(), q_start=ints[:0, 0].int(),
                         max_q_len=0, max_k_len=0, real_rows=ints[:, 3])
        pieces = self.model.pieces(tokens, ints[:, 1], step)
        try:
            attention, q = next(pieces)
            while True:
                self._q[:size].copy_(q)
                yield attention
                attention, q = pieces.send(self._out[:size])
        except StopIteration as end:
            self._x[:size].copy_(end.value)

    def _run(self, size: int, paged: PagedStep, tokens: int) -> None:
        """The step: each piece (replayed, or run here without graphs), each attention between them
        over the real rows only."""
        graphs = self._pieces.get(size) if self.replay else None
        pieces = None if graphs is not None else self._pieces_of(size)
        for n in range(len(self.model.block) + 1):
            if graphs is not None:
                graphs[n].replay()
                attention = self.model.block[n].attn if n < len(self.model.block) else None
            else:
                attention = next(pieces, None)
            if attention is not None:
                attention.attend(self._q[:tokens], paged, out=self._out[:tokens])

    def _run_pieces(self, size: int) -> None:
        """Every piece of the bucket, without graphs and without the attentions between them."""
        for _ in self._pieces_of(size):
            pass

    def _capture(self, size: int, warmed: bool = False) -> None:
        """Capture each piece, after running them once outside the graphs
        (cuda_graphs.run_before_capture; every row is padding or writes what the replay writes again)
        unless warm_all just did (`warmed`)."""
        if not warmed:
            cuda_graphs.run_before_capture(lambda: self._run_pieces(size))
        graphs, pieces = [], self._pieces_of(size)
        for _ in range(len(self.model.block) + 1):
            graph = cuda_graphs.capture(lambda: next(pieces, None), self._memory)
            self._memory = graph.pool()
            graphs.append(graph)
        self._pieces[size] = graphs
