"""Per-request page tables on top of the page pool, with prefix caching and sliding-window release.

Prefix caching: every full page of a request gets a chained hash, sha256(parent hash || its token
ids), rooted at (manager salt, cache generation, request salt).  A new request takes over the
longest run of cached pages matching its leading full pages.  Pages are registered when they are
allocated, before the step that fills them runs: this is correct because within each layer of a
step the model writes all new K/V before any attention reads, so a request scheduled in the same
step as the one computing a page reads it already written.  Pages whose step never ran (their
owner was preempted or aborted first) are unregistered when freed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from collections.abc import Sequence

from jaxturbo.inference.engine.config import EngineConfig, cdiv
from jaxturbo.inference.engine.page_pool import NULL_PAGE, PagePool
from jaxturbo.inference.engine.request import Request


@dataclasses.dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the page pool and the prefix-cache counters (cumulative since creation).

    prefix_query_tokens counts the tokens of every admitted request (resumed ones again);
    prefix_hit_tokens those whose K/V came from the cache: the prefill tokens saved.
    """

    page_size: int
    num_pages: int
    pages_used: int
    pages_free: int
    pages_cached: int
    prefix_queries: int
    prefix_query_tokens: int
    prefix_hit_tokens: int

    @property
    def capacity_tokens(self) -> int:
        """Tokens the allocatable pages hold."""
        return self.num_pages * self.page_size

    @property
    def usage(self) -> float:
        return self.pages_used / self.num_pages

    @property
    def hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
        )

    @property
    def saved_prefill_tokens(self) -> int:
        return self.prefix_hit_tokens


class KVCacheManager:
    """Owns `request.page_table` (and the request's page-hash fields) for every request.

    num_pages counts the null page 0.  sliding_window: set only when every layer attends through
    the same window (pages are shared by all layers).  cache_salt: mixed into every prefix hash,
    e.g. a model name, so two models never share entries.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        *,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
        cache_salt: str = "",
    ) -> None:
        self.pool = PagePool(num_pages)
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.cache_salt = cache_salt
        self._generation = 0  # bumped by reset_prefix_cache: old hash chains never match again
        self._num_queries = 0
        self._query_tokens = 0
        self._hit_tokens = 0

    @classmethod
    def from_config(
        cls, config: EngineConfig, num_pages: int | None = None, *, cache_salt: str = ""
    ) -> KVCacheManager:
        """A manager with the config's page geometry; num_pages overrides config.num_pages (the
        runner passes the count it sized from device memory)."""
        n = config.num_pages if num_pages is None else num_pages
        if n is None:
            raise ValueError(
                "num_pages is None in the config: size the pool first and pass num_pages"
            )
        return cls(
            n,
            config.page_size,
            enable_prefix_caching=config.enable_prefix_caching,
            sliding_window=config.sliding_window,
            cache_salt=cache_salt,
        )

    # -- capacity ---------------------------------------------------------------------------
    @property
    def num_usable_pages(self) -> int:
        return self.pool.num_usable

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_usable * self.page_size

    def max_pages_needed(self, num_computed_tokens: int, max_chunk: int) -> int:
        """Most pages one request holds at once while computing up to `num_computed_tokens`
        tokens in chunks of at most `max_chunk` (sliding window: only the window plus a chunk)."""
        full = cdiv(num_computed_tokens, self.page_size)
        if self.sliding_window is None:
            return full
        live = self.sliding_window - 1 + max_chunk  # positions [start - window + 1, start + chunk)
        return min(full, cdiv(live - 1, self.page_size) + 1)

    # -- prefix cache -----------------------------------------------------------------------
    def _refresh_hashes(self, request: Request) -> None:
        """Start the hash chain afresh after a reset, unless the request still holds pages (its
        cached K/V predate the reset, so its pages must stay unreachable from the new chain)."""
        if request.hash_generation != self._generation and not request.page_table:
            request.page_hashes = []
            request.hash_generation = self._generation

    def _page_hashes(self, request: Request, num_pages: int) -> Sequence[bytes]:
        """Chained hashes of the request's first num_pages full pages (extended incrementally)."""
        hashes, ps, tokens = request.page_hashes, self.page_size, request.all_token_ids
        if len(hashes) < num_pages:
            if (num_pages * ps) > len(tokens):
                raise RuntimeError(f"page {num_pages - 1} of {request.request_id!r} is not full")
            parent = (
                hashes[-1]
                if hashes
                else hashlib.sha256(
                    repr((self.cache_salt, request.hash_generation, request.cache_salt)).encode()
                ).digest()
            )
            for i in range(len(hashes), num_pages):
                parent = hashlib.sha256(
                    parent + array("q", tokens[i * ps : (i + 1) * ps]).tobytes()
                ).digest()
                hashes.append(parent)
        return hashes

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached pages matching the request's leading full pages, and the tokens
        they hold.  At least one token is left to compute so the step yields logits.  Pure
        lookup: pass the pages to `allocate_slots` to take them."""
        if not self.enable_prefix_caching or request.page_table:
            return [], 0
        self._refresh_hashes(request)
        pages: list[int] = []
        for i in range((request.num_tokens - 1) // self.page_size):
            page = self.pool.lookup(self._page_hashes(request, i + 1)[i])
            if page is None:
                break
            pages.append(page)
        return pages, len(pages) * self.page_size

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (after new weights, the cached K/V are stale); returns how
        many pages were registered.  Pages stay with their current owners."""
        self._generation += 1
        return self.pool.reset_hashes()

    # -- allocation -------------------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_pages: Sequence[int] = (),
        *,
        lookahead: int = 0,
    ) -> bool:
        """Grow the request's table to hold its computed tokens plus `num_new_tokens`.

        new_computed_pages: prefix-cache hits from `get_computed_pages`, only for a request holding
        no pages (the caller then sets num_computed_tokens to their token count).  lookahead:
        room for this many more tokens, not known yet (a multi-step decode computes the tokens
        it samples).  Returns False, changing nothing but sliding-window releases, when the pool
        lacks free pages.
        """
        ps, pool, table = self.page_size, self.pool, request.page_table
        if table and not new_computed_pages and self.sliding_window is None and num_new_tokens > 0:
            # the common decode step, once per running request per step: the tokens fit in
            # the pages held and no page fills up, so there is nothing to allocate, release
            # or register (the general path below would conclude the same, slower)
            end = request.num_computed_tokens + num_new_tokens
            if end + lookahead <= len(table) * ps and end <= request.num_tokens:
                if (
                    not self.enable_prefix_caching
                    or end // ps <= request.num_cached_pages
                    or request.hash_generation != self._generation
                ):
                    return True
        fresh = not table
        if new_computed_pages and (not fresh or request.num_computed_tokens):
            raise RuntimeError(
                f"{request.request_id!r}: prefix hits are only taken by a request holding no pages"
            )
        num_computed = request.num_computed_tokens + len(new_computed_pages) * ps
        end = num_computed + num_new_tokens
        if num_new_tokens < 1 or end > request.num_tokens:
            raise RuntimeError(
                f"{request.request_id!r}: cannot compute {num_new_tokens} new tokens after "
                f"{num_computed} of {request.num_tokens} known"
            )
        if fresh:
            self._refresh_hashes(request)

        # pages entirely before the window of the first new token are never read again
        first_live = 0
        if self.sliding_window is not None:
            first_live = max(0, num_computed - self.sliding_window + 1) // ps
            released, i = [], min(first_live, len(table)) - 1
            while i >= 0 and table[i] != NULL_PAGE:  # released pages form a prefix of the table
                released.append(table[i])
                table[i] = NULL_PAGE
                i -= 1
            pool.free(released)
        live_hits = list(new_computed_pages[first_live:])

        num_alloc = max(0, cdiv(end + lookahead, ps) - len(table) - len(new_computed_pages))
        hits_leaving_queue = sum(1 for p in live_hits if pool.ref_count(p) == 0)
        if num_alloc + hits_leaving_queue > pool.num_free:
            return False
        pool.touch(live_hits)
        table.extend([NULL_PAGE] * (len(new_computed_pages) - len(live_hits)))
        table.extend(live_hits)
        table.extend(pool.allocate(num_alloc))

        if not self.enable_prefix_caching:
            return True
        if fresh:
            request.num_cached_pages = len(new_computed_pages)
            self._num_queries += 1
            self._query_tokens += request.num_tokens
            self._hit_tokens += len(new_computed_pages) * ps
        # a page is registered once its tokens are known (a trailing placeholder token of
        # asynchronous scheduling is not): a later allocation registers it
        num_full = min(end, request.num_known_tokens) // ps
        if request.hash_generation == self._generation and num_full > request.num_cached_pages:
            hashes = self._page_hashes(request, num_full)
            for i in range(request.num_cached_pages, num_full):
                pool.cache(table[i], hashes[i])
            request.num_cached_pages = num_full
        return True

    def pages_to_grow(self, request: Request, num_tokens: int) -> int:
        """Pages the request's table lacks to hold num_tokens positions (sliding-window
        releases not counted: an upper bound)."""
        return max(0, cdiv(num_tokens, self.page_size) - len(request.page_table))

    def free(self, request: Request) -> None:
        """Release all pages of the request (finish, abort or preemption).

        Tail pages are freed first so they are evicted first (a prefix is only reusable up to its
        first evicted page).  Pages not fully computed yet lose their prefix hash.
        """
        table = request.page_table
        self.pool.free(reversed(table))
        for page in table[request.num_computed_tokens // self.page_size :]:
            if page != NULL_PAGE and self.pool.ref_count(page) == 0:
                self.pool.uncache(page)
        table.clear()
        request.num_cached_pages = 0

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            page_size=self.page_size,
            num_pages=self.pool.num_usable,
            pages_used=self.pool.num_used,
            pages_free=self.pool.num_free,
            pages_cached=self.pool.num_cached,
            prefix_queries=self._num_queries,
            prefix_query_tokens=self._query_tokens,
            prefix_hit_tokens=self._hit_tokens,
        )
