"""Prometheus metrics of a server (GET /metrics, Prometheus text format).

Each server has its own registry (several servers in one process, e.g. tests, do not mix).
Counters and latency histograms are updated on the event loop as outputs arrive; the engine's
gauges (requests running / waiting, KV pages, prefix-cache hit rate, preemptions) are read at
scrape time from the worker's statistics snapshot, never from the engine itself.

    jaxturbo_num_requests_running / _waiting      samples the scheduler runs / queues
    jaxturbo_kv_pages_used / _free / _total       the KV page pool (cached prefix pages are free)
    jaxturbo_prefix_cache_hit_rate                prompt tokens found in the prefix cache
    jaxturbo_num_preemptions_total
    jaxturbo_requests_in_flight                   HTTP generation requests not answered yet
    jaxturbo_time_to_first_token_seconds          histogram, per sample
    jaxturbo_inter_token_latency_seconds          histogram, per generated token after the first
    jaxturbo_e2e_request_latency_seconds          histogram, per sample, arrival to last token
    jaxturbo_prompt_tokens_total / jaxturbo_generation_tokens_total
    jaxturbo_request_success_total{finish_reason}   finished samples: stop, length, abort
    jaxturbo_request_errors_total{status,code}      error answers (400, 401, 404, 429, 503, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxturbo.inference.engine.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)


class _EngineCollector(Collector):
    """Gauges read at scrape time from the worker's engine statistics snapshot."""

    def __init__(self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int]):
        self._stats, self._in_flight = stats, in_flight

    def collect(self) -> Iterator:
        yield GaugeMetricFamily(
            "jaxturbo_requests_in_flight",
            "HTTP generation requests not answered yet",
            self._in_flight(),
        )
        s = self._stats()
        if s is None:  # the engine is still being built
            return
        for name, doc, value in (
            ("num_requests_running", "samples the scheduler runs", s.num_running),
            ("num_requests_waiting", "samples waiting to run", s.num_waiting),
            ("kv_pages_used", "KV pages held by requests", s.kv_pages_used),
            ("kv_pages_free", "KV pages free (cached prefix pages included)", s.kv_pages_free),
            ("kv_pages_total", "usable KV pages in the pool", s.kv_pages_total),
            (
                "prefix_cache_hit_rate",
                "prompt tokens found in the prefix cache over tokens looked up",
                s.prefix_hit_rate,
            ),
        ):
            yield GaugeMetricFamily(f"jaxturbo_{name}", doc, value)
        yield CounterMetricFamily(
            "jaxturbo_num_preemptions", "samples preempted (recomputed)", s.num_preemptions
        )


class ServerMetrics:
    """The server's metrics (see the module docstring).  stats / in_flight: callables giving the
    engine statistics snapshot (or None) and the count of requests in flight."""

    def __init__(
        self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int]
    ) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "jaxturbo_time_to_first_token_seconds",
            "arrival to the first generated token, per sample",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jaxturbo_inter_token_latency_seconds",
            "time between consecutive generated tokens of a sample",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxturbo_e2e_request_latency_seconds",
            "arrival to the last generated token, per sample",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "jaxturbo_prompt_tokens",
            "prompt tokens of admitted requests (once per prompt)",
            registry=r,
        )
        self.generation_tokens = Counter(
            "jaxturbo_generation_tokens", "generated tokens", registry=r
        )
        self.finished = Counter(
            "jaxturbo_request_success",
            "finished samples by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            "jaxturbo_request_errors",
            "error answers by HTTP status and code",
            ["status", "code"],
            registry=r,
        )
        r.register(_EngineCollector(stats, in_flight))

    def render(self) -> bytes:
        return generate_latest(self.registry)
