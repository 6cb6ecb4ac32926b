"""Prometheus metrics with llama-server's `llamacpp:` names, one registry per app instance.

Owns: `ServerMetrics` — totals the server observes per finished request (prompt / predicted
tokens and seconds), TTFT and inter-token latency histograms, and a collector that reads the
engine's live state (busy slots, queue, KV-cache use, decode calls) at scrape time.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server import engine_api

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class _Totals:
    """Running sums of finished requests (guarded: the collector reads from another thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.prompt_seconds = 0.0
        self.predicted_tokens = 0
        self.predicted_seconds = 0.0
        self.requests_finished = 0


class _EngineCollector:
    def __init__(self, totals: _Totals, get_engine: Callable[[], Any]):
        self._totals = totals
        self._get_engine = get_engine

    def collect(self):
        t = self._totals
        with t.lock:
            prompt_tokens, prompt_seconds = t.prompt_tokens, t.prompt_seconds
            predicted_tokens, predicted_seconds = t.predicted_tokens, t.predicted_seconds
        engine = self._get_engine()
        stats = engine_api.read_stats(engine) if engine is not None else engine_api.StatsView()
        # the engine's own totals are exact (cache hits excluded); ours are the fallback
        if stats.prompt_tokens_total is not None:
            prompt_tokens, prompt_seconds = stats.prompt_tokens_total, stats.prompt_seconds_total or 0.0
        if stats.predicted_tokens_total is not None:
            predicted_tokens, predicted_seconds = stats.predicted_tokens_total, stats.predicted_seconds_total or 0.0

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"llamacpp:{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"llamacpp:{name}", doc, value=value)

        yield counter("prompt_tokens", "Number of prompt tokens processed.", prompt_tokens)
        yield counter("prompt_seconds", "Prompt process time.", prompt_seconds)
        yield counter("tokens_predicted", "Number of generation tokens processed.", predicted_tokens)
        yield counter("tokens_predicted_seconds", "Predict process time.", predicted_seconds)
        yield counter("n_decode", "Number of model forward passes (engine steps).", stats.n_decode_total)
        busy_per_decode = stats.n_busy_slots_total / stats.n_decode_total if stats.n_decode_total else 0.0
        yield gauge("n_busy_slots_per_decode", "Average number of busy slots per engine step.", busy_per_decode)
        yield gauge(
            "prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
            prompt_tokens / prompt_seconds if prompt_seconds > 0 else 0.0,
        )
        yield gauge(
            "predicted_tokens_seconds", "Average generation throughput in tokens/s.",
            predicted_tokens / predicted_seconds if predicted_seconds > 0 else 0.0,
        )
        yield gauge(
            "kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.",
            stats.kv_used / stats.kv_total if stats.kv_total else 0.0,
        )
        yield gauge("kv_cache_tokens", "KV-cache tokens.", stats.kv_used)
        yield gauge("requests_processing", "Number of requests processing.", stats.busy_slots)
        yield gauge("requests_deferred", "Number of requests deferred.", stats.queue_length)


class ServerMetrics:
    """All metrics of one app; nothing is registered in prometheus_client's global registry."""

    def __init__(self, get_engine: Callable[[], Any]):
        self.registry = CollectorRegistry(auto_describe=True)
        self._totals = _Totals()
        self.registry.register(_EngineCollector(self._totals, get_engine))
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

    def record_finished(self, completion: Any) -> None:
        timings = completion.timings
        with self._totals.lock:
            self._totals.prompt_tokens += int(timings.get("prompt_n", 0))
            self._totals.prompt_seconds += float(timings.get("prompt_ms", 0.0)) / 1e3
            self._totals.predicted_tokens += int(timings.get("predicted_n", 0))
            self._totals.predicted_seconds += float(timings.get("predicted_ms", 0.0)) / 1e3
            self._totals.requests_finished += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
