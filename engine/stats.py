"""Engine statistics for /slots, /props and /metrics.

`StatsCollector` (mutable, owned by EngineCore, touched only on the engine thread) accumulates
llama-server's counters and latency histograms; `EngineStats` / `SlotStats` / `HistogramData` are
immutable snapshots the server reads from any thread.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds (Prometheus-style; +Inf is implicit).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class HistogramData:
    """Cumulative histogram: counts[i] = observations <= bounds[i]; count includes +Inf."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self._bucket_counts = [0] * (len(self.bounds) + 1)  # last = above every bound
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        self._bucket_counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value
        self._count += 1

    def snapshot(self) -> HistogramData:
        cumulative, total = [], 0
        for c in self._bucket_counts[:-1]:
            total += c
            cumulative.append(total)
        return HistogramData(self.bounds, tuple(cumulative), self._sum, self._count)


@dataclass(frozen=True)
class SlotStats:
    """One entry of llama-server's /slots."""

    id: int
    n_ctx: int
    is_processing: bool
    state: str  # "idle" | "processing_prompt" | "generating"
    id_task: str  # request id of the current (or last) request, "" if never used
    n_past: int  # tokens cached in the slot's KV
    n_prompt_tokens: int
    n_decoded: int
    n_remaining: int  # -1 = unlimited
    has_next_token: bool
    stopping_word: str
    params: Any = None  # GenerationParams of the current request


@dataclass(frozen=True)
class EngineStats:
    slots: tuple[SlotStats, ...]
    n_slots: int
    n_processing: int  # slots busy now (llama.cpp: requests_processing)
    n_deferred: int  # requests waiting for a slot (llama.cpp: requests_deferred)
    kv_used_cells: int
    kv_total_cells: int
    n_prompt_tokens_processed_total: int
    t_prompt_processing_total_ms: float
    n_tokens_predicted_total: int
    t_tokens_generation_total_ms: float
    n_decode_total: int  # model.forward calls
    n_busy_slots_total: int  # sum over forward calls of busy slots
    n_requests_finished_total: int
    n_tokens_max: int  # largest slot context seen (llama.cpp: n_tokens_max)
    ttft_seconds: HistogramData = field(default_factory=lambda: Histogram(TTFT_BUCKETS).snapshot())
    inter_token_seconds: HistogramData = field(default_factory=lambda: Histogram(ITL_BUCKETS).snapshot())

    @classmethod
    def empty(cls) -> "EngineStats":
        """All zeros: what there is to report before an engine exists."""
        return StatsCollector().snapshot((), 0, (0, 0))

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_used_cells / self.kv_total_cells if self.kv_total_cells else 0.0

    @property
    def busy_slots_per_decode(self) -> float:
        return self.n_busy_slots_total / self.n_decode_total if self.n_decode_total else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        t = self.t_prompt_processing_total_ms
        return 1e3 * self.n_prompt_tokens_processed_total / t if t > 0 else 0.0

    @property
    def predicted_tokens_per_second(self) -> float:
        t = self.t_tokens_generation_total_ms
        return 1e3 * self.n_tokens_predicted_total / t if t > 0 else 0.0


class StatsCollector:
    """Counters updated by the scheduler as requests progress (engine thread only)."""

    def __init__(self) -> None:
        self.n_prompt_tokens_processed_total = 0
        self.t_prompt_processing_total_ms = 0.0
        self.n_tokens_predicted_total = 0
        self.t_tokens_generation_total_ms = 0.0
        self.n_decode_total = 0
        self.n_busy_slots_total = 0
        self.n_requests_finished_total = 0
        self.n_tokens_max = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(ITL_BUCKETS)

    def on_step(self, n_busy_slots: int) -> None:
        self.n_decode_total += 1
        self.n_busy_slots_total += n_busy_slots

    def on_prompt_done(self, request: Any, now: float) -> None:
        """First token sampled: the prompt phase of `request` is over."""
        t = request.timings(now)
        self.n_prompt_tokens_processed_total += t.prompt_n
        self.t_prompt_processing_total_ms += t.prompt_ms
        self.ttft.observe(max(0.0, now - request.arrival_time))

    def on_token(self, previous_token_time: float, now: float) -> None:
        self.inter_token.observe(max(0.0, now - previous_token_time))

    def on_finish(self, request: Any, now: float) -> None:
        t = request.timings(now)
        self.n_tokens_predicted_total += t.predicted_n
        self.t_tokens_generation_total_ms += t.predicted_ms
        self.n_requests_finished_total += 1

    def on_context_size(self, n_tokens: int) -> None:
        if n_tokens > self.n_tokens_max:
            self.n_tokens_max = n_tokens

    def snapshot(self, slots: tuple[SlotStats, ...], n_deferred: int, kv_usage: tuple[int, int]) -> EngineStats:
        return EngineStats(
            slots=slots,
            n_slots=len(slots),
            n_processing=sum(1 for s in slots if s.is_processing),
            n_deferred=n_deferred,
            kv_used_cells=int(kv_usage[0]),
            kv_total_cells=int(kv_usage[1]),
            n_prompt_tokens_processed_total=self.n_prompt_tokens_processed_total,
            t_prompt_processing_total_ms=self.t_prompt_processing_total_ms,
            n_tokens_predicted_total=self.n_tokens_predicted_total,
            t_tokens_generation_total_ms=self.t_tokens_generation_total_ms,
            n_decode_total=self.n_decode_total,
            n_busy_slots_total=self.n_busy_slots_total,
            n_requests_finished_total=self.n_requests_finished_total,
            n_tokens_max=self.n_tokens_max,
            ttft_seconds=self.ttft.snapshot(),
            inter_token_seconds=self.inter_token.snapshot(),
        )
