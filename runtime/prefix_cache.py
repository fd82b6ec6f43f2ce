"""Prefix caching: KV pages computed once serve every sequence whose tokens start the same way.

A page is named by a hash chain, as vLLM names its blocks: the digest of page j is a hash of page
j - 1's digest and page j's tokens, so equal digests mean equal tokens at every position up to the
page's end, and, since a position's keys and values depend on exactly those tokens, equal KV in every
layer. A radix tree over tokens (SGLang) finds the same prefixes, but pages are what this cache
allocates, shares and evicts, and a chain keys each page on its own: the full-attention pool and the
sliding-window pool index their pages by the same digests, each evicting on its own.

Only complete pages are cached, and a sequence reuses a run of them from its start (or from where it
stands, when it is at a page boundary with nothing of its own ahead): it never writes into a shared
page, and it always computes at least its last token, whose logits it samples from.

The sliding-window layers need the reused prefix's last `window` positions too. Their pages are
cached like the full layers' (a page leaving a running sequence's window is kept, registered, until
its memory is needed), so a hit of m pages needs full pages 0..m-1 and the sliding pages that the
window before position m * page_size touches; the hit is the longest run for which both are there.
Recomputing the last window instead would not be exact: a position's sliding-layer keys depend on
the residual stream of every earlier position, so the window's recomputation would need the
previous window's, 128 positions more per sliding layer, i.e. the whole prefix.
"""

from __future__ import annotations

import hashlib
from array import array

from runtime.kv_cache import RELEASED, PagePool, SequenceKV, first_visible_page

ROOT = b""  # the parent digest of a sequence's first page


def chain_digests(tokens: list[int], page_size: int, digests: list[bytes]) -> None:
    """Append to `digests` (the chain over tokens' first pages so far) the digest of every further
    page of `tokens` that is complete; a page holding a negative token (not known yet) ends it."""
    for j in range(len(digests), len(tokens) // page_size):
        page = tokens[j * page_size:(j + 1) * page_size]
        if min(page) < 0:
            return
        parent = digests[j - 1] if j else ROOT
        digests.append(hashlib.blake2b(parent + array("q", page).tobytes(), digest_size=16).digest())


def longest_hit(full: PagePool, sliding: PagePool | None, window: int | None, digests: list[bytes],
                have: int, limit: int) -> tuple[int, list[int], dict[int, int]]:
    """(m, full pages have..m-1, sliding pages by index) for the longest cached run that extends a
    sequence holding pages 0..have-1 to m <= limit pages: full pages have..m-1 registered, and the
    sliding pages from the window before position m * page_size on (those at have and beyond)."""
    full_pages = []
    for j in range(have, min(limit, len(digests))):
        page = full.lookup(digests[j])
        if page is None:
            break
        full_pages.append(page)
    m = have + len(full_pages)
    if sliding is None or m == have:
        return m, full_pages, {}
    ps = full.page_size
    found = {j: sliding.lookup(digests[j]) for j in range(have, m)}
    while m > have:
        window_pages = range(max(have, first_visible_page(m * ps, window, ps)), m)
        if all(found[j] is not None for j in window_pages):
            return m, full_pages[:m - have], {j: found[j] for j in window_pages}
        m -= 1
    return have, [], {}


def attach(kv: SequenceKV, digests: list[bytes], limit: int) -> int:
    """Extend a sequence's page lists (it holds exactly its computed pages, all complete) with the
    longest cached run of pages up to `limit`; returns how many pages it gained. Sliding entries
    before the new window stay RELEASED."""
    have = len(kv.pages)
    m, full_pages, sliding_pages = longest_hit(kv.pool, kv.sliding_pool, kv.window, digests, have, limit)
    for page in full_pages:
        kv.pool.share(page)
    kv.pages.extend(full_pages)
    if kv.sliding_pool is not None:
        for j in range(have, m):
            page = sliding_pages.get(j, RELEASED)
            if page != RELEASED:
                kv.sliding_pool.share(page)
            kv.sliding_pages.append(page)
    return m - have


def register(kv: SequenceKV, digests: list[bytes], computed: int) -> None:
    """Register the sequence's complete pages (every position below `computed` written, digest
    known) in both pools, so that later sequences find them."""
    upto = min(len(digests), computed // kv.pool.page_size, len(kv.pages))
    for j in range(kv.registered, upto):
        kv.pool.register(kv.pages[j], digests[j])
        if kv.sliding_pool is not None and j < len(kv.sliding_pages) and kv.sliding_pages[j] != RELEASED:
            kv.sliding_pool.register(kv.sliding_pages[j], digests[j])
    kv.registered = max(kv.registered, upto)
