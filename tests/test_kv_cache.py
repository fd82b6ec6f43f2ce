"""runtime/kv_cache.py: page pools that grow and recycle, and sliding layers that keep only the window."""

import pytest
import torch

from runtime.kv_cache import PagePool, SequenceKV


@pytest.mark.parametrize("pages", [1, 3])
def test_page_pool_grows_and_recycles(pages):

    pool = PagePool([0, 1], 1, 4, torch.float32, "cpu", page_size=4, num_pages=pages)
    a, b = SequenceKV(pool), SequenceKV(pool)
    for s, n in ((a, 9), (b, 6)):
        k = torch.randn(n, 1, 4)
        s.write(1, 0, k, -k)
        assert torch.equal(s.read(1, 0, n)[0], k) and torch.equal(s.read(1, 0, n)[1], -k)
    assert not set(a.pages) & set(b.pages) and pool.num_pages >= 5
    a.release()
    c = SequenceKV(pool)
    c.reserve(0, 12)
    assert set(c.pages) <= set(range(pool.num_pages)) and not set(c.pages) & set(b.pages)


def test_sliding_layers_keep_only_the_window():
    """Window 6, pages of 4: writing 40 positions in steps keeps at most 3 live sliding pages, reads
    inside the window still see the right keys, and the full layer keeps everything."""
    from runtime.kv_cache import RELEASED

    full = PagePool([0], 1, 2, torch.float32, "cpu", page_size=4, num_pages=2)
    sliding = PagePool([1], 1, 2, torch.float32, "cpu", page_size=4, num_pages=2)
    seq = SequenceKV(full, sliding, window=6)
    keys = torch.randn(40, 1, 2)
    for start, n in ((0, 9), (9, 1), (10, 7), (17, 1), (18, 1), (19, 21)):
        for layer in (0, 1):
            seq.write(layer, start, keys[start:start + n], -keys[start:start + n])
        end = start + n
        first = max(0, start - 6 + 1)
        assert torch.equal(seq.read(1, first, end)[0], keys[first:end])
        assert torch.equal(seq.read(0, 0, end)[1], -keys[:end])
    live = [p for p in seq.sliding_pages if p != RELEASED]
    assert seq.sliding_pages[:3] == [RELEASED] * 3 and len(live) <= 3 + 21 // 4 + 1
    assert sliding.num_pages < full.num_pages
    seq.reserve(40, 41)  # a decode step: the chunk's pages go too
    assert sum(p != RELEASED for p in seq.sliding_pages) <= 3
    seq.release()
    assert sliding.free_pages == sliding.num_pages and full.free_pages == full.num_pages
