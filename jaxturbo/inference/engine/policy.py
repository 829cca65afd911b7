"""Scheduling policies: the order of the waiting queue and the choice of preemption victims.

A policy owns the waiting queue (new and preempted requests); the scheduler admits from its head
while pages and budget allow and asks it for a victim when a running request lacks pages.  A
fair-share policy can replace `PriorityFCFS` by implementing the same protocol (it sees every
request enter through `add` and leave through `pop` / `remove`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import Protocol

from jaxturbo.inference.engine.request import Request


class SchedulingPolicy(Protocol):
    """Waiting queue plus victim choice."""

    def add(self, request: Request) -> None:
        """Enqueue a new or preempted request."""

    def peek(self) -> Request | None:
        """The request to admit next, or None when the queue is empty."""

    def pop(self) -> Request:
        """Remove and return `peek()`."""

    def remove(self, request: Request) -> bool:
        """Take a request out of the queue (abort); False if it was not queued."""

    def select_victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt when pages run out (may be the one asking)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]:
        """Queued requests in admission order."""


class PriorityFCFS:
    """Lower `priority` first, ties by arrival; the victim is the running request with the
    largest (priority, arrival).  A preempted request keeps its arrival, so it goes back ahead of
    every request of its priority that arrived after it."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str]] = []
        self._queued: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        if request.request_id in self._queued:
            raise RuntimeError(f"request {request.request_id!r} is already waiting")
        self._queued[request.request_id] = request
        heapq.heappush(self._heap, (request.priority, request.arrival, request.request_id))

    def _drop_stale(self) -> None:
        # removals are lazy: an entry is live only while its request is queued with that arrival
        while self._heap:
            _, arrival, rid = self._heap[0]
            r = self._queued.get(rid)
            if r is not None and r.arrival == arrival:
                return
            heapq.heappop(self._heap)

    def peek(self) -> Request | None:
        self._drop_stale()
        return self._queued[self._heap[0][2]] if self._heap else None

    def pop(self) -> Request:
        self._drop_stale()
        if not self._heap:
            raise IndexError("pop from an empty waiting queue")
        return self._queued.pop(heapq.heappop(self._heap)[2])

    def remove(self, request: Request) -> bool:
        return self._queued.pop(request.request_id, None) is not None

    def select_victim(self, running: Sequence[Request]) -> Request:
        return max(running, key=lambda r: r.sort_key)

    def __len__(self) -> int:
        return len(self._queued)

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted(self._queued.values(), key=lambda r: r.sort_key))
