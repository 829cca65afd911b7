"""KV cache manager: page tables, prefix caching, eviction, reset, sliding-window release."""

import pytest

from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.kv_cache_manager import KVCacheManager
from jaxturbo.inference.engine.page_pool import NULL_PAGE
from jaxturbo.inference.engine.request import Request

PS = 16
PREFIX = list(range(1, 3 * PS + 1))  # three full pages


def admit(kv, req, num_new=None):
    """What the scheduler does on admission: look up the prefix, allocate, mark hits computed."""
    hits, n_hit = kv.get_computed_pages(req)
    assert kv.allocate_slots(req, (num_new or req.num_tokens - n_hit), hits)
    req.num_computed_tokens = n_hit
    return hits


def run_step(req, n):
    """The step ran: its n tokens are computed."""
    req.num_computed_tokens += n


def test_table_grows_page_by_page_and_fails_cleanly():
    kv = KVCacheManager(num_pages=5, page_size=PS)  # 4 usable pages
    r = Request("a", list(range(40)), max_tokens=100)
    assert kv.allocate_slots(r, 40) and len(r.page_table) == 3  # ceil(40 / 16)
    run_step(r, 40)
    for _ in range(8):
        r.append_output_token(1)
    assert kv.allocate_slots(r, 8) and len(r.page_table) == 3  # positions 40..47 fit page 2
    run_step(r, 8)
    r.append_output_token(1)
    assert kv.allocate_slots(r, 1) and len(r.page_table) == 4
    b = Request("b", [1], max_tokens=1)
    before = (kv.num_free_pages, list(r.page_table))
    assert not kv.allocate_slots(b, 1)
    assert (kv.num_free_pages, list(r.page_table), b.page_table) == (before[0], before[1], [])
    kv.free(r)
    assert kv.num_free_pages == 4 and r.page_table == []
    with pytest.raises(RuntimeError, match="cannot compute 2 new tokens"):
        kv.allocate_slots(b, 2)  # b knows only one token


def test_shared_prefix_reuses_pages_and_reports_saved_tokens():
    kv = KVCacheManager(num_pages=16, page_size=PS)
    a = Request("a", PREFIX + [100, 101], max_tokens=4)
    assert admit(kv, a) == []
    run_step(a, a.num_tokens)
    b = Request("b", PREFIX + [200], max_tokens=4)
    hits = admit(kv, b)
    assert hits == a.page_table[:3] and b.num_computed_tokens == 3 * PS
    assert b.page_table[:3] == a.page_table[:3] and b.page_table[3] != a.page_table[3]
    assert all(kv.pool.ref_count(p) == 2 for p in hits)
    st = kv.stats()
    assert st.prefix_queries == 2 and st.prefix_query_tokens == a.num_tokens + b.num_tokens
    assert st.prefix_hit_tokens == st.saved_prefill_tokens == 48
    assert st.hit_rate == pytest.approx(48 / (50 + 49))
    assert st.pages_used == 5 and st.pages_free == 10 and st.capacity_tokens == 15 * PS
    assert st.usage == pytest.approx(5 / 15)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(num_pages=16, page_size=PS)
    a = Request("a", PREFIX, max_tokens=4)
    admit(kv, a)
    run_step(a, a.num_tokens)
    b = Request("b", PREFIX, max_tokens=4)
    pages, n = kv.get_computed_pages(b)
    assert n == 2 * PS and pages == a.page_table[:2]  # the third page is recomputed for the logits


def test_same_step_hit_on_pages_being_computed():
    # a registers its pages when allocated: b, admitted in the same step, shares them
    kv = KVCacheManager(num_pages=16, page_size=PS)
    a = Request("a", PREFIX + [7], max_tokens=4)
    admit(kv, a)
    b = Request("b", PREFIX + [8], max_tokens=4)
    assert admit(kv, b) == a.page_table[:3]


def test_unreferenced_prefix_pages_are_evicted_tail_first_lru():
    kv = KVCacheManager(num_pages=8, page_size=PS)  # 7 usable
    a = Request("a", PREFIX + [9], max_tokens=4)
    admit(kv, a)
    run_step(a, a.num_tokens)
    a_pages = list(a.page_table)
    kv.free(a)
    assert kv.num_free_pages == 7 and kv.stats().pages_cached == 3  # free, yet still cached
    probe = Request("p", PREFIX + [9], max_tokens=4)
    assert kv.get_computed_pages(probe)[1] == 48
    # the three never-used pages go first, then a's pages from its tail: the partial page, then page 2
    filler = Request("f", list(range(5 * PS)), max_tokens=1)
    assert kv.allocate_slots(filler, 5 * PS)
    assert filler.page_table[3:] == [a_pages[3], a_pages[2]]
    assert kv.get_computed_pages(probe) == (a_pages[:2], 32)
    kv.free(filler)


def test_uncomputed_pages_are_not_found_after_free():
    # a step allocated (and registered) pages but never ran: a preemption or abort frees them
    kv = KVCacheManager(num_pages=16, page_size=PS)
    a = Request("a", PREFIX + [9], max_tokens=4)
    admit(kv, a, num_new=32)  # pages 0, 1 registered, nothing computed yet
    kv.free(a)
    assert kv.get_computed_pages(Request("b", PREFIX + [9], max_tokens=4)) == ([], 0)
    a2 = Request("a2", PREFIX + [9], max_tokens=4)
    admit(kv, a2, num_new=32)
    run_step(a2, 32)
    kv.free(a2)  # computed: its full pages stay cached
    assert kv.get_computed_pages(Request("c", PREFIX + [9], max_tokens=4))[1] == 32


def test_reset_prefix_cache_invalidates_everything():
    kv = KVCacheManager(num_pages=16, page_size=PS)
    a = Request("a", PREFIX[:40], max_tokens=100)
    admit(kv, a)
    run_step(a, 40)
    assert kv.reset_prefix_cache() == 2
    assert kv.get_computed_pages(Request("b", PREFIX[:40], max_tokens=4)) == ([], 0)
    # a keeps running on K/V from before the reset: pages it fills later must not match either
    for t in PREFIX[40:]:
        a.append_output_token(t)
    assert kv.allocate_slots(a, 8)
    run_step(a, 8)
    assert kv.pool.page_hash(a.page_table[2]) is None
    assert kv.get_computed_pages(Request("c", PREFIX + [1], max_tokens=4)) == ([], 0)
    # new requests cache under the new generation again
    d = Request("d", PREFIX + [1], max_tokens=4)
    admit(kv, d)
    run_step(d, d.num_tokens)
    assert kv.get_computed_pages(Request("e", PREFIX + [1], max_tokens=4))[1] == 48


def test_cache_salt_and_disabled_caching_isolate():
    kv = KVCacheManager(num_pages=16, page_size=PS)
    a = Request("a", PREFIX + [1], max_tokens=4, cache_salt="tenant-1")
    admit(kv, a)
    run_step(a, a.num_tokens)
    assert (
        kv.get_computed_pages(Request("b", PREFIX + [1], max_tokens=4, cache_salt="tenant-2"))[1]
        == 0
    )
    assert (
        kv.get_computed_pages(Request("c", PREFIX + [1], max_tokens=4, cache_salt="tenant-1"))[1]
        == 48
    )
    off = KVCacheManager(num_pages=16, page_size=PS, enable_prefix_caching=False)
    a = Request("a", PREFIX + [1], max_tokens=4)
    admit(off, a)
    run_step(a, a.num_tokens)
    assert off.get_computed_pages(Request("b", PREFIX + [1], max_tokens=4)) == ([], 0)
    assert off.stats().pages_cached == 0 and off.stats().prefix_queries == 0


def test_sliding_window_releases_pages_that_leave_the_window():
    kv = KVCacheManager(num_pages=16, page_size=PS, sliding_window=20)
    r = Request("a", list(range(1, 81)), max_tokens=4)  # five pages of prompt
    for _ in range(5):
        assert kv.allocate_slots(r, 16)
        run_step(r, 16)
        # the next token (position 16 * (step + 1)) attends from position 16 * (step + 1) - 19
    assert r.page_table[:2] == [NULL_PAGE, NULL_PAGE]  # released at the 4th/5th allocation
    assert NULL_PAGE not in r.page_table[2:]
    assert kv.stats().pages_used == 3
    r.append_output_token(5)
    assert kv.allocate_slots(r, 1)  # computed 80: window starts at 61, page 3 (48..63) still needed
    assert (
        r.page_table[:4] == [NULL_PAGE, NULL_PAGE, NULL_PAGE, r.page_table[3]]
        and r.page_table[3] != NULL_PAGE
    )
    kv.free(r)
    assert kv.num_free_pages == 15


def test_sliding_window_prefix_hit_takes_only_live_pages():
    kv = KVCacheManager(num_pages=16, page_size=PS, sliding_window=16)
    a = Request("a", PREFIX + [9], max_tokens=4)
    admit(kv, a, num_new=48)  # computed together: no release yet
    run_step(a, 48)
    b = Request("b", PREFIX + [7], max_tokens=4)
    hits = admit(kv, b)
    assert len(hits) == 3 and b.num_computed_tokens == 48
    # b's first new token (position 48) attends from 33: pages 0 and 1 are not taken
    assert b.page_table[:3] == [NULL_PAGE, NULL_PAGE, a.page_table[2]]
    assert [kv.pool.ref_count(p) for p in a.page_table[:3]] == [1, 1, 2]


def test_pages_needed_bound():
    full = KVCacheManager(num_pages=8, page_size=PS)
    assert full.max_pages_needed(100, 32) == 7
    win = KVCacheManager(num_pages=8, page_size=PS, sliding_window=20)
    # 19 positions of window + a 32-token chunk = 51 positions: at most 5 pages with bad alignment
    assert win.max_pages_needed(1000, 32) == 5 and win.max_pages_needed(20, 32) == 2


def test_from_config():
    cfg = EngineConfig(page_size=32, num_pages=10, sliding_window=64, enable_prefix_caching=False)
    kv = KVCacheManager.from_config(cfg)
    assert (kv.num_usable_pages, kv.page_size, kv.sliding_window, kv.enable_prefix_caching) == (
        9,
        32,
        64,
        False,
    )
    assert KVCacheManager.from_config(cfg, num_pages=4).num_usable_pages == 3
    with pytest.raises(ValueError, match="num_pages is None"):
        KVCacheManager.from_config(EngineConfig())
