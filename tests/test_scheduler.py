"""The scheduler (runtime/scheduler.py) without a model, then the engine over a fixed KV pool.

The first part drives Scheduler over real page pools on the CPU (tiny head dims) the way the engine
does, one step always in flight, with fake sampled tokens: each sequence's token at position p is a
fixed function of (request, p), so its output is known in advance whatever the batch, the budget or
the preemptions. The second part runs the tiny model (fp32, CPU): admission by free pages,
preemption and recompute, no page leaked or shared, and every request's tokens equal to running it
alone.
"""

import random
from pathlib import Path

import pytest
import torch

from runtime.engine import LLM
from runtime.kv_cache import (RELEASED, PagePool, SequenceKV, full_pages_within, sliding_pages_bound,
                              sliding_pool_pages)
from runtime.requests import Request
from runtime.sampling import SamplingParams
from runtime.scheduler import PENDING, Scheduler

PAGE = 16
WINDOW = 8


# --------------------------------------------------------------------------- the Scheduler alone
def fake_token(request_id: int, position: int) -> int:
    """The token a request's fake model samples for position `position`."""
    return (request_id * 1009 + position * 7919) % 5000 + 1


def make_scheduler(pages: int | None, batch: int, budget: int, max_model_len: int = 10_000,
                   window: int | None = WINDOW, prefix_caching: bool = False,
                   conservativeness: float = 0.0, sliding_pages: int | None = None) -> Scheduler:
    """A scheduler over a full pool of `pages` pages (None: growable) and, with a window, a sliding
    pool of `sliding_pages`, or as the engine sizes it. Admission by prompt pages alone
    (conservativeness 0) unless asked: most tests here are of preemption, which the growth reserve
    makes rare."""
    full = PagePool([1], 1, 2, torch.float32, "cpu", num_pages=pages or 4, growable=pages is None)
    sliding = None
    if window is not None:
        if sliding_pages is None:
            sliding_pages = (sliding_pages_bound(window, batch, budget, PAGE) if pages is None
                             else sliding_pool_pages(pages, window, batch, budget, PAGE))
        sliding = PagePool([0], 1, 2, torch.float32, "cpu", num_pages=sliding_pages, growable=False)
    return Scheduler(full, lambda: SequenceKV(full, sliding, window), max_batch_size=batch,
                     max_batch_tokens=budget, max_model_len=max_model_len, prefix_caching=prefix_caching,
                     conservativeness=conservativeness, sliding_pool=sliding, window=window)


def request(i: int, prompt: int, max_tokens: int, stop: tuple[int, ...] = ()) -> Request:
    tokens = [fake_token(i + 7, p) for p in range(prompt)]
    return Request(i, tokens, SamplingParams(max_tokens=max_tokens, temperature=0), stop_token_ids=stop)


def expected(req: Request, max_model_len: int) -> tuple[list[int], str]:
    """The tokens and finish reason of a request, straight from the fake model."""
    generated, position = [], len(req.prompt_token_ids)
    while True:
        generated.append(fake_token(req.id, position))
        position += 1
        if generated[-1] in req.stop_token_ids:
            return generated, "stop"
        if len(generated) >= req.params.max_tokens or position >= max_model_len:
            return generated, "length"


class Driver:
    """The engine's loop with a fake model: schedule, launch (sample every wanted row), then land
    the step before; each plan is checked against what a model would read."""

    def __init__(self, scheduler: Scheduler):
        self.s = scheduler
        self.plans, self.finished, self.rejected = [], {}, {}
        self.in_flight = None  # (samples, pairs) of the step on the "GPU"

    def add(self, requests) -> None:
        for req in requests:
            self.s.add(req.id, req)

    def step(self) -> None:
        scheduled = self.s.schedule()
        for r in scheduled.rejected:
            self.rejected[r.index] = r.error
        launched = None
        if scheduled.plan.chunks:
            self.check(scheduled)
            self.plans.append(scheduled)
            pairs = [(float(fake_token(seq.request.id, slot)), -slot / 1000)
                     for seq, slot in scheduled.samples]
            launched = (scheduled.samples, pairs)
        if self.in_flight is not None:
            for seq in self.s.land(*self.in_flight):
                assert seq.index not in self.finished
                self.finished[seq.index] = seq
        self.in_flight = launched

    def run(self, max_steps: int = 20_000) -> "Driver":
        while self.s.has_unfinished() or self.in_flight is not None:
            self.step()
            assert len(self.plans) < max_steps, "the scheduler makes no progress"
        return self

    def check(self, scheduled) -> None:
        """What a forward would read is there: ids are the sequences' tokens (or PENDING, with the
        row of the step in flight that samples that very position), pages are reserved and not
        shared, the budget and batch size hold, sequences with the fewest tokens to compute (the
        decodes) come first."""
        plan, s = scheduled.plan, self.s
        assert len(plan.ids) == len(plan.positions) <= s.max_batch_tokens
        assert len(plan.chunks) <= s.max_batch_size and len(plan.keys) == len(plan.chunks)
        previous = self.in_flight[0] if self.in_flight is not None else []
        sampled = {id(seq) for seq, _ in scheduled.samples}
        seen, row, uncomputed = set(), 0, []
        for key, chunk in zip(plan.keys, plan.chunks):
            seq = s.running[key]
            req = seq.request
            assert chunk.cache is seq.cache
            pages = set(chunk.cache.pages)
            assert not pages & seen, "a KV page is shared by two sequences"
            seen |= pages
            assert len(chunk.cache.pages) * PAGE >= chunk.start + chunk.length
            live = [p for p in chunk.cache.sliding_pages if p != RELEASED]
            if chunk.cache.sliding_pool is not None:
                assert len(live) <= -(-chunk.cache.window // PAGE) + 2 + -(-chunk.length // PAGE)
            uncomputed.append(len(seq.tokens) - (id(seq) in sampled) - chunk.start)
            for offset in range(chunk.length):
                position = chunk.start + offset
                assert plan.positions[row] == position
                if plan.ids[row] == PENDING:
                    sampler, slot = previous[plan.pending[row]]
                    assert sampler is seq and slot == position
                elif position < len(req.prompt_token_ids):
                    assert plan.ids[row] == req.prompt_token_ids[position]
                else:
                    assert plan.ids[row] == fake_token(req.id, position)
                row += 1
        assert uncomputed == sorted(uncomputed), "decodes (the fewest tokens to compute) go first"
        assert set(plan.pending) == {r for r, t in enumerate(plan.ids) if t == PENDING}
        assert len(plan.logits_rows) == len(scheduled.samples)

    def assert_done_as_alone(self, requests) -> None:
        for req in requests:
            if req.id in self.rejected:
                continue
            seq = self.finished[req.id]
            tokens, reason = expected(req, self.s.max_model_len)
            assert (seq.generated, seq.finish_reason) == (tokens, reason), req.id
            known = len(req.prompt_token_ids) + len(tokens)
            assert seq.tokens[:known] == req.prompt_token_ids + tokens
            # A row still in flight when it finished (after a stop token) is dropped: PENDING forever.
            assert seq.tokens[known:] == [PENDING] * seq.pending and seq.pending <= 1
            assert seq.logprobs == [-(len(req.prompt_token_ids) + k) / 1000 for k in range(len(tokens))]
        assert not self.s.running and not self.s.waiting

    def assert_no_page_held(self) -> None:
        full = self.s.pool
        assert full.free_pages == full.num_pages
        cache = self.s.new_cache()
        if cache.sliding_pool is not None:
            assert cache.sliding_pool.free_pages == cache.sliding_pool.num_pages


def test_admission_waits_for_free_pages_and_the_batch_size():
    driver = Driver(make_scheduler(pages=4, batch=2, budget=64))
    a, b, c, d, e = request(0, 40, 4), request(1, 30, 4), request(2, 5, 3), request(3, 5, 3), request(4, 5, 3)
    driver.add([a])
    driver.step()  # A's prompt holds 3 of the 4 pages
    assert list(driver.s.running) == [0] and driver.s.pool.free_pages == 1
    driver.add([b])
    driver.step()
    assert list(driver.s.running) == [0] and [i for i, _ in driver.s.waiting] == [1]  # 2 pages > 1 free
    driver.run()
    assert 1 in driver.finished and driver.s.preemptions == 0
    driver.add([c, d, e])
    driver.step()
    assert list(driver.s.running) == [2, 3] and [i for i, _ in driver.s.waiting] == [4]  # batch of 2
    driver.run().assert_done_as_alone([a, b, c, d, e])
    driver.assert_no_page_held()


def test_a_request_that_can_never_fit_fails_alone():
    driver = Driver(make_scheduler(pages=2, batch=4, budget=64))
    short, long = request(0, 3, 4), request(1, 30, 8)
    driver.add([short, long])
    driver.run()
    assert driver.rejected == {1: "needs up to 38 positions of KV cache; it holds 32 (kv_cache_tokens)"}
    driver.assert_done_as_alone([short])
    driver.assert_no_page_held()


def test_a_request_capped_by_the_context_limit_fits():
    """The positions a request can hold stop at max_model_len, whatever its max_tokens."""
    driver = Driver(make_scheduler(pages=2, batch=4, budget=64, max_model_len=32))
    req = request(0, 30, 100)
    driver.add([req])
    driver.run().assert_done_as_alone([req])
    assert not driver.rejected and len(driver.finished[0].generated) == 2


def test_prompts_are_prefilled_in_chunks_within_the_budget_and_decodes_go_first():
    driver = Driver(make_scheduler(pages=None, batch=4, budget=8))
    a, b = request(0, 3, 6), request(1, 30, 3)
    driver.add([a, b])
    driver.run().assert_done_as_alone([a, b])
    b_chunks = [(c.start, c.length) for p in driver.plans
                for k, c in zip(p.plan.keys, p.plan.chunks) if k == 1]
    assert b_chunks[:4] == [(0, 5), (5, 7), (12, 7), (19, 7)]  # beside A's prompt, then A's decodes
    assert b_chunks[4] == (26, 4)
    # The step counts for reports: prompts (3 + 30 tokens) apart from decodes (5 + 2 after the first tokens).
    stats = driver.s.stats
    assert (stats.steps, stats.prompt_tokens, stats.decode_tokens) == (len(driver.plans), 33, 7)
    # Running sequences per step count one whose only token left is in flight (it has no chunk then).
    assert sum(len(p.plan.chunks) for p in driver.plans) <= stats.running <= 2 * stats.steps
    # B samples only once its prompt is in: its first sampled row is in the plan of its last chunk.
    first_sample = next(n for n, p in enumerate(driver.plans) if any(seq.index == 1 for seq, _ in p.samples))
    assert any(k == 1 and c.start + c.length == 30 for k, c in
               zip(driver.plans[first_sample].plan.keys, driver.plans[first_sample].plan.chunks))


def test_the_latest_admitted_is_preempted_and_recomputed_later():
    """Three 10-token prompts on one page each, in a pool of four: they outgrow it together."""
    driver = Driver(make_scheduler(pages=4, batch=3, budget=64))
    reqs = [request(i, 10, 40) for i in range(3)]
    driver.add(reqs)
    while driver.s.preemptions == 0:
        computed = driver.s.running[2].computed if 2 in driver.s.running else 0
        driver.step()
    assert list(driver.s.running) == [0, 1]
    (index, victim), = driver.s.waiting
    assert index == 2 and victim.computed == 0 and victim.cache.pages == []
    assert driver.s.preempted_tokens == computed > 10  # the positions it had computed, thrown away
    generated_before = len(victim.tokens)
    driver.run().assert_done_as_alone(reqs)
    # It came back with its prompt and generated tokens recomputed as one prefill.
    returns = [c for p in driver.plans for k, c in zip(p.plan.keys, p.plan.chunks) if k == 2 and c.start == 0]
    assert [c.length for c in returns][-1] >= generated_before > 10
    driver.assert_no_page_held()


def test_the_growth_reserve_stops_a_preemption_storm():
    """Long prompts with long outputs over a pool that holds a few of them whole. Admitting by prompt
    pages alone fills the pool, and each preempted sequence is readmitted as soon as its pages are
    free, recomputed and preempted again; keeping room for the batch's growth (the default) admits
    fewer at once and preempts rarely. Both give every request its own tokens."""
    preemptions = {}
    for conservativeness in (0.0, 1.0):
        driver = Driver(make_scheduler(pages=40, batch=16, budget=256, conservativeness=conservativeness))
        reqs = [request(i, 100, 100) for i in range(24)]  # 7 pages of prompt, 13 at the end
        driver.add(reqs)
        driver.run().assert_done_as_alone(reqs)
        driver.assert_no_page_held()
        preemptions[conservativeness] = driver.s.preemptions
    # (85 and 7 when written: the reserve counts 70% of the growth at first, so some remain)
    assert preemptions[1.0] <= len(reqs) // 3 and preemptions[0.0] >= 10 * preemptions[1.0], preemptions


def test_the_growth_reserve_falls_with_each_step_and_returns_at_a_preemption():
    s = make_scheduler(pages=4, batch=3, budget=64, conservativeness=1.0)
    assert s.growth_ratio == 0.7
    driver = Driver(s)
    driver.add([request(0, 10, 40)])
    for _ in range(5):
        driver.step()
    assert abs(s.growth_ratio - (0.7 - 5 * 0.001)) < 1e-9
    s.growth_ratio = 0.0  # admits by prompt pages alone until the pool runs out
    driver.add([request(i, 10, 40) for i in (1, 2)])
    while s.preemptions == 0:
        driver.step()
    assert s.growth_ratio >= 1.0 - 0.001  # back to 1 (less the step that preempted)
    driver.run()


def test_a_sequence_short_of_pages_when_all_others_are_planned_waits_itself():
    """A decodes within its page; B's prompt chunks take the rest of the pool. When B's last chunk
    needs a page and A, the only other one, is already in the step, B goes back to wait."""
    driver = Driver(make_scheduler(pages=3, batch=2, budget=17))
    a, b = request(0, 5, 3), request(1, 40, 2)
    driver.add([a, b])
    for _ in range(3):
        driver.step()
    assert driver.s.preemptions == 1 and list(driver.s.running) == [0]
    assert [i for i, _ in driver.s.waiting] == [1] and driver.s.waiting[0][1].computed == 0
    driver.run().assert_done_as_alone([a, b])
    driver.assert_no_page_held()


def test_stop_token_max_tokens_and_context_limit():
    mml = 20
    stopper = request(0, 5, 50)
    stop = fake_token(0, 5 + 3)  # its 4th token
    stopper = Request(0, stopper.prompt_token_ids, stopper.params, stop_token_ids=(stop,))
    reqs = [stopper, request(1, 5, 4), request(2, 15, 50), request(3, 20, 50)]
    driver = Driver(make_scheduler(pages=None, batch=4, budget=64, max_model_len=mml))
    driver.add(reqs)
    driver.run().assert_done_as_alone(reqs)
    got = {i: (len(s.generated), s.finish_reason) for i, s in driver.finished.items()}
    assert got == {0: (4, "stop"), 1: (4, "length"), 2: (5, "length"), 3: (1, "length")}


def test_pending_tokens_with_one_step_in_flight():
    s = make_scheduler(pages=None, batch=2, budget=64)
    req = request(0, 5, 3)
    s.add(0, req)
    first = s.schedule()
    assert [(c.start, c.length) for c in first.plan.chunks] == [(0, 5)] and first.plan.pending == {}
    seq = s.running[0]
    assert first.samples == [(seq, 5)] and seq.tokens[5] == PENDING and seq.pending == 1
    second = s.schedule()  # planned before the first step's token lands: it reads it on the GPU
    assert second.plan.ids == [PENDING] and second.plan.pending == {0: 0} and second.samples == [(seq, 6)]
    assert s.land(first.samples, [(fake_token(0, 5), -0.5)]) == []
    assert seq.generated == [fake_token(0, 5)] and seq.tokens[5] == fake_token(0, 5) and seq.pending == 1
    third = s.schedule()
    assert third.plan.positions == [6] and third.plan.pending == {0: 0}
    assert s.land(second.samples, [(fake_token(0, 6), -0.6)]) == []
    # Generated 2 and 1 in flight: the third is the last, so nothing more is planned.
    assert s.schedule().plan.chunks == []
    done = s.land(third.samples, [(fake_token(0, 7), -0.7)])
    assert done == [seq] and seq.finish_reason == "length" and seq.generated == expected(req, 10_000)[0]
    assert not s.has_unfinished() and s.pool.free_pages == s.pool.num_pages


def test_a_row_in_flight_after_a_stop_token_is_dropped():
    s = make_scheduler(pages=None, batch=2, budget=64)
    s.add(0, request(0, 5, 10, stop=(99,)))
    first = s.schedule()
    second = s.schedule()
    seq = s.running[0]
    assert s.land(first.samples, [(99.0, -0.1)]) == [seq] and seq.finish_reason == "stop"
    assert s.land(second.samples, [(7.0, -0.2)]) == [] and seq.generated == [99]
    assert not s.has_unfinished() and s.pool.free_pages == s.pool.num_pages


def test_drop_unfinished_gives_every_page_back():
    s = make_scheduler(pages=4, batch=3, budget=64)
    for i in range(3):
        s.add(i, request(i, 10, 40))
    driver = Driver(s)
    while s.preemptions == 0:
        driver.step()
    s.drop_unfinished()
    assert not s.has_unfinished() and s.pool.free_pages == s.pool.num_pages


class RecordingConstraint:
    """A grammar state that records what the scheduler does with it."""

    def __init__(self):
        self.consumed, self.releases = [], 0

    def consume(self, token: int) -> None:
        assert self.releases == 0, "a released constraint was advanced"
        self.consumed.append(token)

    def release(self) -> None:
        self.releases += 1


def test_grammar_states_survive_preemption_and_are_given_back_once_at_the_end():
    """A constrained sequence keeps its grammar state when preempted, has it advanced by exactly its
    generated tokens, and gives it back (for reuse by later requests) once, when it finishes or when
    the call drops it."""
    made = {}

    def new_constraint(req):
        made[req.id] = RecordingConstraint()
        return made[req.id]

    s = make_scheduler(pages=4, batch=3, budget=64)
    s.new_constraint = new_constraint
    reqs = [request(i, 10, 40) for i in range(3)]
    driver = Driver(s)
    driver.add(reqs)
    driver.run().assert_done_as_alone(reqs)
    assert s.preemptions > 0 and len(made) == 3
    for req in reqs:
        assert made[req.id].consumed == driver.finished[req.id].generated
        assert made[req.id].releases == 1 and driver.finished[req.id].constraint is None
    dropped = make_scheduler(pages=4, batch=3, budget=64)
    dropped.new_constraint = new_constraint
    driver = Driver(dropped)
    driver.add([request(i, 10, 40) for i in range(3)])
    while dropped.preemptions == 0:
        driver.step()
    dropped.drop_unfinished()
    assert [made[i].releases for i in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("seed", list(range(8)) + [random.randrange(2**32) for _ in range(4)])
def test_random_mixes_finish_as_alone_without_leaking_pages(seed):
    print(f"random seed {seed}")
    rng = random.Random(seed)
    pages = rng.choice([None, 2, 3, 4, 6, 10])  # None: a growable pool
    batch = rng.randint(1, 6)
    budget = rng.randint(batch, 48)
    mml = rng.choice([24, 40, 10_000])
    window = rng.choice([None, WINDOW])
    conservativeness = rng.choice([0.0, 1.0])
    driver = Driver(make_scheduler(pages, batch, budget, max_model_len=mml, window=window,
                                   conservativeness=conservativeness))
    reqs = []
    for i in range(rng.randint(1, 12)):
        prompt = rng.randint(1, min(mml, 40))
        req = request(i, prompt, rng.randint(1, 30))
        if rng.random() < 0.3:  # a token it produces, so it may stop early
            stop = (fake_token(i, prompt + rng.randint(0, 10)),)
            req = Request(i, req.prompt_token_ids, req.params, stop_token_ids=stop)
        reqs.append(req)
    driver.add(reqs)
    driver.run()
    never_fit = {r.id for r in reqs if pages is not None
                 and -(-min(len(r.prompt_token_ids) + r.params.max_tokens, mml) // PAGE) > pages}
    assert set(driver.rejected) == never_fit
    driver.assert_done_as_alone(reqs)
    driver.assert_no_page_held()


def test_the_sliding_pool_is_the_batch_bound_or_what_the_full_pool_can_use():
    # gpt-oss: a window of 128 is 8 pages, a sequence past it holds at most 10 sliding pages against
    # at least 9 full ones; a step of 8,192 tokens adds 512 pages of chunks
    bound = sliding_pages_bound(128, 1024, 8192)
    assert sliding_pool_pages(10**6, 128, 1024, 8192) == bound == 1024 * 10 + 512
    assert sliding_pool_pages(2750, 128, 1024, 8192) == 3056 + 512  # 44,000 positions: ceil(2750 * 10 / 9)
    assert sliding_pool_pages(0, 128, 1024, 8192) == 512
    for full in range(0, 400, 7):  # never more than the bound, and growing with the full pool
        assert sliding_pool_pages(full, 40, 6, 48) <= sliding_pages_bound(40, 6, 48)
        assert sliding_pool_pages(full, 40, 6, 48) <= sliding_pool_pages(full + 1, 40, 6, 48)


@pytest.mark.parametrize("budget", [0.5 * 2**30, 2 * 2**30, 9.3 * 2**30, 60 * 2**30])
def test_the_memory_split_takes_the_most_full_pages_that_fit_beside_their_sliding_ones(budget):
    page = 16 * 36 * 1024  # gpt-oss-120b: 18 layers a kind, 8 KV heads of 64, keys and values in bf16

    def sliding_for(full):
        return sliding_pool_pages(full, 128, 1024, 8192)
    full = full_pages_within(budget, page, page, sliding_for)
    assert full * page + sliding_for(full) * page <= budget
    assert (full + 1) * page + sliding_for(full + 1) * page > budget
    if budget == 9.3 * 2**30:  # about an H100's room beside 120b: more full pages than the bound leaves
        assert full > 1.2 * (budget - sliding_pages_bound(128, 1024, 8192) * page) // page
    assert full_pages_within(511 * page, page, page, sliding_for) == 0  # not even a step's chunks fit


def test_sequences_that_fit_the_full_pool_fit_the_sliding_pool_sized_for_it():
    """Without shared pages, a sliding pool sized for the full pool never runs out first: every
    running sequence's sliding pages, counted after each step, stay within it, and admission never
    waits for it (it only would with pages shared by prefix caching)."""
    rng = random.Random(0)
    for _ in range(30):
        window, pages = rng.choice([20, 40, 70]), rng.randint(3, 30)
        driver = Driver(make_scheduler(pages, rng.randint(2, 12), rng.randint(16, 64), window=window))
        assert driver.s._sliding_room is not None or driver.s.new_cache().sliding_pool.num_pages \
            == sliding_pages_bound(window, driver.s.max_batch_size, driver.s.max_batch_tokens, PAGE)
        reqs = [request(i, rng.randint(1, 90), rng.randint(1, 60)) for i in range(rng.randint(1, 10))]
        driver.add(reqs)
        driver.run()
        driver.assert_done_as_alone(reqs)
        driver.assert_no_page_held()


@pytest.mark.parametrize("seed", range(6))
def test_a_sliding_pool_smaller_than_the_batch_needs_admits_fewer_and_finishes_as_alone(seed):
    """A sliding pool below what the running batch could hold (as a short GPU's is beside a small full
    pool, or tighter still): admission keeps the sequences' windows within it, a reservation that
    finds it empty preempts like one that finds the full pool empty, and every request finishes
    with the tokens it makes alone, with no page left held."""
    rng = random.Random(seed)
    window, batch, budget = 40, rng.randint(3, 8), rng.randint(16, 64)
    per_sequence = -(-(window - 1) // PAGE) + 2
    chunk_pages = -(-budget // PAGE)
    sliding = rng.randint(per_sequence + chunk_pages, sliding_pages_bound(window, batch, budget, PAGE) - 1)
    driver = Driver(make_scheduler(rng.choice([None, 40]), batch, budget, window=window,
                                   sliding_pages=sliding))
    assert driver.s._sliding_room is not None
    room, promised = sliding - chunk_pages, []
    step = driver.step

    def checked():  # what admission promised the running sequences' windows fits the room
        step()
        promised.append(sum(driver.s._sliding_need(seq.request) for seq in driver.s.running.values()))
        assert promised[-1] <= room or len(driver.s.running) == 1
    driver.step = checked
    reqs = [request(i, rng.randint(1, 120), rng.randint(1, 40)) for i in range(12)]
    driver.add(reqs)
    driver.run()
    driver.assert_done_as_alone(reqs)
    driver.assert_no_page_held()
    assert max(promised) > room - per_sequence  # admission filled the room to within one window


# --------------------------------------------------------------------------- the engine over a fixed pool
@pytest.fixture(scope="module")
def roomy(tiny_checkpoints):
    return LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=1,
               max_batch_tokens=256)


def tight(tiny_checkpoints, tokens, batch, step_tokens):
    """A fixed pool too small for the batch, admitting by prompt pages alone so that it preempts."""
    return LLM(tiny_checkpoints["original"], dtype="float32", device="cpu", max_batch_size=batch,
               max_batch_tokens=step_tokens, kv_cache_tokens=tokens, schedule_conservativeness=0)


def random_requests(seed, n, max_prompt=40, max_new=12):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    reqs = []
    for i in range(n):
        prompt = torch.randint(0, 199998, (draw(1, max_prompt),), generator=gen).tolist()
        if draw(0, 1):
            params = SamplingParams(max_tokens=draw(1, max_new), temperature=0, logprobs=True)
        else:  # sampled, with its own seed: the same tokens whatever else is in the batch
            params = SamplingParams(max_tokens=draw(1, max_new), temperature=0.8, top_k=draw(0, 50),
                                    top_p=0.95, seed=draw(0, 2**30), logprobs=True)
        reqs.append(Request(i, prompt, params, stop_token_ids=()))
    return reqs


def watch_pages(llm):
    """Check every step: the chunks' sequences hold disjoint pages covering what they write."""
    forward = llm.model.forward
    steps = []

    def checked(step):
        seen = set()
        for c in step.chunks:
            pages = set(c.cache.pages)
            assert not pages & seen, "a KV page is shared by two sequences"
            assert len(c.cache.pages) * llm.pool.page_size >= c.start + c.length
            seen |= pages
        steps.append(len(step.chunks))
        return forward(step)

    llm.model.forward = checked
    return steps


@pytest.mark.parametrize("seed", range(2))
def test_random_mixes_under_preemption_match_each_request_alone(tiny_checkpoints, roomy, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(3, 7, (1,), generator=gen))
    step_tokens = int(torch.randint(batch, 48, (1,), generator=gen))
    llm = tight(tiny_checkpoints, 64, batch, step_tokens)  # 4 pages of 16: too few for the batch
    steps = watch_pages(llm)
    # Short prompts that generate a lot: admitted on one page each, they outgrow the pool together.
    reqs = random_requests(seed, 6, max_prompt=12, max_new=24)
    got = llm.generate(reqs)
    alone = [roomy.generate([r])[0] for r in reqs]
    for g, a in zip(got, alone):
        assert g.error is None and g.token_ids == a.token_ids, (g.id, g.token_ids, a.token_ids)
        assert max(abs(x - y) for x, y in zip(g.logprobs, a.logprobs)) < 1e-4
    assert llm.pool.free_pages == llm.pool.num_pages  # nothing leaked
    sliding = llm.model.sliding_pool
    assert sliding.free_pages == sliding.num_pages and not sliding.growable
    assert llm.preemptions > 0 and max(steps) > 1  # the pool really was too small for the batch


@pytest.mark.parametrize("seed", range(2))
def test_stop_tokens_under_preemption_match_each_request_alone(tiny_checkpoints, roomy, seed):
    """Requests that end on a stop token partway. A step is always in flight, so such a request's
    next row is already computing when its stop token reaches the host (and it may have been
    preempted meanwhile): its result must still end at the stop token, as when run alone, and every
    page must come back."""
    reqs = []
    for r in random_requests(seed + 10, 6, max_prompt=12, max_new=24):
        out = roomy.generate([r])[0].token_ids
        stop = (out[len(out) // 2],) if len(out) > 2 else ()  # a token it produces: it stops there
        reqs.append(Request(r.id, r.prompt_token_ids, r.params, stop_token_ids=stop))
    llm = tight(tiny_checkpoints, 64, 6, 24)
    got = llm.generate(reqs)
    alone = [roomy.generate([r])[0] for r in reqs]
    assert sum(a.finish_reason == "stop" for a in alone) >= 2
    for g, a in zip(got, alone):
        assert g.error is None and (g.token_ids, g.finish_reason) == (a.token_ids, a.finish_reason), g.id
    assert llm.pool.free_pages == llm.pool.num_pages and llm.preemptions > 0


def test_a_sequence_preempted_while_its_last_token_is_in_flight_finishes(tiny_checkpoints, roomy):
    """Two pages of 16 positions, two 10-token prompts. When A needs its second page (writing
    position 16, step 8), B is preempted while step 7, which samples B's 7th and last token, is
    still in flight: that token lands while B waits, B finishes from the queue, and A then runs on."""
    a = Request("a", list(range(300, 310)), SamplingParams(max_tokens=12, temperature=0), stop_token_ids=())
    b = Request("b", list(range(400, 410)), SamplingParams(max_tokens=7, temperature=0), stop_token_ids=())
    llm = tight(tiny_checkpoints, 32, 2, 64)
    got = llm.generate([a, b])
    for g, r in zip(got, (a, b)):
        want = roomy.generate([r])[0]
        assert g.error is None and (g.token_ids, g.finish_reason) == (want.token_ids, "length"), g.id
    assert llm.preemptions == 1 and llm.pool.free_pages == llm.pool.num_pages == 2


def test_a_request_longer_than_the_cache_fails_alone(tiny_checkpoints, roomy):
    llm = tight(tiny_checkpoints, 32, 4, 64)
    short = Request(0, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), stop_token_ids=())
    long = Request(1, list(range(100, 130)), SamplingParams(max_tokens=8, temperature=0), stop_token_ids=())
    first, second = llm.generate([short, long])
    assert first.error is None and first.token_ids == roomy.generate([short])[0].token_ids
    assert second.error and "38 positions" in second.error and "32" in second.error
    assert llm.pool.free_pages == llm.pool.num_pages


def test_cache_size_is_reported_and_checked(tiny_checkpoints):
    llm = tight(tiny_checkpoints, 100, 2, 16)
    assert llm.kv_cache_tokens == 112 and llm.pool.num_pages == 7 and not llm.pool.growable
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        tight(tiny_checkpoints, 0, 2, 16)


def test_the_scheduler_simulation_finishes_every_request_and_counts_preemptions():
    """scripts/simulate_scheduler.py (the scheduler and pools without a model, for choosing admission
    settings on a CPU; in session 21 it made the very steps and preemptions of a GPU run) on a small
    workload: everything finishes; a roomy pool preempts nothing, a small one does."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / "simulate_scheduler.py"
    spec = importlib.util.spec_from_file_location("simulate_scheduler", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    requests, stops = sim.workload(12, 40, 30, shared=16, stop_share=0.5, seed=1)
    roomy = sim.simulate(10_000, requests, 8, 64, window=20, conservativeness=0.0, prefix_caching=True,
                         stops=stops)
    assert roomy["finished"] == 12 and roomy["preemptions"] == 0 and roomy["cached_tokens"] > 0
    requests, stops = sim.workload(12, 40, 30, shared=16, stop_share=0.5, seed=1)
    small = sim.simulate(160, requests, 8, 64, window=20, conservativeness=0.0, prefix_caching=False,
                         stops=stops)
    assert small["finished"] == 12 and small["preemptions"] > 0
    assert small["generated"] == roomy["generated"]  # the same tokens, preempted or not
