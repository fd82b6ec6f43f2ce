"""The step plan from a replica's first rank to its other ranks (runtime/step_plan.py): after any
random run of steps (sequences joining, growing by prompt chunks and decodes, sitting steps out,
finishing, restarting, pools growing), the other side's page tables equal the first rank's, and
decode steps cost a few words per sequence. The transport is checked on two gloo processes."""

import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime.kv_cache import PagePool, SequenceKV
from runtime.step import SequenceChunk
from runtime.step_plan import FIRST_WORDS, PlanDecoder, PlanEncoder, StepPlan

PAGE, WINDOW = 4, 8


def pools(growable: bool, pages: int):
    make = lambda layer: PagePool([layer], 1, 2, torch.float32, "cpu", page_size=PAGE, num_pages=pages,  # noqa: E731
                                  growable=growable)
    return make(0), make(1)


def random_step(rng: random.Random, live: dict, full, sliding, next_key: list) -> StepPlan:
    """Advance a random subset of the live sequences (new ones join, some finish or restart)."""
    for _ in range(rng.randint(0, 2)):
        live[next_key[0]] = [SequenceKV(full, sliding, WINDOW), 0]
        next_key[0] += 1
    for key in [k for k in live if rng.random() < 0.1]:
        kv, _ = live.pop(key)
        kv.release()
    for key in [k for k in live if rng.random() < 0.05]:  # preempted: its KV recomputed from position 0
        live[key][0].release()
        live[key][1] = 0
    ids, positions, chunks, keys, logits_rows, pending = [], [], [], [], [], {}
    for key, entry in live.items():
        if rng.random() < 0.2:  # sits this step out
            continue
        kv, computed = entry
        take = 1 if computed and rng.random() < 0.7 else rng.randint(1, 40)
        kv.reserve(computed, computed + take)
        chunks.append(SequenceChunk(computed, take, kv))
        keys.append(key)
        ids += [rng.randint(-1, 1000) for _ in range(take)]
        positions += range(computed, computed + take)
        logits_rows.append(len(ids) - 1)
        if rng.random() < 0.5:
            pending[len(ids) - 1] = len(logits_rows) - 1
        entry[1] = computed + take
    return StepPlan(ids, positions, chunks, logits_rows, pending, keys)


@pytest.mark.parametrize("seed", range(4))
def test_the_other_ranks_tables_equal_the_first_ranks_after_random_steps(seed):
    rng = random.Random(seed)
    full, sliding = pools(growable=True, pages=4)
    their_full, their_sliding = pools(growable=True, pages=4)
    encoder, decoder = PlanEncoder(), PlanDecoder(their_full, their_sliding, WINDOW)
    live, next_key = {}, [0]
    for _ in range(150):
        plan = random_step(rng, live, full, sliding, next_key)
        samples = rng.randint(0, 5)
        got, got_samples = decoder.decode(encoder.encode(plan, samples, full, sliding))
        assert got_samples == samples
        assert (got.ids, got.positions, got.logits_rows, got.pending, got.keys) == \
               (plan.ids, plan.positions, plan.logits_rows, plan.pending, plan.keys)
        assert (their_full.num_pages, their_sliding.num_pages) == (full.num_pages, sliding.num_pages)
        for mine, theirs in zip(plan.chunks, got.chunks):
            assert (theirs.start, theirs.length) == (mine.start, mine.length)
            assert theirs.cache.serial == mine.cache.serial
            assert theirs.cache.pages == mine.cache.pages
            assert theirs.cache.sliding_pages == mine.cache.sliding_pages
            assert theirs.cache.released_upto == mine.cache.released_upto
            for sliding_layer in (False, True):  # reads and writes go to the same pool rows
                assert torch.equal(theirs.cache.slots(sliding_layer, mine.start, mine.start + mine.length),
                                   mine.cache.slots(sliding_layer, mine.start, mine.start + mine.length))
    assert decoder.decode(encoder.encode_end()) is None


def test_decode_steps_send_only_new_page_entries():
    full, sliding = pools(growable=False, pages=20000)
    encoder = PlanEncoder()
    seqs = [SequenceKV(full, sliding, WINDOW) for _ in range(64)]
    for kv in seqs:
        kv.reserve(0, 1000)  # a long prompt each: 250 pages
    first = StepPlan([1] * 64, [1000] * 64, [SequenceChunk(1000, 1, kv) for kv in seqs], list(range(64)), {},
                     list(range(64)))
    for kv in seqs:
        kv.reserve(1000, 1001)
    assert len(encoder.encode(first, 64, full, sliding)) > 64 * 250  # the first time: whole tables
    for kv in seqs:
        kv.reserve(1001, 1002)
    second = StepPlan([1] * 64, [1001] * 64, [SequenceChunk(1001, 1, kv) for kv in seqs], list(range(64)), {},
                      list(range(64)))
    words = encoder.encode(second, 64, full, sliding)
    assert len(words) <= 8 + 64 * (2 + 9 + 2) < FIRST_WORDS  # one broadcast


def _broadcast_worker(rank: int, port: int, messages: list, results):
    from parallel.groups import Group
    from runtime.step_plan import PlanChannel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    channel = PlanChannel.__new__(PlanChannel)  # the transport alone: no pools needed
    channel.group = Group(dist.group.WORLD, rank, 2, (0, 1))
    got = [channel._broadcast(m if rank == 0 else None) for m in messages]
    results.put((rank, got))
    dist.destroy_process_group()


def test_broadcast_carries_short_and_long_messages_whole():
    rng = random.Random(1)
    messages = [[rng.randint(-2**40, 2**40) for _ in range(n)]
                for n in (1, FIRST_WORDS - 1, FIRST_WORDS, 3 * FIRST_WORDS + 5)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = 20000 + os.getpid() % 20000
    procs = [ctx.Process(target=_broadcast_worker, args=(r, port, messages, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got[0] == messages and got[1] == messages
