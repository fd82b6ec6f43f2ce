"""The step plan, and how a model replica's first rank sends it to the others.

The first rank of a replica runs the scheduler (runtime/scheduler.py): it admits requests, reserves
KV pages and plans each step. Every rank then runs the same forward on its shard of the model,
so the other ranks need only what the forward reads: the step's token ids (PENDING where the step
in flight samples them, read from the GPU buffer of sampled tokens), each chunk's positions and
page tables, the rows whose logits are wanted, and how many sampled tokens the first rank
broadcasts over the device group into everyone's buffer after the step (none where each rank's
decode graph samples the same greedy tokens itself: the engine's _samples_to_send).

A plan travels as one flat int64 message over the replica's host group (gloo), so the other ranks
never wait on their GPU to learn the next step. Page tables are sent incrementally: a sequence
keeps a page list for as long as its serial stays the same, and that list only grows (a sliding
layer's entries before `released_upto` turn RELEASED), so each step sends only the entries that
are new since the step before. A sequence that sat out a step is sent whole when it returns. A
decode step of batch B is then about 12 + 10 B words, which fits the first, fixed-size broadcast;
a longer plan (a long prompt's first chunk carries its page table) follows in a second one.

Message: [kind] then, for a step,
  [ids, chunks, logits rows, pending rows, samples, full pool pages, sliding pool pages (-1: none)]
  ids..., logits rows..., (row, sampled-token row) pairs...,
  per chunk: [key, serial, start, length, full from, full count, sliding from, sliding count,
              released_upto], full pages..., sliding pages...
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel.groups import Group
from runtime.kv_cache import RELEASED, PagePool, PageTables
from runtime.step import SequenceChunk

END, STEP = 0, 1
FIRST_WORDS = 2048  # the first broadcast's size: a decode step of up to ~200 sequences fits whole
_HEADER, _CHUNK = 7, 9


@dataclasses.dataclass
class StepPlan:
    """One step on the host: token ids and positions of the chunks, and the rows whose logits are wanted."""
    ids: list[int]
    positions: list[int]
    chunks: list[SequenceChunk]
    logits_rows: list[int]
    pending: dict[int, int]  # id row -> row of the sampled-token buffer holding that (PENDING) token
    keys: list[int] = dataclasses.field(default_factory=list)  # per chunk: its sequence's key (request index)


class PlanEncoder:
    """The first rank's side: plans to messages, remembering how much of each page list it has sent."""

    def __init__(self):
        self._sent: dict[int, tuple[int, int, int]] = {}  # key -> (serial, full entries, sliding entries)

    def encode(self, plan: StepPlan, samples: int, full: PagePool, sliding: PagePool | None) -> list[int]:
        words = [STEP, len(plan.ids), len(plan.chunks), len(plan.logits_rows), len(plan.pending), samples,
                 full.num_pages, sliding.num_pages if sliding is not None else -1]
        words += plan.ids + plan.logits_rows
        for row, source in plan.pending.items():
            words += [row, source]
        sent = {}
        for key, chunk in zip(plan.keys, plan.chunks):
            kv = chunk.cache
            serial, full_from, sliding_from = self._sent.get(key, (None, 0, 0))
            if serial != kv.serial:  # a new sequence, a restarted one, or one that sat out a step
                full_from = sliding_from = 0
            new_full, new_sliding = kv.pages[full_from:], kv.sliding_pages[sliding_from:]
            words += [key, kv.serial, chunk.start, chunk.length, full_from, len(new_full), sliding_from,
                      len(new_sliding), kv.released_upto]
            words += new_full + new_sliding
            sent[key] = (kv.serial, len(kv.pages), len(kv.sliding_pages))
        self._sent = sent  # only this step's sequences: one that sits out a step is sent whole later
        return words

    def encode_end(self) -> list[int]:
        """The end of a generate call (request indices, the keys, start again at 0 in the next)."""
        self._sent = {}
        return [END]


class PlanDecoder:
    """The other ranks' side: messages to plans whose chunks read the first rank's page tables."""

    def __init__(self, full: PagePool, sliding: PagePool | None, window: int | None):
        self.full, self.sliding, self.window = full, sliding, window
        self._tables: dict[int, PageTables] = {}

    def decode(self, words: list[int]) -> tuple[StepPlan, int] | None:
        """(the plan, sampled tokens broadcast after it), or None at the end of a generate call."""
        if words[0] == END:
            self._tables = {}
            return None
        n_ids, n_chunks, n_logits, n_pending, samples, full_pages, sliding_pages = words[1:1 + _HEADER]
        self.full.grow_to(full_pages)
        if self.sliding is not None:
            self.sliding.grow_to(sliding_pages)
        at = 1 + _HEADER
        ids, at = words[at:at + n_ids], at + n_ids
        logits_rows, at = words[at:at + n_logits], at + n_logits
        pending = {words[at + 2 * i]: words[at + 2 * i + 1] for i in range(n_pending)}
        at += 2 * n_pending
        chunks, positions, keys, tables = [], [], [], {}
        for _ in range(n_chunks):
            key, serial, start, length, full_from, n_full, sliding_from, n_sliding, released = \
                words[at:at + _CHUNK]
            at += _CHUNK
            kv = self._tables.get(key)
            if kv is None or kv.serial != serial or full_from == 0:
                kv = PageTables(self.full, self.sliding, self.window, serial=serial)
            _extend(kv.pages, full_from, words[at:at + n_full])
            at += n_full
            _extend(kv.sliding_pages, sliding_from, words[at:at + n_sliding])
            at += n_sliding
            for i in range(kv.released_upto, released):
                kv.sliding_pages[i] = RELEASED
            kv.released_upto = released
            tables[key] = kv
            chunks.append(SequenceChunk(start, length, kv))
            positions.extend(range(start, start + length))
            keys.append(key)
        assert at == len(words), f"a step plan of {len(words)} words, {at} read"
        self._tables = tables
        return StepPlan(ids, positions, chunks, logits_rows, pending, keys), samples


def _extend(pages: list[int], start: int, new: list[int]) -> None:
    """pages[start:] = new, where pages held exactly `start` entries (the sender's count)."""
    assert len(pages) == start, f"page list of {len(pages)} entries, the first rank sent from {start}"
    pages.extend(new)


class PlanChannel:
    """Step plans from the replica's first rank to its other ranks, over the replica's host group."""

    def __init__(self, group: Group, full: PagePool, sliding: PagePool | None, window: int | None):
        self.group, self.full, self.sliding = group, full, sliding
        self.sender = group.rank == 0
        self._encoder = PlanEncoder() if self.sender else None
        self._decoder = None if self.sender else PlanDecoder(full, sliding, window)

    def send(self, plan: StepPlan, samples: int) -> None:
        self._broadcast(self._encoder.encode(plan, samples, self.full, self.sliding))

    def end(self) -> None:
        """The generate call is over: the other ranks return from it."""
        self._broadcast(self._encoder.encode_end())

    def receive(self) -> tuple[StepPlan, int] | None:
        return self._decoder.decode(self._broadcast(None))

    def _broadcast(self, words: list[int] | None) -> list[int]:
        """The sender's words on every rank: a fixed-size first broadcast (length, then as much as
        fits), and a second for the rest of a long message."""
        first = torch.zeros(FIRST_WORDS, dtype=torch.int64)
        if words is not None:
            head = words[:FIRST_WORDS - 1]
            first[0] = len(words)
            first[1:1 + len(head)] = torch.tensor(head, dtype=torch.int64)
        dist.broadcast(first, src=self.group.first, group=self.group.group)
        n = int(first[0])
        if n <= FIRST_WORDS - 1:
            return words if words is not None else first[1:1 + n].tolist()
        rest = torch.empty(n - (FIRST_WORDS - 1), dtype=torch.int64)
        if words is not None:
            rest.copy_(torch.tensor(words[FIRST_WORDS - 1:], dtype=torch.int64))
        dist.broadcast(rest, src=self.group.first, group=self.group.group)
        return words if words is not None else first[1:].tolist() + rest.tolist()
