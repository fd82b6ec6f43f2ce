"""Prefix caching (runtime/prefix_cache.py, the pools' reference counts in runtime/kv_cache.py).

Three levels: the page pool's bookkeeping under random operations; the scheduler with a fake model
that writes into real pools what each position's KV would be (a function of the tokens up to it),
and checks before every chunk that what the chunk reads is what its own tokens imply, so a page
shared wrongly or reused with stale content is caught where it is read; and the tiny model, whose
outputs with caching on must equal those with it off.
"""

import dataclasses
import random
import zlib

import pytest
import torch

from runtime.config import preset
from runtime.engine import LLM
from runtime.kv_cache import RELEASED, OutOfPages, PagePool, first_visible_page
from runtime.prefix_cache import chain_digests
from runtime.requests import Request
from runtime.sampling import SamplingParams
from runtime.scheduler import PENDING, Scheduler
from test_scheduler import make_scheduler

PAGE = 16


# --------------------------------------------------------------------------- the pool's bookkeeping
@pytest.mark.parametrize("seed", list(range(6)) + [random.randrange(2**32) for _ in range(2)])
def test_pool_reference_counts_under_random_operations(seed):
    """Random allocate / share / register / release against a model of who holds what: no count goes
    negative, no held page is handed out, a page handed out is findable under no digest (no stale
    content), and free_pages counts the free and the unheld cached pages."""
    print(f"random seed {seed}")
    rng = random.Random(seed)
    growable = rng.random() < 0.3
    pool = PagePool([0], 1, 2, torch.float32, "cpu", page_size=PAGE, num_pages=rng.randint(1, 6),
                    growable=growable)
    held: list[int] = []  # one entry per holding
    registered: dict[bytes, int] = {}  # what the model expects lookup to find (if not evicted)
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            try:
                page = pool.allocate()
            except OutOfPages:
                assert not growable and pool.free_pages == 0
                continue
            assert page not in held, "a held page was handed out"
            for digest in [d for d, p in registered.items() if p == page]:
                assert pool.lookup(digest) is None, "an evicted page is still findable"
                del registered[digest]
            held.append(page)
        elif op < 0.5 and registered:
            digest = rng.choice(list(registered))
            page = pool.lookup(digest)
            assert page == registered[digest]
            pool.share(page)
            held.append(page)
        elif op < 0.7 and held:
            page = rng.choice(held)
            digest = rng.randbytes(16)
            was = pool.lookup(digest)
            pool.register(page, digest)
            if was is None and page not in registered.values():
                registered[digest] = page
            assert pool.lookup(digest) == registered.get(digest)
        elif held:
            page = held.pop(rng.randrange(len(held)))
            pool.release([page])
        for page in set(held):
            assert pool.holders(page) == held.count(page) > 0
        unheld_cached = {p for p in registered.values() if p not in held}
        assert pool.free_pages == pool.num_pages - len(set(held))
        assert pool.cached_pages == len(registered) >= len(unheld_cached)
        unheld = [p for p in range(pool.num_pages) if p not in held]
        if unheld:
            with pytest.raises(AssertionError):
                pool.release(unheld[:1])
    pool.release(held)
    assert pool.free_pages == pool.num_pages


def test_a_cached_page_is_reused_until_memory_is_needed_then_least_recently_used_goes_first():
    pool = PagePool([0], 1, 2, torch.float32, "cpu", page_size=PAGE, num_pages=3, growable=False)
    a, b, c = (pool.allocate() for _ in range(3))
    for page, digest in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.register(page, digest)
    pool.release([a, b, c])  # a, b, c unheld, least recently used first: c, b, a (released in reverse)
    pool.share(pool.lookup(b"c"))  # c used again: b is now the oldest
    pool.release([c])
    first = pool.allocate()
    assert first == b and pool.lookup(b"b") is None and pool.lookup(b"a") == a
    assert pool.free_pages == 2 and pool.cached_pages == 2


# --------------------------------------------------------------------------- the scheduler, fake model
def fake_token(request_id, position: int) -> int:
    return (zlib.crc32(str(request_id).encode()) * 1009 + position * 7919) % 5000 + 1


def kv_value(tokens: list[int], position: int) -> float:
    """What any layer's KV at `position` holds for these tokens: a function of tokens[:position + 1]."""
    return float(zlib.crc32(repr(tokens[:position + 1]).encode()) % (1 << 20))


class ContentDriver:
    """The engine's loop with a fake model over real pools: before a chunk runs, every position it
    reads (all earlier ones in the full layer, the window in the sliding one) must hold kv_value of
    its own tokens; then it writes its positions. Tokens sampled: fake_token(request, position)."""

    def __init__(self, scheduler: Scheduler, window: int | None):
        self.s, self.window = scheduler, window
        self.sliding = scheduler.new_cache().sliding_pool
        self.finished, self.rejected, self.in_flight, self.steps = {}, {}, None, 0

    def known(self, seq) -> list[int]:
        """The sequence's tokens with those still PENDING filled in (the fake model knows them)."""
        prompt = len(seq.request.prompt_token_ids)
        return [fake_token(seq.request.id, p) if t == PENDING and p >= prompt else t
                for p, t in enumerate(seq.tokens)]

    def step(self) -> None:
        scheduled = self.s.schedule()
        self.steps += 1
        for r in scheduled.rejected:
            self.rejected[r.index] = r.error
        launched = None
        if scheduled.plan.chunks:
            for key, chunk in zip(scheduled.plan.keys, scheduled.plan.chunks):
                self.run_chunk(self.s.running[key], chunk)
            self.check_holders()
            launched = (scheduled.samples,
                        [(float(fake_token(seq.request.id, slot)), 0.0) for seq, slot in scheduled.samples])
        if self.in_flight is not None:
            for seq in self.s.land(*self.in_flight):
                self.finished[seq.index] = seq
        self.in_flight = launched

    def run_chunk(self, seq, chunk) -> None:
        tokens, kv = self.known(seq), chunk.cache
        reads = {1: range(0, chunk.start)}  # layer 1: full attention; layer 0: sliding
        if self.window is not None:
            reads[0] = range(first_visible_page(chunk.start, self.window, 1), chunk.start)
        for layer, positions in reads.items():
            if positions:
                keys, _ = kv.read(layer, positions.start, positions.stop)
                want = torch.tensor([kv_value(tokens, p) for p in positions])
                assert torch.equal(keys[:, 0, 0], want), f"request {seq.request.id} reads wrong KV"
        values = torch.tensor([kv_value(tokens, p) for p in range(chunk.start, chunk.start + chunk.length)])
        block = values[:, None, None].expand(-1, 1, 2)
        for layer in reads:
            kv.write(layer, chunk.start, block, block)

    def check_holders(self) -> None:
        """Each page's count of holders is the number of running sequences listing it."""
        for pool, sliding in ((self.s.pool, False), (self.sliding, True)):
            if pool is None:
                continue
            count = {}
            for seq in self.s.running.values():
                for page in seq.cache.table(sliding):
                    if page != RELEASED:
                        count[page] = count.get(page, 0) + 1
            for page in range(pool.num_pages):
                assert pool.holders(page) == count.get(page, 0), (sliding, page)

    def run(self) -> "ContentDriver":
        while self.s.has_unfinished() or self.in_flight is not None:
            self.step()
            assert self.steps < 20_000, "no progress"
        return self


def content_scheduler(pages, batch, budget, window, caching=True):
    return make_scheduler(pages, batch, budget, window=window, prefix_caching=caching)


def shared_prefix_requests(rng, n, stem_len=90, vocab=5000):
    """Prompts that share prefixes of random lengths (mid-page too) of one stem, exact duplicates,
    and prompts that are a whole cached prompt (a full-prompt hit: page-aligned lengths included)."""
    stem = [rng.randrange(1, vocab) for _ in range(stem_len)]
    prompts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.2 and prompts:
            prompt = list(rng.choice(prompts))  # an exact duplicate
        elif kind < 0.35:
            prompt = stem[:rng.choice([16, 32, 48, 64, 17, 33, rng.randint(1, stem_len)])]
        else:
            unique = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 30))]
            prompt = stem[:rng.randint(0, stem_len)] + unique
        prompts.append(prompt)
    return [Request(i, p, SamplingParams(max_tokens=rng.randint(1, 24), temperature=0), stop_token_ids=())
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("seed", list(range(10)) + [random.randrange(2**32) for _ in range(4)])
def test_shared_prefixes_read_their_own_kv_and_finish_as_alone(seed):
    print(f"random seed {seed}")
    rng = random.Random(seed)
    pages = rng.choice([None, 12, 16, 24, 64])  # small fixed pools: preemption and eviction
    batch = rng.randint(1, 8)
    budget = rng.randint(max(batch, 16), 96)
    window = rng.choice([None, 8, 16, 40])
    driver = ContentDriver(content_scheduler(pages, batch, budget, window), window)
    reqs = shared_prefix_requests(rng, rng.randint(2, 16))
    for r in reqs:
        driver.s.add(r.id, r)
    driver.run()
    for r in reqs:
        if r.id in driver.rejected:
            continue
        seq = driver.finished[r.id]
        want = [fake_token(r.id, len(r.prompt_token_ids) + k) for k in range(r.params.max_tokens)]
        assert seq.generated == want and seq.finish_reason == "length"
    for pool in (driver.s.pool, driver.sliding):  # nothing held: cached pages are all unheld
        assert pool is None or pool.free_pages == pool.num_pages


def test_requests_sharing_a_prefix_in_one_step_compute_it_once():
    """Eight requests of one 64-token prefix, admitted together: one computes the prefix (the others
    wait for its pages), so prompt work is the prefix once plus each unique part."""
    rng = random.Random(5)
    prefix = [rng.randrange(1, 5000) for _ in range(64)]
    reqs = [Request(i, prefix + [rng.randrange(1, 5000) for _ in range(5)],
                    SamplingParams(max_tokens=3, temperature=0), stop_token_ids=()) for i in range(8)]
    s = content_scheduler(None, 8, 256, 8)
    driver = ContentDriver(s, 8)
    for r in reqs:
        s.add(r.id, r)
    driver.run()
    assert s.stats.cached_tokens == 7 * 64
    assert s.stats.prompt_tokens == 64 + 8 * 5
    assert [driver.finished[i].cached_tokens for i in range(8)].count(64) == 7


def test_a_page_is_shared_only_once_all_its_positions_are_written():
    """A's 100-token prompt is cut at 24 tokens by the budget, mid-page. B, arriving then with A's
    first 40 tokens, plans first (fewer tokens to compute) and may take page 0, not the half-written
    page 1."""
    rng = random.Random(7)
    stem = [rng.randrange(1, 5000) for _ in range(100)]
    s = content_scheduler(None, 2, 24, 8)
    driver = ContentDriver(s, 8)
    s.add(0, Request(0, stem, SamplingParams(max_tokens=2, temperature=0), stop_token_ids=()))
    driver.step()
    s.add(1, Request(1, stem[:40] + [1], SamplingParams(max_tokens=2, temperature=0), stop_token_ids=()))
    driver.run()
    assert driver.finished[1].cached_tokens == 16


def test_caching_off_computes_every_prompt():
    rng = random.Random(6)
    reqs = shared_prefix_requests(rng, 10)
    s = content_scheduler(None, 4, 64, 16, caching=False)
    driver = ContentDriver(s, 16)
    for r in reqs:
        s.add(r.id, r)
    driver.run()
    assert s.stats.cached_tokens == 0 and s.pool.cached_pages == 0
    assert s.stats.prompt_tokens + s.stats.decode_tokens >= sum(len(r.prompt_token_ids) for r in reqs)


def test_chain_digests_name_a_page_by_every_token_up_to_it():
    a, b = [], []
    chain_digests(list(range(40)), PAGE, a)
    chain_digests([99] + list(range(1, 40)), PAGE, b)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # the first token differs: every page does
    c = []
    chain_digests(list(range(33)) + [PENDING] * 7, PAGE, c)
    assert c == a  # a page with an unknown token is left out; complete ones agree
    d = []
    chain_digests(list(range(20)) + [PENDING] + list(range(21, 40)), PAGE, d)
    assert d == a[:1]


# --------------------------------------------------------------------------- the tiny model: on = off
def llm(on, window=40, **settings):
    """The tiny shape with a 40-token window (three pages: sliding hits span pages), random weights."""
    model = dataclasses.replace(preset("tiny"), sliding_window=window)
    return LLM("dummy", model=model, dtype="float32", device="cpu", enable_prefix_caching=on, **settings)


@pytest.mark.parametrize("seed, settings", [
    (0, dict(max_batch_size=4, max_batch_tokens=64)),
    (1, dict(max_batch_size=4, max_batch_tokens=32, kv_cache_tokens=160,  # preemption and eviction
             schedule_conservativeness=0)),
    (2, dict(max_batch_size=8, max_batch_tokens=128, window=8)),  # the tiny preset's own window
])
def test_outputs_with_caching_equal_outputs_without(seed, settings):
    """Greedy tokens identical and logprobs within the chunked-prefill tolerance (1e-4 in fp32), run
    twice (the second run finds every prompt cached: full-prompt hits)."""
    rng = random.Random(seed)
    reqs = [Request(r.id, r.prompt_token_ids, SamplingParams(max_tokens=6, temperature=0, logprobs=True),
                    stop_token_ids=()) for r in shared_prefix_requests(rng, 12, stem_len=100)]
    sampled = SamplingParams(max_tokens=6, temperature=0.9, seed=3, logprobs=True)  # its seed decides
    reqs.append(Request("sampled", reqs[0].prompt_token_ids, sampled, stop_token_ids=()))
    window = settings.pop("window", 40)
    off, on = llm(False, window, **settings), llm(True, window, **settings)
    want = off.generate(reqs)
    assert sum(w.cached_tokens for w in want) == 0
    cached = []
    for run in range(2):
        got = on.generate(reqs)
        for g, w in zip(got, want):
            assert g.error is None and g.token_ids == w.token_ids, (run, g.id)
            assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4, (run, g.id)
        cached.append(sum(g.cached_tokens for g in got))
    assert 0 < cached[0] and (cached[0] < cached[1] or "kv_cache_tokens" in settings)
    assert on.pool.free_pages == on.pool.num_pages


@pytest.mark.gpu
def test_caching_on_equals_off_on_the_gpu_kernels_and_graphs():
    """The GPU path (Triton attention through shared pages, decode steps from CUDA graphs) at the
    real head shapes, 4 layers, float32: shared prefixes longer than the 128-token window (so the
    sliding pages' hits span pages), a cache small enough to evict; tokens equal, logprobs within
    1e-3 (the graph and eager attentions sum in different orders)."""
    cfg = dataclasses.replace(preset("gpt-oss-20b"), num_hidden_layers=4)
    rng = random.Random(21)
    stem = [rng.randrange(199998) for _ in range(700)]
    reqs = [Request(i, stem[:rng.choice([700, 513, 400, 300, 129])] + [rng.randrange(199998)] * (i % 4),
                    SamplingParams(max_tokens=12, temperature=0, logprobs=True), stop_token_ids=())
            for i in range(10)]
    results = {}
    for on in (False, True):
        llm = LLM("dummy", model=cfg, dtype="float32", max_batch_size=4, max_batch_tokens=512,
                  kv_cache_tokens=3072, enable_prefix_caching=on)
        results[on] = llm.generate(reqs) + llm.generate(reqs[:3])
        assert (sum(r.cached_tokens for r in results[on]) > 0) == on
    for a, b in zip(results[True], results[False]):
        assert a.error is None and a.token_ids == b.token_ids, a.id
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3, a.id
