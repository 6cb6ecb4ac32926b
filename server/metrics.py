"""Prometheus metrics with llama-server's `llamacpp:` names, one registry per app instance.

Owns: `ServerMetrics` — TTFT and inter-token latency histograms the server observes, and a
collector that reads the engine's `EngineStats` at scrape time (token and time totals, busy
slots, queue, KV-cache use, decode calls).
"""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ggserve.server import engine_api

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Reads the engine's EngineStats at scrape time (its totals are exact: cache hits excluded)."""

    def __init__(self, get_engine: Callable[[], Any]):
        self._get_engine = get_engine

    def collect(self):
        stats = engine_api.read_stats(self._get_engine())
        prompt_seconds = stats.t_prompt_processing_total_ms / 1e3
        predicted_seconds = stats.t_tokens_generation_total_ms / 1e3

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"llamacpp:{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"llamacpp:{name}", doc, value=value)

        yield counter("prompt_tokens", "Number of prompt tokens processed.", stats.n_prompt_tokens_processed_total)
        yield counter("prompt_seconds", "Prompt process time.", prompt_seconds)
        yield counter("tokens_predicted", "Number of generation tokens processed.", stats.n_tokens_predicted_total)
        yield counter("tokens_predicted_seconds", "Predict process time.", predicted_seconds)
        yield counter("n_decode", "Number of model forward passes (engine steps).", stats.n_decode_total)
        yield gauge("n_busy_slots_per_decode", "Average number of busy slots per engine step.",
                    stats.busy_slots_per_decode)
        yield gauge("prompt_tokens_seconds", "Average prompt throughput in tokens/s.", stats.prompt_tokens_per_second)
        yield gauge("predicted_tokens_seconds", "Average generation throughput in tokens/s.",
                    stats.predicted_tokens_per_second)
        yield gauge("kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", stats.kv_usage_ratio)
        yield gauge("kv_cache_tokens", "KV-cache tokens.", stats.kv_used_cells)
        yield gauge("requests_processing", "Number of requests processing.", stats.n_processing)
        yield gauge("requests_deferred", "Number of requests deferred.", stats.n_deferred)


class ServerMetrics:
    """All metrics of one app; nothing is registered in prometheus_client's global registry."""

    def __init__(self, get_engine: Callable[[], Any]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(get_engine))
        self.ttft = Histogram(
            "llamacpp:time_to_first_token_seconds", "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.inter_token = Histogram(
            "llamacpp:inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
            buckets=ITL_BUCKETS, registry=self.registry,
        )

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
