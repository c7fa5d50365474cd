"""Prometheus metrics, one registry per app. Engine-state gauges are read at scrape time, from
`Engine.stats()` (live queue lengths, KV blocks in use, prefix-cache hit rate)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from lowbit.runtime.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        used = stats.num_blocks - stats.num_free_blocks
        gauges = {
            "lowbit_num_requests_waiting": ("Sequences waiting to be scheduled.", stats.num_waiting),
            "lowbit_num_requests_running": ("Sequences in the running batch.", stats.num_running),
            "lowbit_kv_blocks_used": ("KV cache blocks held by sequences.", used),
            "lowbit_kv_blocks_total": ("KV cache blocks in the pool.", stats.num_blocks),
            "lowbit_prefix_cache_hit_rate": ("Share of prompt tokens served from the prefix cache.",
                                             stats.prefix_cache_hit_rate),
            "lowbit_num_preemptions": ("Sequences preempted since start.", stats.num_preemptions),
        }  # fmt: skip
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats]):
        """`engine_stats` is read at every scrape (`Engine.stats`)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lowbit_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "lowbit_time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "lowbit_inter_token_latency_seconds",
            "Time between streamed tokens.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "lowbit_http_requests_in_flight", "Generation requests being served.", registry=r
        )
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
