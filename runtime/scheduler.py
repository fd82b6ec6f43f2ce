"""The scheduler: which requests run, which KV pages they hold, and what each step computes.

It knows the KV page pool (runtime/kv_cache.py) and nothing of the model, in the style of vLLM
v1's and nano-vllm's schedulers: `schedule()` admits waiting requests and returns a data-only plan
of the next step (runtime/step_plan.StepPlan, plus the sequences whose next token it samples), and
`land()` takes the tokens a step sampled and returns the sequences that finished. The engine
(runtime/engine.py) runs the plans on the model and turns finished sequences into results.

Admission is first come, first served while the batch has room (max_batch_size) and, in a fixed
pool, while the waiting request's tokens fit the free pages beside a reserve for the running
sequences' growth (below); a request that could never fit the whole pool fails alone. Each step
takes the uncomputed tokens of every running sequence, decodes first (fewest uncomputed tokens
first), prompts in chunks within the token budget (max_batch_tokens), and reserves their pages
before the step runs. When the pool runs out, the
most recently admitted sequence goes back to the front of the queue (its KV recomputed when it
returns, as one prefill of prompt and generated tokens).

The growth reserve is SGLang's new-token ratio: admission keeps pages for a share (`growth_ratio`)
of the tokens each running sequence, and the newcomer, may still generate (up to max_tokens, at most
GROWTH_CLIP counted). The share starts at GROWTH_RATIO_START, falls by GROWTH_RATIO_DECAY a step to
GROWTH_RATIO_FLOOR (requests often stop early), and returns to 1 at each preemption. Without it a
small pool thrashes: a preempted sequence is readmitted as soon as its pages are free, recomputed,
and preempted again at the next page boundary (120b on an H100: 22 preemptions per request).
`conservativeness` scales the reserve (SGLang's schedule_conservativeness; 0, the default, admits by
prompt pages alone: with prefix caching a preempted sequence's pages mostly stay cached, and the
reserve's smaller batch cost more than its recomputes saved, docs/performance.md).

With prefix caching (runtime/prefix_cache.py), a sequence about to compute from a page boundary first
takes the longest run of cached pages that continues it, and its complete pages are registered for
others after each step is planned (they are read only by later steps, which the GPU runs after this
one). Sequences sharing a prefix in one step compute it once: one whose next page another chunk of
the step is computing waits a step and then finds it cached.

One step is always in flight (the engine's async scheduling): a step's sampled tokens are PENDING
in their sequences until `land()`, and the next step, planned before they land, decodes a PENDING
token by reading it from the GPU buffer row the step in flight samples it into (`sample_row`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import TYPE_CHECKING, Callable

from runtime import prefix_cache
from runtime.kv_cache import OutOfPages, PagePool, SequenceKV, sliding_pages_bound, sliding_pages_per_sequence
from runtime.requests import Request
from runtime.sampling import SeededNoise
from runtime.step import SequenceChunk
from runtime.step_plan import StepPlan

if TYPE_CHECKING:
    from runtime.structured import Constraint

PENDING = -1  # in a sequence's tokens: sampled by the step in flight, not on the host yet

# The growth reserve (see above), SGLang's defaults: 0.7 falling to 0.1 over 600 steps.
GROWTH_RATIO_START, GROWTH_RATIO_FLOOR, GROWTH_RATIO_DECAY = 0.7, 0.1, 0.001
GROWTH_CLIP = 4096  # tokens: the most of a request's max_tokens its reserve counts


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request admitted to run: its tokens, its KV pages and its sampler state."""
    index: int  # the request's place in the generate call: its key in step plans
    request: Request
    cache: SequenceKV
    generator: SeededNoise | None  # its sampler's random state, kept across preemption
    constraint: Constraint | None  # what it may generate next (runtime/structured.py), kept likewise
    tokens: list[int]  # prompt + generated so far
    computed: int = 0  # tokens whose K/V are in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # per generated token, the most likely (token, logprob) pairs, when its request asks for them
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    pending: int = 0  # tokens sampled by the step in flight (PENDING in `tokens` until it lands)
    sample_row: int = -1  # the row of the engine's sampled-token buffer holding the newest pending token
    finish_reason: str | None = None  # "stop" | "length" once finished
    digests: list[bytes] = dataclasses.field(default_factory=list)  # its complete pages' (prefix_cache.py)
    cached_tokens: int = 0  # prompt tokens it found in the prefix cache (before any preemption)
    preempted: bool = False

    @property
    def done(self) -> bool:
        """Finished: a row of it in the step in flight is dropped."""
        return self.finish_reason is not None


@dataclasses.dataclass
class StepStats:
    """Counts over the steps planned so far, for reports (the benchmark's mean running batch)."""
    steps: int = 0
    decode_tokens: int = 0  # single-token chunks: a running sequence's next token
    prompt_tokens: int = 0  # tokens of longer chunks: prompts, and preempted sequences recomputed
    cached_tokens: int = 0  # tokens taken from the prefix cache instead of computed
    running: int = 0  # running sequences, summed over steps

    @property
    def mean_running(self) -> float:
        return self.running / self.steps if self.steps else 0.0


@dataclasses.dataclass
class Rejected:
    """A request that can never run (it needs more KV pages than the whole pool has)."""
    index: int
    request: Request
    error: str


@dataclasses.dataclass
class ScheduledStep:
    """The next step: its plan, the rows it samples, and the requests admission turned away."""
    plan: StepPlan
    samples: list[tuple[Sequence, int]]  # per sampled row: its sequence and the index of its PENDING token
    rejected: list[Rejected] = dataclasses.field(default_factory=list)


class Scheduler:
    """Admission, KV page reservation, preemption, step planning and stop detection over a pool.

    new_cache: an empty KV cache for a sequence (pages from `pool`). new_generator: a request's
    sampler state, made at its first admission and kept across preemption; new_constraint: likewise
    its grammar's state (None: unconstrained). prefix_caching: reuse cached pages of earlier
    sequences' prefixes (vLLM's enable_prefix_caching). conservativeness: scales the growth reserve
    admission keeps in a fixed pool (0: none). sliding_pool, window: the sliding layers' pool, which
    admission also keeps within where it is smaller than the batch could use (kv_cache.sliding_pool_pages).
    """

    def __init__(self, pool: PagePool, new_cache: Callable[[], SequenceKV], *, max_batch_size: int,
                 max_batch_tokens: int, max_model_len: int,
                 new_generator: Callable[[Request], SeededNoise | None] = lambda request: None,
                 new_constraint: Callable[[Request], Constraint | None] = lambda request: None,
                 prefix_caching: bool = False, conservativeness: float,
                 sliding_pool: PagePool | None = None, window: int | None = None):
        self.pool, self.new_cache, self.new_generator = pool, new_cache, new_generator
        # Sliding pages admission may promise running sequences (None: the pool holds the batch's
        # bound, so it cannot run out): all but a step's chunks' share.
        self._sliding_room = None
        if (sliding_pool is not None and not sliding_pool.growable
                and sliding_pool.num_pages < sliding_pages_bound(window, max_batch_size, max_batch_tokens,
                                                                 sliding_pool.page_size)):
            self._sliding_room = sliding_pool.num_pages - sliding_pool.pages_for(max_batch_tokens)
            self._sliding_per_sequence = sliding_pages_per_sequence(window, sliding_pool.page_size)
        self.conservativeness = conservativeness
        self.growth_ratio = GROWTH_RATIO_START
        self.new_constraint = new_constraint
        self.prefix_caching = prefix_caching
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_model_len = max_model_len
        # Not admitted yet (index, Request), or preempted (index, Sequence), in the order they run.
        self.waiting: collections.deque[tuple[int, Request | Sequence]] = collections.deque()
        self.running: dict[int, Sequence] = {}  # in admission order
        self.preemptions = 0  # sequences sent back to wait (their KV recomputed later), for reports
        # positions of computed KV those preemptions threw away: most preempted sequences were admitted
        # in the same step and computed nothing, so this, not the count, is what they cost
        self.preempted_tokens = 0
        self.stats = StepStats()

    def add(self, index: int, request: Request) -> None:
        """Queue a request; `index` is its key (unique among the requests queued at once)."""
        self.waiting.append((index, request))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Admit what fits, then plan the next step (its plan has no chunks when nothing can run)."""
        rejected = self._admit()
        plan, samples = self._plan()
        return ScheduledStep(plan, samples, rejected)

    def land(self, samples: list[tuple[Sequence, int]], pairs: list[tuple[float, float]],
             top: dict[int, list[tuple[int, float]]] | None = None) -> list[Sequence]:
        """Hand a step's sampled (token, logprob) pairs, one per sampled row, to their sequences (and
        `top`, row -> most likely pairs, for the rows that asked), advancing their grammars; returns
        the ones that finished (their pages given back, finish_reason set), in row order."""
        finished = []
        for row, ((seq, slot), (token, logprob)) in enumerate(zip(samples, pairs)):
            if seq.done:  # it ended at the step before: this row was computed in vain
                continue
            token = int(token)
            seq.tokens[slot] = token
            seq.generated.append(token)
            seq.logprobs.append(logprob)
            if top is not None and row in top:
                seq.top_logprobs.append(top[row])
            if seq.constraint is not None:
                seq.constraint.consume(token)
            seq.pending -= 1
            reason = self._finish_reason(seq)
            if reason is None:
                continue
            seq.finish_reason = reason
            if self.running.get(seq.index) is seq:
                del self.running[seq.index]
            else:  # preempted while its token was on the way
                self.waiting.remove((seq.index, seq))
            self._release(seq)
            self._end_constraint(seq)
            finished.append(seq)
        return finished

    def drop_unfinished(self) -> None:
        """Forget every request not finished (a generate call that stopped early or failed); their
        pages go back to the pool."""
        for seq in self.running.values():
            seq.cache.release()
            self._end_constraint(seq)
        for _, item in self.waiting:
            if isinstance(item, Sequence):
                item.cache.release()
                self._end_constraint(item)
        self.running.clear()
        self.waiting.clear()

    def _release(self, seq: Sequence) -> None:
        """A finished or preempted sequence lets go of its pages, its complete ones registered first
        (they stay cached until the memory is needed)."""
        if self.prefix_caching:
            self._register(seq)
        seq.cache.release()

    @staticmethod
    def _end_constraint(seq: Sequence) -> None:
        """A sequence that will not generate again lets go of its grammar state (its memory)."""
        if seq.constraint is not None:
            seq.constraint.release()
            seq.constraint = None

    def _register(self, seq: Sequence) -> None:
        """Register the sequence's complete computed pages not registered yet (digests extended
        over the tokens known so far: a page with a PENDING token waits for a later call)."""
        ps = self.pool.page_size
        if seq.computed // ps > seq.cache.registered:
            prefix_cache.chain_digests(seq.tokens, ps, seq.digests)
            prefix_cache.register(seq.cache, seq.digests, seq.computed)

    # --------------------------------------------------------------------------- admission
    def longest(self, request: Request) -> int:
        """The most positions a request can ever hold in the cache."""
        return min(len(request.prompt_token_ids) + request.params.max_tokens, self.max_model_len)

    def _admit(self) -> list[Rejected]:
        """Move waiting requests to running while the batch and the KV pool have room (in a fixed
        pool, room beside the growth reserve)."""
        rejected = []
        growth = 0  # tokens the running sequences may still generate, as the reserve counts them
        if not self.pool.growable and self.waiting:
            growth = sum(self._growth(seq.request, len(seq.generated) + seq.pending, len(seq.tokens))
                         for seq in self.running.values())
        sliding = 0  # sliding pages the running sequences may hold
        if self._sliding_room is not None and self.waiting:
            sliding = sum(self._sliding_need(seq.request) for seq in self.running.values())
        while self.waiting and len(self.running) < self.max_batch_size:
            index, item = self.waiting[0]
            seq = item if isinstance(item, Sequence) else None
            req = seq.request if seq else item
            if not self.pool.growable:
                if self.pool.pages_for(self.longest(req)) > self.pool.num_pages:
                    self.waiting.popleft()
                    capacity = self.pool.num_pages * self.pool.page_size
                    rejected.append(Rejected(index, req, f"needs up to {self.longest(req)} positions of KV "
                                                         f"cache; it holds {capacity} (kv_cache_tokens)"))
                    continue
                tokens = seq.tokens if seq else req.prompt_token_ids
                own = self._growth(req, len(seq.generated) if seq else 0, len(tokens))
                reserve = 0
                if self.running:  # the first always runs when its tokens fit
                    reserve = math.ceil(self.conservativeness * self.growth_ratio * (growth + own)
                                        / self.pool.page_size)
                need = self.pool.pages_for(len(tokens)) - self._cached_pages(tokens)
                if need + reserve > self.pool.free_pages:
                    break  # wait for running sequences to finish
                growth += own
            if self._sliding_room is not None:
                if self.running and sliding + self._sliding_need(req) > self._sliding_room:
                    break
                sliding += self._sliding_need(req)
            self.waiting.popleft()
            self.running[index] = seq if seq else self._new_sequence(index, req)
        return rejected

    def _sliding_need(self, req: Request) -> int:
        """Sliding pages a request's sequence may hold between steps: its window's, or fewer if it
        never grows that long."""
        return min(self.pool.pages_for(self.longest(req)), self._sliding_per_sequence)

    def _growth(self, req: Request, generated: int, length: int) -> int:
        """Tokens a sequence of `length` tokens, `generated` of them its own, may still generate, as
        the growth reserve counts them (at most GROWTH_CLIP)."""
        return max(0, min(req.params.max_tokens - generated, self.max_model_len - length, GROWTH_CLIP))

    def _new_sequence(self, index: int, req: Request) -> Sequence:
        return Sequence(index, req, self.new_cache(), self.new_generator(req), self.new_constraint(req),
                        list(req.prompt_token_ids))

    def _cached_pages(self, tokens: list[int]) -> int:
        """Pages a waiting sequence would share with running ones instead of allocating (the cached
        run of full pages from its start that someone holds: the unheld ones count as free already),
        for admission's estimate."""
        if not self.prefix_caching:
            return 0
        digests = []
        prefix_cache.chain_digests(tokens[:max(0, len(tokens) - 1)], self.pool.page_size, digests)
        cached = 0
        for digest in digests:
            page = self.pool.lookup(digest)
            if page is None:
                break
            cached += self.pool.holders(page) > 0
        return cached

    # --------------------------------------------------------------------------- planning
    def _plan(self) -> tuple[StepPlan, list[tuple[Sequence, int]]]:
        """One step: the uncomputed tokens of each sequence, decodes first, within the token budget.

        Each chunk's pages are reserved here, before the step runs. When the pool is out, the most
        recently admitted sequence not yet in this step is preempted (or, if every other one is,
        this one waits instead). A sequence whose chunk reaches its end samples its next token:
        PENDING in its tokens until the step lands."""
        running = self.running
        budget = self.max_batch_tokens
        ids, positions, chunks, logits_rows, wants, pending, keys = [], [], [], [], [], {}, []
        order = sorted(running, key=lambda i: len(running[i].tokens) - running[i].computed)
        planned: set[int] = set()
        computing: set[bytes] = set()  # digests of the pages this step's chunks write
        for index in order:
            if index not in running:  # preempted for an earlier sequence of this step
                continue
            seq = running[index]
            if self.prefix_caching and self._take_cached(seq, computing):
                continue  # another chunk of this step computes its next page: it waits for it
            take = min(len(seq.tokens) - seq.computed, budget)
            if take == 0 or self._ends_with_pending(seq):
                continue
            if not self._reserve(index, seq.computed + take, planned):
                continue
            planned.add(index)
            budget -= take
            start = seq.computed
            ids.extend(seq.tokens[start:start + take])
            if ids[-1] == PENDING:  # only a decode token can be one: what the step in flight samples
                pending[len(ids) - 1] = seq.sample_row
            positions.extend(range(start, start + take))
            chunks.append(SequenceChunk(start, take, seq.cache))
            ps = self.pool.page_size
            computing.update(seq.digests[start // ps:(start + take) // ps])  # the pages it completes
            keys.append(index)
            seq.computed += take
            if seq.computed == len(seq.tokens):  # the chunk reaches the end: sample the next token
                logits_rows.append(len(ids) - 1)
                wants.append(seq)
        self._count(chunks)
        if self.prefix_caching:  # read by later steps only: the GPU runs them after this one
            for index in planned:
                if index in running:
                    self._register(running[index])
        return StepPlan(ids, positions, chunks, logits_rows, pending, keys), self._mark_pending(wants)

    def _take_cached(self, seq: Sequence, computing: set[bytes]) -> bool:
        """Before planning a sequence's chunk: if it stands at a page boundary with nothing of its own
        ahead, extend it with the longest cached run of pages (leaving at least its last token to
        compute, whose logits it samples). True when its next page is one that another chunk of this
        step writes: it waits for it rather than compute it twice."""
        ps = self.pool.page_size
        have = seq.computed // ps
        limit = (len(seq.tokens) - 1) // ps  # pages that end before its last token
        if seq.computed % ps or len(seq.cache.pages) != have or have >= limit:
            return False  # mid-page, pages of its own ahead, or at its last page (a decode's case)
        prefix_cache.chain_digests(seq.tokens, ps, seq.digests)
        gained = prefix_cache.attach(seq.cache, seq.digests, limit)
        if gained:
            seq.computed += gained * ps
            self.stats.cached_tokens += gained * ps
            if not seq.preempted:
                seq.cached_tokens += gained * ps
        have += gained
        return have < min(limit, len(seq.digests)) and seq.digests[have] in computing

    def _count(self, chunks: list[SequenceChunk]) -> None:
        if not chunks:
            return
        decodes = sum(c.length == 1 for c in chunks)
        self.growth_ratio = max(GROWTH_RATIO_FLOOR, self.growth_ratio - GROWTH_RATIO_DECAY)
        stats = self.stats
        stats.steps += 1
        stats.decode_tokens += decodes
        stats.prompt_tokens += sum(c.length for c in chunks) - decodes
        stats.running += len(self.running)

    @staticmethod
    def _mark_pending(wants: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Each sampling sequence's next token, PENDING until the step lands; row r of the step's
        samples goes to row r of the sampled-token buffer."""
        samples = []
        for row, seq in enumerate(wants):
            seq.tokens.append(PENDING)
            seq.pending += 1
            seq.sample_row = row
            samples.append((seq, len(seq.tokens) - 1))
        return samples

    def _reserve(self, index: int, end: int, planned: set[int]) -> bool:
        """Pages for positions computed..end-1 of running[index], preempting others if needed; False
        when the sequence itself had to go back to waiting."""
        seq = self.running[index]
        while True:
            try:
                seq.cache.reserve(seq.computed, end)
                return True
            except OutOfPages:
                victims = [i for i in self.running if i != index and i not in planned]
                self._preempt(victims[-1] if victims else index)
                if not victims:
                    return False

    def _preempt(self, index: int) -> None:
        """Send a running sequence back to the front of the queue; its KV is recomputed when it
        returns (prompt and generated tokens as one prefill), its sampler state kept."""
        seq = self.running.pop(index)
        self._release(seq)
        self.preempted_tokens += seq.computed
        seq.computed, seq.preempted = 0, True
        self.waiting.appendleft((index, seq))
        self.preemptions += 1
        self.growth_ratio = 1.0  # the pool was too small for the batch: keep room for all its growth

    # --------------------------------------------------------------------------- stopping
    def _ends_with_pending(self, seq: Sequence) -> bool:
        """Whether the step in flight gives the sequence its last token (max_tokens or the context
        limit reached), so it needs no further step."""
        return seq.pending > 0 and (len(seq.generated) + seq.pending >= seq.request.params.max_tokens
                                    or len(seq.tokens) >= self.max_model_len)

    def _finish_reason(self, seq: Sequence) -> str | None:
        strings = seq.request.stop_strings
        if seq.generated[-1] in seq.request.stop_token_ids or (strings and strings.hit(seq.generated)):
            return "stop"
        context = len(seq.tokens) - seq.pending  # pending tokens: of a later step, not this one
        if len(seq.generated) >= seq.request.params.max_tokens or context >= self.max_model_len:
            return "length"
        return None
