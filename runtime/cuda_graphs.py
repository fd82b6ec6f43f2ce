"""CUDA graphs for decode steps: the whole forward replayed with one launch.

A decode step (one new token for each of b running sequences) launches about ten kernels per layer;
from Python each launch costs more than the kernel itself at small batches, so batch-1 decode would
be bound by the interpreter, not by reading the weights. `DecodeGraphs` captures the model's
`forward_paged` once per padded batch size (all of them when the engine starts, `capture_all`) over
static input buffers, and each later step only stages its inputs and replays.

What the graph sees is fixed at capture: tensor addresses, shapes and every launch parameter. So
- a step of b sequences runs in the graph of the next captured size; the padding rows decode
  token 0 at position 0 into the KV pools' scratch page, which no sequence owns;
- the block tables have one column per page of `max_model_len` positions, and attention splits the
  key range as for `max_model_len` (its kernel cuts each sequence's actual range into that many
  slices, so the split count only sets the parallelism, and empty slices cost one early exit);
- the KV pools must be fixed (not growable), and `supported` checks that too. Tensor parallelism's
  NCCL all-reduces and all-gathers are captured into the graph like any kernel (every rank of the
  replica replays the same sizes in the same order); expert parallelism is not captured, as it
  sizes its all-to-all on the host.
Each graph also samples greedily (runtime/kernels/greedy_triton.py): it writes every row's argmax
into the engine's buffer of sampled tokens and the (token, logprob) pairs into `greedy_samples`, so
a step whose rows are all greedy launches nothing after the replay but the copy to the host (a
step with other rows samples them as before and overwrites the buffer).
Staging copies a sequence's page list into the pinned host block table only where it grew since
the last step in the same row, so long contexts cost no more host work per step than short ones,
and, past a small batch, only the table columns the step's positions reach go to the GPU (the whole
tables were 64 MB a step at 1,024 rows, 1.2 ms of each 1k/1k decode step's ~30 on an H100:
docs/performance.md, session 24).
"""

from __future__ import annotations

import torch

from runtime import ops, warm_up
from runtime.kernels import compile_ahead
from runtime.kv_cache import PAGE_SIZE, pages_for
from runtime.model import GptOss
from runtime.step import PagedLayers, PagedStep, SequenceChunk


def capture_sizes(max_batch_size: int) -> list[int]:
    """Padded batch sizes with a graph: 1, 2, 4, 8, 16, then every 16 to 64, every 32 to 256, every
    64 beyond (so padding is under half a replay's rows), and max_batch_size itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size = size * 2 if size < 16 else size + (16 if size < 64 else 32 if size < 256 else 64)
    return sizes + [max_batch_size]


# Up to this many table entries (a 32-row step at 131,072 positions: 1 MB) a step copies its rows whole,
# in one copy: packing would add host work and a spreading launch to small, latency-bound steps.
WHOLE_ROWS_ENTRIES = 1 << 18


def buffer_bytes(max_batch_size: int, max_model_len: int, vocab_size: int, pools: int) -> int:
    """Device memory `DecodeGraphs` allocates outside its graphs' pool (the logits every size leaves,
    the greedy samples, the staged inputs, and per KV pool the block table at max_model_len's width
    and its staging copy): for the KV cache's sizing (engine._kv_pages), before the graphs exist."""
    rows, width = capture_sizes(max_batch_size)[-1], pages_for(max_model_len)
    logits, greedy, ints = rows * vocab_size * 4, rows * 2 * 8, rows * 6 * 8
    row_ids = (rows + 1) * 4 + rows * 8  # cu_q (int32) and every row's index
    return logits + greedy + ints + row_ids + pools * 2 * rows * width * 4


def supported(model: GptOss, replay: bool = True) -> str | None:
    """Why decode steps of this model cannot run as CUDA graphs, or None when they can."""
    if not ops.use_kernels(model.inv_freq) or (replay and model.device.type != "cuda"):
        return "graphs need the Triton kernels on a CUDA device"
    if model.pool is None or model.pool.growable or (model.sliding_pool is not None
                                                     and model.sliding_pool.growable):
        return "graphs need fixed KV pools (kv_cache_tokens or gpu_memory_fraction)"
    return None


def _collectives(model: GptOss) -> bool:
    """Whether the forward holds collectives (tensor or expert parallelism inside the replica)."""
    return model.parallel.replica.size > 1


def warm_up_threads(model: GptOss, threads: int | None = None) -> int | None:
    """Threads for the warm-ups before the captures (runtime/warm_up.py): one where the forward holds
    collectives, since every rank must launch those in the same order and threads side by side keep
    none; else `threads` (None: the default)."""
    return 1 if _collectives(model) else threads


def compile_ahead_allowed(model: GptOss) -> bool:
    """Whether start-up compiles ahead in a dry pass (runtime/kernels/compile_ahead.py): where it can
    (compile_ahead.enabled), and not where the forward holds collectives, whose communicators the dry
    pass's capture would use first."""
    return compile_ahead.enabled() and not _collectives(model)


_capture_stream: torch.cuda.Stream | None = None


def capture(body, pool) -> torch.cuda.CUDAGraph:
    """`body()` captured as a CUDA graph whose temporaries live in memory pool `pool` (None: a new
    pool; `graph.pool()` names it for the next capture). Unlike the `torch.cuda.graph` context, this
    does not empty the allocator's caches before every capture: the mixed steps' graphs are hundreds
    of captures (a model's layers + 1 per token bucket), and each emptying makes the next warm-up
    allocate its memory again from the driver."""
    global _capture_stream
    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
        # cuBLAS ready on it first: a size warmed on another thread is captured without a run before
        # on this one (DecodeGraphs._capture), so the first capture may be this thread's first GEMM
        with torch.cuda.stream(_capture_stream), torch.inference_mode():
            compile_ahead.prepare_cublas(_capture_stream.device)
    graph = torch.cuda.CUDAGraph()
    _capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(_capture_stream):
        graph.capture_begin(pool=pool)
        try:
            body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(_capture_stream)
    return graph


def run_before_capture(body) -> None:
    """`body()` once on a side stream, after the current stream's work and before its next: the run
    before a first capture (kernels compile, caches fill; it writes what the replay will write again)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)


class DecodeGraphs:
    """replay=False runs the same static-buffer forward without capturing it: how the CPU tests check
    the staging, the padding and the fixed-width tables through Triton's interpreter."""

    def __init__(self, model: GptOss, max_batch_size: int, max_model_len: int, sampled: torch.Tensor,
                 replay: bool = True):
        reason = supported(model, replay)
        if reason is not None:
            raise ValueError(f"CUDA graphs are not possible here: {reason}")
        self.model, self.max_model_len, self.replay = model, max_model_len, replay
        # The engine's buffer of the step before's sampled tokens: rows whose token the host does not
        # know yet (it was sampled by the step still in flight) read it from here, on the GPU.
        self._sampled = sampled
        pinned = model.device.type == "cuda"  # asynchronous host-to-device copies
        self.sizes = capture_sizes(max_batch_size)
        rows, dev = self.sizes[-1], model.device
        self.pools = {False: model.pool}
        if model.sliding_pool is not None:
            self.pools[True] = model.sliding_pool
        width = pages_for(max_model_len)
        # Per row: token id, position, full-layer slot, sliding-layer slot, the row of `sampled`
        # holding the token when the host does not have it (else -1), and 1 for a real row (0 for
        # padding): one host-to-device copy.
        self._host_ints = torch.zeros((rows, 6), dtype=torch.int64, pin_memory=pinned)
        self._ints = torch.zeros((rows, 6), dtype=torch.int64, device=dev)
        self._host_tables = {kind: torch.full((rows, width), pool.scratch, dtype=torch.int32,
                                              pin_memory=pinned)
                             for kind, pool in self.pools.items()}
        self._host_tables_np = {kind: t.numpy()
                                for kind, t in self._host_tables.items()}  # same memory, for row writes
        # a copy on the CPU too (tests), so that what staging leaves out is missed there as on a GPU
        self._tables = {kind: t.to(dev, copy=True) for kind, t in self._host_tables.items()}
        # A step copies only the table columns its positions reach (a 1k/1k step at 1,024 rows: 1 MB
        # of two 32 MB tables), packed on the host, then spread into the graph's table on the GPU.
        self._host_packed = {kind: torch.empty(rows * width, dtype=torch.int32, pin_memory=pinned)
                             for kind in self.pools}
        self._packed = {kind: torch.empty(rows * width, dtype=torch.int32, device=dev) for kind in self.pools}
        self._staged = {kind: [None] * rows for kind in self.pools}  # (cache serial, entries) per table row
        self._cu_q = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        self._all_rows = torch.arange(rows, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays: dict[int, int] = {}  # steps run per padded size, for reports and tests
        # Every size's graph leaves its logits here, so no graph keeps an output of its own alive and
        # all their temporaries can share one memory pool (replays never overlap).
        self._logits = torch.empty((rows, model.cfg.vocab_size), dtype=torch.float32, device=dev)
        self._greedy = torch.empty((rows, 2), dtype=torch.float64, device=dev)  # (token, logprob) per row
        self._memory = None  # the graphs' shared memory pool
        self._inputs_read = None  # event: the last replay's host-to-device copies are done
        self.warm_up: warm_up.Report | None = None  # capture_all's warm-ups, timed

    def fits(self, chunks: list[SequenceChunk]) -> bool:
        return len(chunks) <= self.sizes[-1] and all(c.length == 1 for c in chunks)

    def run(self, chunks: list[SequenceChunk], token_ids: list[int], sources: dict[int, int],
            rows: int | None = None) -> torch.Tensor:
        """Logits [b, vocab] (fp32) of one decode token per chunk (pages already reserved); the
        token of row r is sampled[sources[r]] where r is in `sources`, else token_ids[r]. rows: pad
        to the graph that holds this many (at least the chunks; attention_dp's ranks agree on it)."""
        size = next(s for s in self.sizes if s >= max(len(chunks), rows or 0))
        self._stage(chunks, token_ids, sources, size)
        if not self.replay:
            self._forward(size)
        else:
            if size not in self._graphs:
                self._capture(size)
            self._graphs[size].replay()
        self.replays[size] = self.replays.get(size, 0) + 1
        return self._logits[:len(chunks)]

    def capture_all(self) -> None:
        """Capture every size now, largest first (the shared memory pool is sized by the first), with
        every row staged as padding: what the engine does at start-up, as vLLM does, so that no
        capture falls inside a timed run. The sizes run once side by side first (warm_all), so
        that their kernels compile at the same time."""
        self.warm_all()
        for size in reversed(self.sizes):
            if size not in self._graphs:
                self._stage([], [], {}, size)
                self._capture(size, warmed=True)

    def warm_all(self, threads: int | None = None) -> None:
        """Every size's forward once, side by side on threads (runtime/warm_up.py), every row padding:
        their kernels compile at the same time, before the captures. They sample into the engine's
        buffer of sampled tokens, which is put back."""
        self._stage([], [], {}, self.sizes[-1])
        step_before = self._sampled.clone()
        self.warm_up = warm_up.run_side_by_side({size: lambda size=size: self._forward(size)
                                                 for size in self.sizes if size not in self._graphs},
                                                self.model.device, warm_up_threads(self.model, threads),
                                                compile_ahead_allowed(self.model))
        self._sampled.copy_(step_before)

    def greedy_samples(self, rows: int) -> torch.Tensor:
        """[rows, 2] float64 (token, logprob) of the last step's first rows, sampled greedily; their
        tokens are also in the engine's sampled buffer."""
        return self._greedy[:rows]

    # ------------------------------------------------------------------------------- inputs
    def _stage(self, chunks: list[SequenceChunk], token_ids: list[int], sources: dict[int, int],
               size: int) -> None:
        if self._inputs_read is not None:
            self._inputs_read.synchronize()  # the host buffers are about to be overwritten
        ints = self._host_ints.numpy()
        columns = 1  # table columns any row's attention reads: pages up to the last position's
        for row, (chunk, token) in enumerate(zip(chunks, token_ids)):
            position = chunk.start
            columns = max(columns, position // PAGE_SIZE + 1)
            ints[row, 0], ints[row, 1], ints[row, 4], ints[row, 5] = token, position, sources.get(row, -1), 1
            for kind in self.pools:
                pages = chunk.cache.table(kind)
                ints[row, 2 + kind] = pages[position // PAGE_SIZE] * PAGE_SIZE + position % PAGE_SIZE
                self._stage_table(kind, row, chunk.cache.serial, pages)
        for row in range(len(chunks), size):  # padding: position 0 of the scratch page
            ints[row, :2], ints[row, 4], ints[row, 5] = 0, -1, 0
            for kind, pool in self.pools.items():
                ints[row, 2 + kind] = pool.scratch * PAGE_SIZE
                self._host_tables_np[kind][row, 0] = pool.scratch
                self._staged[kind][row] = None
        self._ints[:size].copy_(self._host_ints[:size], non_blocking=True)
        for kind in self.pools:
            self._copy_table(kind, size, columns)
        if self.model.device.type == "cuda":
            self._inputs_read = torch.cuda.Event()
            self._inputs_read.record()

    def _copy_table(self, kind: bool, size: int, columns: int) -> None:
        """The first `columns` entries of the host table's first `size` rows into the graph's table:
        small tables whole (WHOLE_ROWS_ENTRIES); else packed contiguous on the host (a strided pinned
        source would make torch copy through pageable memory, synchronously), one asynchronous copy,
        then spread on the GPU. Columns past them keep entries of earlier steps, beyond every position
        of this step: no query reads them."""
        if size * self._tables[kind].shape[1] <= WHOLE_ROWS_ENTRIES:
            self._tables[kind][:size].copy_(self._host_tables[kind][:size], non_blocking=True)
            return
        packed = self._host_packed[kind][:size * columns].view(size, columns)
        packed.numpy()[:] = self._host_tables_np[kind][:size, :columns]
        on_device = self._packed[kind][:size * columns].view(size, columns)
        on_device.copy_(packed, non_blocking=True)
        self._tables[kind][:size, :columns].copy_(on_device)

    def _stage_table(self, kind: bool, row: int, serial: int, pages: list[int]) -> None:
        """Row `row` of the host block table holds `pages`: copy only entries new since the last
        step, when the same sequence (same serial) held the row. Stale entries left behind (a
        sliding page since released) are outside every query's window and never read."""
        staged = self._staged[kind][row]
        done = staged[1] if staged is not None and staged[0] == serial else 0
        if len(pages) > done:
            self._host_tables_np[kind][row, done:len(pages)] = pages[done:]
        self._staged[kind][row] = (serial, len(pages))

    # ------------------------------------------------------------------------------ capture
    def _forward(self, size: int) -> None:
        ints = self._ints[:size]
        source = ints[:, 4]
        tokens = torch.where(source >= 0, self._sampled[source.clamp(min=0)], ints[:, 0])
        positions = ints[:, 1]
        layers = {kind: PagedLayers(pool, ints[:, 2 + kind], self._tables[kind][:size])
                  for kind, pool in self.pools.items()}
        paged = PagedStep(layers[False], layers.get(True), self._cu_q[:size + 1], positions.to(torch.int32),
                          max_q_len=1, max_k_len=self.max_model_len, fixed_shapes=True, real_rows=ints[:, 5])
        # The head's bf16 logits widen to fp32 in this copy: one pass, where .float() and a copy took two
        self._logits[:size].copy_(self.model.forward_paged(tokens, positions, paged, self._all_rows[:size],
                                                           widen=False))
        ops.greedy_into(self._logits[:size], self._sampled[:size], self._greedy[:size])

    def _capture(self, size: int, warmed: bool = False) -> None:
        """Capture the step, after running it once outside the graph (run_before_capture) unless
        warm_all just did (`warmed`). That run also samples into the buffer of sampled tokens, which
        the replay still has to read the step before's tokens from: it is put back."""
        if not warmed:
            step_before = self._sampled.clone()
            run_before_capture(lambda: self._forward(size))
            self._sampled.copy_(step_before)
        graph = capture(lambda: self._forward(size), self._memory)
        self._memory = graph.pool()
        self._graphs[size] = graph
