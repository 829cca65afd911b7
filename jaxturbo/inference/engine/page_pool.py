"""Page allocator of the paged KV cache: reference counts, an LRU free queue, the prefix-hash map.

Page 0 is the null page: never handed out; page tables use it for padding and for pages the
sliding window released.  A page whose reference count drops to 0 keeps its K/V and its prefix
hash, so a later request with the same prefix can take it back (`touch`) until the allocator
reuses it: free pages are evicted least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from jaxturbo.errors import UserError

NULL_PAGE = 0


class PagePool:
    """`num_pages` pages, ids 0..num_pages-1, of which 1..num_pages-1 are allocatable.

    Invariants: a page is in the free queue iff its reference count is 0; the null page is never
    in the free queue and never referenced; a hash maps to at most one page and back.
    """

    def __init__(self, num_pages: int) -> None:
        if not isinstance(num_pages, int) or num_pages < 2:
            raise UserError(
                f"num_pages={num_pages} must be >= 2 (page 0 is the reserved null page)"
            )
        self.num_pages = num_pages
        self._ref = [0] * num_pages
        # head = next page to allocate; pages freed later go to the tail (LRU eviction order)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
        self._hash_to_page: dict[Hashable, int] = {}
        self._page_to_hash: dict[int, Hashable] = {}

    # -- counts -----------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        """Allocatable pages (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages with no reference, cached (evictable) ones included."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix-hash map, referenced or not."""
        return len(self._hash_to_page)

    @property
    def usage(self) -> float:
        """Fraction of the allocatable pages referenced by some request."""
        return self.num_used / self.num_usable

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def free_pages(self) -> list[int]:
        """The free queue, next-to-evict first."""
        return list(self._free)

    # -- allocation -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n pages with reference count 1 taken from the head of the free queue; None (and no
        change) if fewer than n are free.  A reused page loses its prefix-hash entry."""
        if n > len(self._free):
            return None
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self.uncache(page)
            self._ref[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page, in order; pages reaching 0 join the free-queue tail
        (so pages passed first are evicted first).  The null page is skipped."""
        for page in pages:
            if page == NULL_PAGE:
                continue
            if self._ref[page] <= 0:
                raise RuntimeError(f"page {page} freed more times than it was referenced")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None

    def touch(self, pages: Iterable[int]) -> None:
        """Add one reference to each page (a prefix-cache hit), taking free ones off the queue."""
        for page in pages:
            if page == NULL_PAGE:
                raise RuntimeError("the null page cannot be referenced")
            if self._ref[page] == 0:
                del self._free[page]
            self._ref[page] += 1

    # -- prefix-hash map ----------------------------------------------------------------------
    def lookup(self, page_hash: Hashable) -> int | None:
        """The page holding the full page with this hash, if still cached."""
        return self._hash_to_page.get(page_hash)

    def page_hash(self, page: int) -> Hashable | None:
        return self._page_to_hash.get(page)

    def cache(self, page: int, page_hash: Hashable) -> bool:
        """Register a full page under its hash.  No-op (False) when the page already has a hash or
        another page already holds this hash (the first copy stays the one found)."""
        if page == NULL_PAGE or page in self._page_to_hash or page_hash in self._hash_to_page:
            return False
        self._hash_to_page[page_hash] = page
        self._page_to_hash[page] = page_hash
        return True

    def uncache(self, page: int) -> None:
        """Forget the hash of a page (its K/V are about to be overwritten or were never written)."""
        h = self._page_to_hash.pop(page, None)
        if h is not None:
            del self._hash_to_page[h]

    def reset_hashes(self) -> int:
        """Forget every prefix hash (pages stay allocated to their owners); returns how many."""
        n = len(self._hash_to_page)
        self._hash_to_page.clear()
        self._page_to_hash.clear()
        return n
