"""Page pool: allocation, reference counts, LRU eviction order, prefix-hash map."""

import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.page_pool import NULL_PAGE, PagePool


def test_allocate_never_hands_out_the_null_page():
    pool = PagePool(6)
    pages = pool.allocate(5)
    assert sorted(pages) == [1, 2, 3, 4, 5] and NULL_PAGE not in pages
    assert (pool.num_free, pool.num_used, pool.usage) == (0, 5, 1.0)
    assert pool.allocate(1) is None
    assert all(pool.ref_count(p) == 1 for p in pages)


def test_allocate_all_or_nothing():
    pool = PagePool(4)
    assert pool.allocate(4) is None
    assert pool.num_free == 3 and pool.free_pages() == [1, 2, 3]


def test_free_queue_is_lru_in_free_order():
    pool = PagePool(5)
    a, b, c, d = pool.allocate(4)
    pool.free([c, a])
    pool.free([NULL_PAGE, d])  # the null page (a released window slot) is skipped
    assert pool.free_pages() == [c, a, d]
    assert pool.allocate(2) == [c, a]  # first freed, first reused


def test_refcounts_touch_and_double_free():
    pool = PagePool(4)
    (p,) = pool.allocate(1)
    pool.touch([p])
    assert pool.ref_count(p) == 2
    pool.free([p])
    assert pool.ref_count(p) == 1 and p not in pool.free_pages()
    pool.free([p])
    assert pool.ref_count(p) == 0 and p in pool.free_pages()
    pool.touch([p])  # a prefix hit on a free page takes it back off the queue
    assert pool.ref_count(p) == 1 and p not in pool.free_pages() and pool.num_free == 2
    pool.free([p])
    with pytest.raises(RuntimeError, match="freed more times"):
        pool.free([p])
    with pytest.raises(RuntimeError, match="null page"):
        pool.touch([NULL_PAGE])


def test_hash_map_and_eviction_of_cached_pages():
    pool = PagePool(3)
    p, q = pool.allocate(2)
    assert pool.cache(p, "h1") and pool.lookup("h1") == p and pool.page_hash(p) == "h1"
    assert not pool.cache(q, "h1")  # the first copy of a prefix stays the one found
    assert not pool.cache(p, "h2")  # a page holds one hash
    assert not pool.cache(NULL_PAGE, "h3")
    pool.free([p])
    assert pool.lookup("h1") == p and pool.num_cached == 1  # unreferenced but still cached
    assert pool.allocate(1) == [p]  # reusing it drops its hash
    assert pool.lookup("h1") is None and pool.page_hash(p) is None
    pool.cache(q, "h4")
    assert pool.reset_hashes() == 1 and pool.lookup("h4") is None


def test_bad_pool_size():
    with pytest.raises(UserError, match="num_pages=1"):
        PagePool(1)
