"""Paged KV cache: pools of fixed-size pages, each sequence a list of page ids per pool.

Two pools, because the two kinds of layers keep different spans: the full-attention layers keep
every position of a sequence, the sliding-window layers only the last `window` (gpt-oss: 128). Each
pool holds key and value page arrays [num_pages, page_size, KVH, D] (post-RoPE) for its layers only,
and a sequence's page list in a pool serves all of them, so one block-table row per pool serves the
whole model. A sliding layer's pages that fall wholly out of the window are given back as the
sequence advances (their block-table entries become -1, never read), so its memory is bounded
whatever the context length.

The full pool is either fixed (sized by the engine from free GPU memory, or by `kv_cache_tokens`):
the scheduler reserves a step's pages before the step and preempts sequences when they run out; or
growable (the default without a size): it doubles when it runs out (page ids stay valid, so block
tables do too). The sliding pool is fixed too: as large as the running batch can ever use
(`sliding_pages_bound`), or, where that is more than the sequences the full pool holds can use, that
much (`sliding_pool_pages`: a GPU whose memory is short does not set aside window pages for sequences
that will never run); the scheduler then admits sequences by the sliding pages they may hold too.

A fixed pool has one page more than it hands out, `scratch` (zeros): the padding rows of a CUDA
graph's batch write their keys there and read them back, so they never touch a sequence's pages.

Pages are reference-counted so that sequences can share them (prefix caching, runtime/prefix_cache.py):
a complete page can be registered under the digest of its tokens and every token before them; when
its last holder lets go it is kept, still registered, on a least-recently-used list, and handed out
again only when no free page is left (its digest forgotten first, so no one finds stale content).

Storage dtype (`kv_cache_dtype`, vLLM's name and values): "auto" keeps keys and values in the
model's dtype; "fp8" (or "fp8_e4m3") stores them as float8 e4m3 with a scale of 1, as vLLM does for
a checkpoint without KV scales: half the bytes a decode step reads and twice the positions a GPU
holds, for a rounding of each stored value to 3 mantissa bits (values past +-448 saturate). Every
writer rounds through `to_cache_dtype` (kernels: kernels/kv_store_triton.py, the same rounding) and
every reader widens the values back before its dot products.
"""

from __future__ import annotations

import collections
import itertools

import torch

from runtime.transfer import to_device

PAGE_SIZE = 16
RELEASED = -1  # a sliding page list's entry for a page given back
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
FP8_E4M3_MAX = 448.0  # the largest finite float8 e4m3fn value: stored values saturate there


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' dtype for a `kv_cache_dtype` name (one EngineConfig has checked)."""
    return KV_CACHE_DTYPES[name] or model_dtype


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` stores it: float8 e4m3 rounds to nearest (ties to even) after
    saturating at +-448, where a plain cast would give NaN."""
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


class OutOfPages(RuntimeError):
    """A fixed pool has no free page left."""


def pages_for(positions: int, page_size: int = PAGE_SIZE) -> int:
    return -(-positions // page_size)


def page_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               page_size: int = PAGE_SIZE) -> int:
    """Bytes of one page id in a pool of num_layers layers, keys and values."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype.itemsize


def first_visible_page(position: int, window: int | None, page_size: int) -> int:
    """The sliding layers' first page that a query at `position` reads (its oldest key's)."""
    return max(0, position - window + 1) // page_size if window else 0


def sliding_pages_per_sequence(window: int, page_size: int = PAGE_SIZE) -> int:
    """Sliding-layer pages one sequence holds at most between steps: its window, with a partial page
    at each end (a step's chunk adds to it, see sliding_pages_bound)."""
    return pages_for(window - 1, page_size) + 2


def sliding_pages_bound(window: int, max_batch_size: int, max_batch_tokens: int,
                        page_size: int = PAGE_SIZE) -> int:
    """Sliding-layer pages that running sequences can hold at once: each keeps its window plus this
    step's chunk (a partial page at each end), and the chunks of a step total max_batch_tokens."""
    return (max_batch_size * sliding_pages_per_sequence(window, page_size)
            + pages_for(max_batch_tokens, page_size))


def sliding_pool_pages(full_pages: int, window: int, max_batch_size: int, max_batch_tokens: int,
                       page_size: int = PAGE_SIZE) -> int:
    """The sliding pool's size beside a full pool of `full_pages`: the batch's bound, or, if fewer, the
    pages the sequences that fit in the full pool can hold. A sequence holds as many pages of each
    kind until its context passes the window, and from then on at least pages_for(window + 1) full
    ones against at most sliding_pages_per_sequence sliding ones; so, unless sequences share full
    pages (prefix caching), the full pool runs out first. Where they share, the scheduler's
    admission keeps the sliding pages within the pool (Scheduler._sliding_room)."""
    per_sequence = sliding_pages_per_sequence(window, page_size)
    fitting = -(-full_pages * per_sequence // pages_for(window + 1, page_size))
    return min(sliding_pages_bound(window, max_batch_size, max_batch_tokens, page_size),
               fitting + pages_for(max_batch_tokens, page_size))


def full_pages_within(budget: float, full_bytes: int, sliding_bytes: int, sliding_for) -> int:
    """The most full-pool pages whose bytes, with those of the sliding_for(pages) sliding pages that
    go with them (a function that grows with its argument), fit in `budget` bytes."""
    low, high = 0, max(0, int(budget // full_bytes))
    while low < high:
        mid = (low + high + 1) // 2
        if mid * full_bytes + sliding_for(mid) * sliding_bytes <= budget:
            low = mid
        else:
            high = mid - 1
    return low


class PagePool:
    def __init__(self, layers: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, page_size: int = PAGE_SIZE, num_pages: int = 64,
                 growable: bool = True):
        self.layers, self.page_size, self.growable = list(layers), page_size, growable
        self._shape, self._dtype, self._device = (num_kv_heads, head_dim), dtype, device
        self.scratch = None if growable else num_pages  # page id of the never-allocated scratch page
        rows = num_pages + (not growable)
        self.keys = {layer: self._empty(rows) for layer in self.layers}  # by model layer index
        self.values = {layer: self._empty(rows) for layer in self.layers}
        if self.scratch is not None:
            for store in (self.keys, self.values):
                for pages in store.values():
                    pages[self.scratch].zero_()
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._num_pages = num_pages
        self._holders = [0] * num_pages  # sequences holding each page
        self._digest: dict[int, bytes] = {}  # registered page -> digest of its prefix
        self._page: dict[bytes, int] = {}  # digest -> the registered page holding that prefix
        # Registered pages no sequence holds, least recently used first: reusable as they are, or
        # handed out (forgotten) when the free list is empty.
        self._unheld: collections.OrderedDict[int, None] = collections.OrderedDict()

    def _empty(self, num_pages: int) -> torch.Tensor:
        return torch.empty((num_pages, self.page_size, *self._shape), dtype=self._dtype, device=self._device)

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def free_pages(self) -> int:
        """Pages allocate() can hand out without growing: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._unheld)

    @property
    def cached_pages(self) -> int:
        """Registered pages (held or not): the prefix cache's size."""
        return len(self._page)

    def pages_for(self, positions: int) -> int:
        return pages_for(positions, self.page_size)

    def allocate(self) -> int:
        """A page for one holder: a free one, else the least recently used cached one (forgotten),
        else (a growable pool) a new one."""
        if not self._free and self._unheld:
            page, _ = self._unheld.popitem(last=False)
            del self._page[self._digest.pop(page)]
            self._free.append(page)
        if not self._free:
            if not self.growable:
                raise OutOfPages(f"all {self.num_pages} KV pages are in use")
            self._grow()
        page = self._free.pop()
        self._holders[page] = 1
        return page

    def release(self, pages: list[int]) -> None:
        """Each holder lets go of its pages (RELEASED entries skipped): a page no one holds any more
        goes back to the free list, or, if registered, to the end of the least-recently-used list."""
        for page in reversed(pages):
            if page == RELEASED:
                continue
            assert self._holders[page] > 0, f"KV page {page} released more often than held"
            self._holders[page] -= 1
            if self._holders[page] == 0:
                if page in self._digest:
                    self._unheld[page] = None
                else:
                    self._free.append(page)

    # --------------------------------------------------------------------------- prefix caching
    def lookup(self, digest: bytes) -> int | None:
        """The registered page holding the prefix with this digest, or None."""
        return self._page.get(digest)

    def share(self, page: int) -> None:
        """One more holder of a registered page (found by lookup)."""
        assert page in self._digest, f"KV page {page} is not registered"
        self._holders[page] += 1
        self._unheld.pop(page, None)

    def register(self, page: int, digest: bytes) -> None:
        """Page `page` (held, its positions all written) holds the prefix `digest`; a prefix already
        registered keeps its page (the newcomer stays private and is freed when let go)."""
        assert self._holders[page] > 0, f"KV page {page} registered while no one holds it"
        if digest not in self._page and page not in self._digest:
            self._page[digest], self._digest[page] = page, digest

    def holders(self, page: int) -> int:
        return self._holders[page]

    def forget_cached(self) -> None:
        """Drop every registration (their contents may be unwritten after a failed step): unheld
        cached pages become free, held ones private."""
        self._free.extend(reversed(self._unheld))
        self._unheld.clear()
        self._page.clear()
        self._digest.clear()

    def _grow(self) -> None:
        old = self._num_pages
        for store in (self.keys, self.values):
            for layer, pages in store.items():
                grown = self._empty(2 * old)
                grown[:old] = pages
                store[layer] = grown
        self._free.extend(range(2 * old - 1, old - 1, -1))
        self._holders.extend([0] * old)
        self._num_pages = 2 * old

    def grow_to(self, num_pages: int) -> None:
        """At least num_pages pages (a growable pool; another rank's page ids must index this one)."""
        if num_pages > self._num_pages and not self.growable:
            raise ValueError(f"a fixed pool of {self._num_pages} KV pages cannot hold page ids up to "
                             f"{num_pages - 1}")
        while self._num_pages < num_pages:
            self._grow()

    def page_bytes(self) -> int:
        """Bytes of one page id across this pool's layers, keys and values."""
        return page_bytes(len(self.layers), *self._shape, self._dtype, self.page_size)

    def nbytes(self) -> int:
        return (self.num_pages + (self.scratch is not None)) * self.page_bytes()


_serials = itertools.count()


class PageTables:
    """A sequence's page lists in the two pools, and the reads and writes through them. The pages
    are allocated by someone else: by SequenceKV (below), or, on the other ranks of a model replica,
    by the replica's first rank, whose scheduler sends its tables with each step (runtime/step_plan.py).

    `serial` is new whenever the page lists start over (at creation and at release), so a holder of
    a copy of a page list (the CUDA graphs' staged block tables) can tell when it has gone stale."""

    def __init__(self, full: PagePool, sliding: PagePool | None = None, window: int | None = None,
                 serial: int | None = None):
        self.pool, self.sliding_pool, self.window = full, sliding, window
        self.serial = next(_serials) if serial is None else serial
        self.pages: list[int] = []  # full layers' pages in position order
        # sliding layers' pages in position order, RELEASED once out of the window
        self.sliding_pages: list[int] = []
        self.released_upto = 0  # sliding_pages[:released_upto] are all RELEASED
        self.registered = 0  # pages[:registered] are in the prefix cache (runtime/prefix_cache.py)
        self._slots: dict[bool, tuple[int, int, torch.Tensor]] = {}

    def _kind(self, layer: int) -> bool:
        """True for a sliding-window layer (one the sliding pool holds)."""
        return self.sliding_pool is not None and layer in self.sliding_pool.keys

    def reserve(self, start: int, end: int) -> None:
        """Given pages: positions start..end-1 must already be in the tables."""
        assert len(self.pages) * self.pool.page_size >= end, (len(self.pages), end)

    def table(self, sliding: bool) -> list[int]:
        return self.sliding_pages if sliding else self.pages

    def slots(self, sliding: bool, start: int, end: int) -> torch.Tensor:
        """Flat pool rows (page * page_size + offset) of positions start..end-1 in one kind of layer,
        reserving as needed; remembered, since every layer of the kind asks for the same ones in a step."""
        memo = self._slots.get(sliding)
        if memo is not None and memo[:2] == (start, end):
            return memo[2]
        self.reserve(start, end)
        slots = self._rows(sliding, start, end)
        self._slots[sliding] = (start, end, slots)
        return slots

    def _rows(self, sliding: bool, start: int, end: int) -> torch.Tensor:
        """Flat pool rows of positions start..end-1 through the page table (no allocation)."""
        pool = self.sliding_pool if sliding else self.pool
        table = torch.tensor(self.table(sliding), dtype=torch.int64)
        positions = torch.arange(start, end)
        pages = table[positions // pool.page_size]
        assert (pages != RELEASED).all(), "positions outside a sliding layer's window"
        return to_device(pages * pool.page_size + positions % pool.page_size, torch.int64, pool._device)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, KVH, D] at positions start..start+n-1 of `layer`."""
        sliding = self._kind(layer)
        pool = self.sliding_pool if sliding else self.pool
        slots = self.slots(sliding, start, start + k.shape[0])
        pool.keys[layer].flatten(0, 1)[slots] = to_cache_dtype(k, pool.dtype)
        pool.values[layer].flatten(0, 1)[slots] = to_cache_dtype(v, pool.dtype)

    def read(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [end - start, KVH, D] of positions start..end-1 (a gathered copy)."""
        sliding = self._kind(layer)
        pool = self.sliding_pool if sliding else self.pool
        slots = self._rows(sliding, start, end)
        return pool.keys[layer].flatten(0, 1)[slots], pool.values[layer].flatten(0, 1)[slots]


class SequenceKV(PageTables):
    """One sequence's pages, allocated from the pools as it grows: positions 0..computed-1 hold
    keys and values in every full layer, and the last `window` of them in every sliding layer."""

    def pages_missing(self, end: int) -> int:
        """Full-pool pages still to allocate before positions up to end - 1 can be written."""
        return max(0, self.pool.pages_for(end) - len(self.pages))

    def reserve(self, start: int, end: int) -> None:
        """Pages for writing positions start..end-1 (and reading the window before start): releases
        sliding pages that no query from `start` on can see, then allocates. OutOfPages when the
        full or sliding pool has too few (nothing is allocated then)."""
        if not self.pool.growable and self.pages_missing(end) > self.pool.free_pages:
            raise OutOfPages(f"{self.pages_missing(end)} more KV pages needed, {self.pool.free_pages} free")
        if self.sliding_pool is not None:
            self._release_out_of_window(start)
            missing = self._sliding_pages_missing(start, end)
            if not self.sliding_pool.growable and missing > self.sliding_pool.free_pages:
                raise OutOfPages(f"{missing} more sliding-window KV pages needed, "
                                 f"{self.sliding_pool.free_pages} free")
        while len(self.pages) * self.pool.page_size < end:
            self.pages.append(self.pool.allocate())
        if self.sliding_pool is None:
            return
        first_visible = first_visible_page(start, self.window, self.sliding_pool.page_size)
        while len(self.sliding_pages) * self.sliding_pool.page_size < end:
            # A page wholly before the window is never written: keep its entry released.
            live = len(self.sliding_pages) >= first_visible
            self.sliding_pages.append(self.sliding_pool.allocate() if live else RELEASED)

    def _release_out_of_window(self, start: int) -> None:
        """Give back the sliding pages no query from `start` on can see. Entries before released_upto
        are all released already: a long sequence's step visits only the pages that just left the
        window, not every page of its history."""
        first_visible = first_visible_page(start, self.window, self.sliding_pool.page_size)
        for i in range(self.released_upto, min(first_visible, len(self.sliding_pages))):
            if self.sliding_pages[i] != RELEASED:
                self.sliding_pool.release([self.sliding_pages[i]])
                self.sliding_pages[i] = RELEASED
            self.released_upto = i + 1

    def _sliding_pages_missing(self, start: int, end: int) -> int:
        """Sliding pages reserve(start, end) would allocate: the new entries inside the window."""
        first_live = max(len(self.sliding_pages),
                         first_visible_page(start, self.window, self.sliding_pool.page_size))
        return max(0, pages_for(end, self.sliding_pool.page_size) - first_live)

    def release(self) -> None:
        """Give every page back (the sequence is finished, or preempted)."""
        self.pool.release(self.pages)
        if self.sliding_pool is not None:
            self.sliding_pool.release(self.sliding_pages)
        self.pages, self.sliding_pages, self._slots, self.released_upto = [], [], {}, 0
        self.registered = 0
        self.serial = next(_serials)

    def __del__(self):
        self.release()

    def nbytes(self) -> int:
        live_sliding = sum(p != RELEASED for p in self.sliding_pages)
        return len(self.pages) * self.pool.page_bytes() + (
            live_sliding * self.sliding_pool.page_bytes() if self.sliding_pool is not None else 0)
