"""The synchronous engine: `EngineCore.step()` = schedule -> run the model -> update.

Owns `EngineConfig` (slots, per-slot context, batch budget, context shift, slot similarity) and
builds each request's Sampler and StopChecker (`prepare`, thread-safe, so it can run off the
engine thread). No threads and no asyncio here, so tests drive
it step by step; engine/async_engine.py runs it on a background thread.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ggserve.engine.request import GenerationParams, PromptTooLongError, Request, RequestOutput, new_request_id
from ggserve.engine.runner import ModelRunner
from ggserve.engine.scheduler import Scheduler
from ggserve.engine.stats import EngineStats, StatsCollector
from ggserve.engine.stop import StopChecker


@dataclass(frozen=True)
class EngineConfig:
    """llama-server flags in comments."""

    n_slots: int = 4  # -np / --parallel
    n_ctx: int = 4096  # context per slot (llama-server's -c divided by -np); 0 = model's n_ctx_train
    batch_size: int = 2048  # -b: max tokens per forward call (decode tokens + prompt chunks)
    context_shift: bool = False  # --context-shift: drop half of the context instead of stopping
    slot_prompt_similarity: float = 0.5  # -sps: min cached-prefix fraction to prefer a slot; 0 = off
    cache_reuse: int = 0  # --cache-reuse: min matching chunk moved into place by KV shifting; 0 = off
    n_predict: int = -1  # -n: default max tokens when a request sets none; -1 = unlimited
    max_queue: int = 256  # requests allowed to wait for a slot before EngineBusyError (503)
    kv_dtype: str = "f16"  # --cache-type-k/v
    special: bool = False  # -sp / --special: render special tokens in the output text
    repack: bool = True  # False = --no-repack: weights stay in the memory-mapped file

    def __post_init__(self) -> None:
        if self.n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {self.n_slots}")
        if self.n_ctx != 0 and self.n_ctx < 8:
            raise ValueError(f"n_ctx (per slot) must be >= 8 or 0 (= model's), got {self.n_ctx}")
        if self.batch_size < self.n_slots:
            # every generating slot contributes one token per step
            raise ValueError(f"batch_size ({self.batch_size}) must be >= n_slots ({self.n_slots})")
        if not 0.0 <= self.slot_prompt_similarity <= 1.0:
            raise ValueError(f"slot_prompt_similarity must be in [0, 1], got {self.slot_prompt_similarity}")
        if self.cache_reuse < 0:
            raise ValueError(f"cache_reuse must be >= 0, got {self.cache_reuse}")
        if self.n_predict < -1:
            raise ValueError(f"n_predict must be >= -1, got {self.n_predict}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.kv_dtype not in ("f16", "f32"):
            raise ValueError(f"kv_dtype must be 'f16' or 'f32', got {self.kv_dtype!r}")


class EngineCore:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig,
        *,
        sampler_factory: Callable[[GenerationParams], Any] | None = None,
        detokenizer_factory: Callable[[], Any] | None = None,
    ):
        kv = model.kv_cache
        if kv.n_slots != config.n_slots or kv.n_ctx != config.n_ctx:
            raise ValueError(
                f"model KV cache has {kv.n_slots} slots x {kv.n_ctx} tokens but the config asks for "
                f"{config.n_slots} x {config.n_ctx}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.stats_collector = StatsCollector()
        self.scheduler = Scheduler(config, kv, add_bos=bool(getattr(tokenizer, "add_bos", False)), stats=self.stats_collector)
        eog_ids = frozenset(getattr(tokenizer, "eog_ids", frozenset()))
        self._vocab = None  # GrammarVocab, built on first use
        self._vocab_lock = threading.Lock()
        self.runner = ModelRunner(model, batch_size=config.batch_size)
        self._sampler_factory = sampler_factory or self._default_sampler_factory(model.n_vocab, eog_ids)
        self._detokenizer_factory = detokenizer_factory or self._default_detokenizer_factory()

    def _default_sampler_factory(self, n_vocab: int, eog_ids: frozenset[int]):
        from ggserve.engine.sampling.sampler import Sampler

        def make(params: GenerationParams):
            sampling = params.sampling
            # Grammars and DRY need every token's bytes; built once (about a second), then shared.
            # DRY is on for any non-zero multiplier, as in llama.cpp (a negative one too).
            needs_vocab = getattr(sampling, "grammar", None) or getattr(sampling, "dry_multiplier", 0) != 0
            vocab = self._grammar_vocab(eog_ids) if needs_vocab else None
            return Sampler(sampling, n_vocab, eog_ids=eog_ids, token_bytes=vocab, n_ctx=self.config.n_ctx,
                           tokenizer=self.tokenizer)

        return make

    def _grammar_vocab(self, eog_ids: frozenset[int]):
        with self._vocab_lock:  # requests are prepared on several worker threads
            if self._vocab is None:
                from ggserve.engine.grammar.vocab import GrammarVocab

                pieces = [self.tokenizer.token_to_piece(i, special=True) for i in range(self.model.n_vocab)]
                self._vocab = GrammarVocab(pieces, eog_ids)
        return self._vocab

    def _default_detokenizer_factory(self):
        tokenizer, special = self.tokenizer, self.config.special

        def make():
            from ggserve.engine.tokenizer import IncrementalDetokenizer

            return IncrementalDetokenizer(tokenizer, special=special)

        return make

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: GenerationParams) -> None:
        """Reject what can never run (raised to the caller before queueing)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt_ids) >= self.config.n_ctx:
            raise PromptTooLongError(len(prompt_ids), self.config.n_ctx)
        if params.id_slot >= self.config.n_slots:
            raise ValueError(f"id_slot {params.id_slot} does not exist (n_slots = {self.config.n_slots})")
        n_vocab = self.model.n_vocab
        bad = [t for t in prompt_ids if not 0 <= int(t) < n_vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} out of range [0, {n_vocab})")

    def prepare(
        self,
        prompt_ids: list[int],
        params: GenerationParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """The request, validated and with its sampler (grammar tables, DRY breakers, logit
        biases) and stop checker built, but not queued. Thread-safe: the async front runs it on
        a worker thread so that no request's preparation holds up the engine thread."""
        params = params if params is not None else GenerationParams()
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate(prompt_ids, params)
        is_eog = getattr(self.tokenizer, "is_eog", lambda token_id: False)
        return Request(
            request_id or new_request_id(),
            prompt_ids,
            params,
            sampler=self._sampler_factory(params),
            stop_checker=StopChecker(self._detokenizer_factory(), params.stop, is_eog, params.ignore_eos),
            arrival_time=arrival_time,
        )

    def add_prepared(self, request: Request) -> Request:
        """Queue a request built by `prepare` (engine thread: cheap)."""
        self.scheduler.add_request(request)
        return request

    def add_request(
        self,
        prompt_ids: list[int],
        params: GenerationParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        return self.add_prepared(self.prepare(prompt_ids, params, request_id, arrival_time))

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.scheduler.abort(request_id)

    def abort_all(self) -> list[RequestOutput]:
        ids = [r.request_id for r in list(self.scheduler.running) + list(self.scheduler.waiting)]
        return [out for out in (self.abort(i) for i in ids) if out is not None]

    def reset_after_error(self) -> list[RequestOutput]:
        """After a failed step: abort everything and clear every slot (its K/V may be half written)."""
        outputs = self.abort_all()
        for slot_id in range(self.config.n_slots):
            self.model.kv_cache.clear(slot_id)
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return list(sched.finished)
        sampled = self.runner.execute(sched)
        return self.scheduler.update(sched, sampled)

    def embed(self, prompt_ids: list[int]) -> np.ndarray | None:
        """Embedding of a prompt in an idle slot; None when every slot is busy (retry later)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt_ids) > self.config.n_ctx:
            raise PromptTooLongError(len(prompt_ids), self.config.n_ctx)
        slot_id = self.scheduler.acquire_idle_slot()
        if slot_id is None:
            return None
        return self.runner.embed(slot_id, [int(t) for t in prompt_ids])

    def _idle_slot(self, slot_id: int) -> int:
        if not 0 <= slot_id < self.config.n_slots:
            raise ValueError(f"slot {slot_id} does not exist (0..{self.config.n_slots - 1})")
        if not self.scheduler.slots[slot_id].is_idle:
            raise ValueError(f"slot {slot_id} is processing a request; try again when it is idle")
        return slot_id

    def save_slot(self, slot_id: int, path: str) -> int:
        """Save an idle slot's cached prompt (tokens + K/V) to a file; returns the token count.

        The slot is checked before the file is touched, and the file is written beside its final
        name and renamed into place: a busy slot or a failed write leaves an existing file intact."""
        slot_id = self._idle_slot(slot_id)
        directory, name = os.path.split(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{name[:64]}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:  # a file object: numpy must not append ".npz" to the name
                n_tokens = self.model.kv_cache.save_slot(slot_id, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return n_tokens

    def restore_slot(self, slot_id: int, path: str) -> int:
        with open(path, "rb") as f:
            return self.model.kv_cache.restore_slot(self._idle_slot(slot_id), f)

    def erase_slot(self, slot_id: int) -> int:
        kv_cache = self.model.kv_cache
        n_erased = kv_cache.num_cached(self._idle_slot(slot_id))
        kv_cache.clear(slot_id)
        return n_erased

    def stats(self) -> EngineStats:
        return self.stats_collector.snapshot(
            self.scheduler.slot_stats(), self.scheduler.num_waiting, self.model.kv_cache.usage()
        )
