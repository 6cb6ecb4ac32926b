"""Slots and continuous batching: which tokens of which requests go into the next forward call.

Pure Python over a KV cache interface (no model): a FIFO waiting queue; slot choice like
llama-server (pinned `id_slot`, else the idle slot whose cached tokens best match the prompt,
else the least recently used idle slot); prompt-prefix reuse from the slot's cache; one flat
batch per step with every generating slot's next token FIRST, then prompt chunks within the
token budget (`batch_size`); context-full handling (finish with `length`, or context shift);
and `update()`, which appends sampled tokens, applies stop conditions and frees finished slots.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ggserve.engine.request import Request, RequestOutput, RequestStatus, StopType, TokenProbs
from ggserve.engine.stats import SlotStats, StatsCollector

if TYPE_CHECKING:
    from ggserve.engine.core import EngineConfig


# A waiting request holds back for a running one's prefill when their prompts share at least
# this many leading tokens (shorter shared prefixes are not worth the wait).
MIN_SHARED_PREFILL_TO_WAIT = 16


@dataclass
class Slot:
    slot_id: int
    request: Request | None = None
    last_request_id: str = ""
    t_last_used: int = -1  # release order; -1 = never used (LRU picks those first)

    @property
    def is_idle(self) -> bool:
        return self.request is None


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start_pos, start_pos + len(token_ids)) of one request's context, for one slot."""

    request: Request
    slot_id: int
    start_pos: int
    token_ids: list[int]
    sample: bool  # the chunk ends at the request's last token: sample from its logits


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: TokenProbs | None = None
    error: str | None = None  # sampling failed for this request only (e.g. a dead-end grammar)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    finished: list[RequestOutput] = field(default_factory=list)  # ended while scheduling

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    # a[:n] (n,) == b[:n] (n,) -> index of the first mismatch
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache: Any, add_bos: bool = False, stats: StatsCollector | None = None):
        self.config = config
        self.kv_cache = kv_cache
        self.add_bos = add_bos  # llama-server keeps the BOS on top of n_keep when shifting
        self.stats = stats if stats is not None else StatsCollector()
        self.slots = [Slot(i) for i in range(config.n_slots)]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self._release_counter = 0

    # ---- queue -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def find(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a waiting or running request with `abort` and free its slot now."""
        request = self.find(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.finish(RequestStatus.FINISHED_ABORTED)
        text = request.stop_checker.flush() if request.stop_checker is not None else ""
        return self._finish(request, [], text, None, time.perf_counter())

    # ---- schedule ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._handle_full_contexts(out)
        self._admit_waiting()
        budget = self.config.batch_size
        # Generating slots first: one token each, so a long prompt never stalls running streams.
        for request in self.running:
            if not request.is_prefilling:
                start = request.num_computed_tokens
                out.chunks.append(ScheduledChunk(request, request.slot_id, start, request.tokens[start:], True))
                budget -= request.num_tokens - start
        # Then prompt chunks, oldest admission first, until the token budget is spent.
        for request in self.running:
            if budget <= 0:
                break
            if request.is_prefilling:
                start = request.num_computed_tokens
                n = min(request.num_tokens - start, budget)
                ends_prompt = start + n == request.num_tokens
                out.chunks.append(
                    ScheduledChunk(request, request.slot_id, start, request.tokens[start : start + n], ends_prompt)
                )
                budget -= n
        if out.chunks:
            self.stats.on_step(len(self.running))
        return out

    def _handle_full_contexts(self, out: SchedulerOutput) -> None:
        """Context shift for generating slots whose next token would not fit (if enabled)."""
        n_ctx = self.config.n_ctx
        for request in list(self.running):
            if request.is_prefilling or request.num_tokens < n_ctx:
                continue
            # Only reachable with context_shift (otherwise update() already finished it).
            n_keep = len(request.prompt_ids) if request.params.n_keep < 0 else request.params.n_keep
            n_keep = max(0, min(n_ctx - 4, n_keep + int(self.add_bos)))
            n_left = request.num_computed_tokens - n_keep
            n_discard = n_left // 2
            if n_discard <= 0:
                request.truncated = True
                request.finish(RequestStatus.FINISHED_LENGTH, StopType.LIMIT)
                out.finished.append(self._finish(request, [], request.stop_checker.flush(), None, time.perf_counter()))
                continue
            self.kv_cache.shift(request.slot_id, n_keep, n_discard)
            del request.tokens[n_keep : n_keep + n_discard]
            request.num_computed_tokens -= n_discard
            request.truncated = True

    def _admit_waiting(self) -> None:
        idle = [s for s in self.slots if s.is_idle]
        for request in list(self.waiting):
            if not idle:
                break
            if self._should_wait_for_shared_prefill(request):
                continue  # keeps its place; admitted (and forked) once that prompt is computed
            slot = self._pick_slot(request, idle)
            if slot is None:  # pinned to a busy slot: it keeps its place, others may go first
                continue
            idle.remove(slot)
            self.waiting.remove(request)
            self._assign(request, slot)

    def _pick_slot(self, request: Request, idle: list[Slot]) -> Slot | None:
        if request.params.id_slot >= 0:
            return next((s for s in idle if s.slot_id == request.params.id_slot), None)
        threshold = self.config.slot_prompt_similarity
        if threshold > 0:
            # llama-server: among idle slots whose cache keeps more than `threshold` of itself
            # when matched against the prompt, take the longest common prefix.
            best, best_lcp = None, 0
            for slot in idle:
                cached = self.kv_cache.cached_tokens(slot.slot_id)
                if not cached:
                    continue
                lcp = common_prefix_len(cached, request.prompt_ids)
                if lcp > best_lcp and lcp / len(cached) > threshold:
                    best, best_lcp = slot, lcp
            if best is not None:
                return best
        return min(idle, key=lambda s: s.t_last_used)  # least recently used; ties -> lowest id

    def _should_wait_for_shared_prefill(self, request: Request) -> bool:
        """True while a running request is still computing a long prefix this prompt shares.

        The n choices of one request (and clients sending the same long system prompt) arrive
        together: instead of every slot computing the same prompt, the others wait for the first
        and then copy its K/V (see `_assign`), so the prompt is prefilled once.
        """
        if not request.params.cache_prompt:
            return False
        for other in self.running:
            if other.is_prefilling:
                shared = common_prefix_len(other.prompt_ids, request.prompt_ids)
                if shared >= MIN_SHARED_PREFILL_TO_WAIT and shared > other.num_computed_tokens:
                    return True
        return False

    def _assign(self, request: Request, slot: Slot) -> None:
        n_past = 0
        if request.params.cache_prompt:
            # Recompute at least the last prompt token: its logits give the first sampled token.
            limit = len(request.prompt_ids) - 1
            n_past = min(common_prefix_len(self.kv_cache.cached_tokens(slot.slot_id), request.prompt_ids), limit)
            # Another slot (busy or idle) may hold a longer prefix: copy its cells instead of
            # recomputing them.
            source, n_source = None, n_past
            for other in self.slots:
                if other is not slot:
                    n = min(common_prefix_len(self.kv_cache.cached_tokens(other.slot_id), request.prompt_ids), limit)
                    if n > n_source:
                        source, n_source = other, n
            if source is not None:
                self.kv_cache.copy_prefix(source.slot_id, slot.slot_id, n_source)
                n_past = n_source
            elif self.config.cache_reuse > 0:
                n_past = self._reuse_shifted_chunks(slot.slot_id, request.prompt_ids, n_past, limit)
        if self.kv_cache.num_cached(slot.slot_id) > n_past:
            self.kv_cache.truncate(slot.slot_id, n_past)
        slot.request = request
        slot.last_request_id = request.request_id
        request.slot_id = slot.slot_id
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = n_past
        request.cache_n = n_past
        request.t_prompt_start = time.perf_counter()
        self.running.append(request)

    def _reuse_shifted_chunks(self, slot_id: int, prompt: list[int], n_past: int, limit: int) -> int:
        """llama-server's --cache-reuse: after the common prefix, cached chunks of at least
        `cache_reuse` tokens that reappear later in the prompt are slid into place (K re-roped)
        instead of being recomputed; the cells between are dropped. Returns the new n_past."""
        cached = self.kv_cache.cached_tokens(slot_id)
        head_c = head_p = n_past  # cursor in the cache / in the prompt
        while head_c < len(cached) and head_p < limit:
            n_match = 0
            while (head_c + n_match < len(cached) and head_p + n_match < limit
                   and cached[head_c + n_match] == prompt[head_p + n_match]):
                n_match += 1
            if n_match >= self.config.cache_reuse:
                if head_c > head_p:  # drop cells [head_p, head_c): the chunk slides down to head_p
                    self.kv_cache.shift(slot_id, head_p, head_c - head_p)
                    del cached[head_p:head_c]
                    head_c = head_p
                head_c += n_match
                head_p += n_match
                n_past = head_p
            else:
                head_c += 1
        return n_past

    def acquire_idle_slot(self) -> int | None:
        """An idle slot for a synchronous job (embeddings), least recently used; None if all busy."""
        idle = [s for s in self.slots if s.is_idle]
        if not idle:
            return None
        slot = min(idle, key=lambda s: s.t_last_used)
        self._release_counter += 1
        slot.t_last_used = self._release_counter
        return slot.slot_id

    # ---- update ------------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = list(sched.finished)
        for chunk in sched.chunks:
            request = chunk.request
            if request.is_finished:
                continue
            request.num_computed_tokens += len(chunk.token_ids)
            self.stats.on_context_size(request.num_computed_tokens)
            if not chunk.sample:
                continue
            if self._max_tokens(request) == 0:  # prompt only (e.g. to warm the cache)
                request.finish(RequestStatus.FINISHED_LENGTH, StopType.LIMIT)
                outputs.append(self._finish(request, [], "", None, now))
                continue
            sample = sampled[request.request_id]
            if sample.error is not None:
                request.error = sample.error
                request.finish(RequestStatus.FINISHED_ABORTED)
                outputs.append(self._finish(request, [], request.stop_checker.flush(), None, now))
                continue
            outputs.append(self._append_token(request, sample, now))
        return outputs

    def _append_token(self, request: Request, sample: SampledToken, now: float) -> RequestOutput:
        token_id = sample.token_id
        request.tokens.append(token_id)
        request.output_ids.append(token_id)
        if request.t_first_token is None:
            request.t_first_token = now
            self.stats.on_prompt_done(request, now)
        else:
            self.stats.on_token(request.t_last_token, now)
        request.t_last_token = now
        result = request.stop_checker.add(token_id)
        text = result.text
        max_tokens = self._max_tokens(request)
        if result.stop_type is not StopType.NONE:
            request.finish(RequestStatus.FINISHED_STOPPED, result.stop_type, result.stopping_word)
        elif max_tokens != -1 and request.n_decoded >= max_tokens:
            request.finish(RequestStatus.FINISHED_LENGTH, StopType.LIMIT)
        elif not self.config.context_shift and request.num_tokens >= self.config.n_ctx:
            # The next token would not fit the slot (llama-server: "context shift is disabled").
            request.truncated = True
            request.finish(RequestStatus.FINISHED_LENGTH, StopType.LIMIT)
        logprobs = [sample.logprobs] if sample.logprobs is not None else None
        if request.is_finished:
            if request.stop_type is StopType.LIMIT:
                text += request.stop_checker.flush()
            return self._finish(request, [token_id], text, logprobs, now)
        return self._output(request, [token_id], text, logprobs, now)

    def _max_tokens(self, request: Request) -> int:
        n = request.params.max_tokens
        return n if n != -1 else self.config.n_predict

    def _finish(self, request: Request, token_ids: list[int], text: str, logprobs, now: float) -> RequestOutput:
        """Release the request's slot (its KV stays cached for prefix reuse) and build its last delta."""
        if request in self.running:
            self.running.remove(request)
            slot = self.slots[request.slot_id]
            slot.request = None
            self._release_counter += 1
            slot.t_last_used = self._release_counter
        self.stats.on_finish(request, now)
        return self._output(request, token_ids, text, logprobs, now)

    def _output(self, request: Request, token_ids: list[int], text: str, logprobs, now: float) -> RequestOutput:
        reason = request.status.finish_reason
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finish_reason=reason.value if reason is not None else None,
            stop_type=request.stop_type.value,
            stopping_word=request.stopping_word,
            logprobs=logprobs,
            timings=request.timings(now),
            slot_id=request.slot_id,
            n_prompt_tokens=len(request.prompt_ids),
            truncated=request.truncated,
            error=request.error,
        )

    # ---- stats -------------------------------------------------------------------------------
    def slot_stats(self) -> tuple[SlotStats, ...]:
        result = []
        for slot in self.slots:
            r = slot.request
            if r is None:
                state, n_prompt, n_decoded, n_remaining = "idle", 0, 0, -1
            else:
                state = "processing_prompt" if r.is_prefilling else "generating"
                n_prompt, n_decoded = len(r.prompt_ids), r.n_decoded
                max_tokens = self._max_tokens(r)
                n_remaining = -1 if max_tokens == -1 else max(0, max_tokens - n_decoded)
            result.append(
                SlotStats(
                    id=slot.slot_id,
                    n_ctx=self.config.n_ctx,
                    is_processing=r is not None,
                    state=state,
                    id_task=slot.last_request_id,
                    n_past=int(self.kv_cache.num_cached(slot.slot_id)),
                    n_prompt_tokens=n_prompt,
                    n_decoded=n_decoded,
                    n_remaining=n_remaining,
                    has_next_token=r is not None,
                    stopping_word=r.stopping_word if r is not None else "",
                    params=r.params if r is not None else None,
                )
            )
        return tuple(result)
