"""asyncio front of the engine: EngineCore on ONE background thread, results as async iterators.

The engine thread blocks on its inbox while there is nothing to do (no busy spin), otherwise it
drains the inbox (new requests, aborts, embeddings, shutdown) and runs one `EngineCore.step()`
per iteration. Each request's deltas go to its own asyncio.Queue through
`loop.call_soon_threadsafe`. A bounded waiting queue turns overload into EngineBusyError (503).

A request is prepared (validated, its sampler's grammar / DRY / bias tables built) by `prepare`,
which callers run on a worker thread; the engine thread only queues prepared requests, so no
request's setup cost holds up the others' tokens.

The engine thread is supervised: an exception anywhere in its loop fails the requests in flight
(each stream ends with an EngineError) and the loop goes on with a reset core; if it cannot
recover (MAX_CONSECUTIVE_FAILURES in a row, or a BaseException) the thread stops, `failure` says
why, and every wait on it (streams, embeddings, slot jobs) ends with an EngineError instead of
waiting forever.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np

from ggserve.engine.core import EngineCore
from ggserve.engine.request import (
    EngineBusyError,
    EngineError,
    GenerationParams,
    PromptTooLongError,
    Request,
    RequestOutput,
)
from ggserve.engine.stats import EngineStats

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # loop iterations failing in a row before the engine gives up
LIVENESS_POLL_SECONDS = 1.0  # how often a waiter checks that the engine thread is still alive


@dataclass
class _Stream:
    """Where one request's outputs go (the caller's event loop and queue)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    request: Request  # prepared (EngineCore.prepare)
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Embed:
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class _SlotJob:
    """A save/restore/erase of a slot's cache, run on the engine thread between steps."""

    method: str
    args: tuple
    future: concurrent.futures.Future


@dataclass
class _Shutdown:
    drain: bool


class AsyncEngine:
    def __init__(self, core: EngineCore, max_queue: int | None = None, tokenizer: Any = None, model_info: Any = None):
        self.core = core
        self.config = core.config
        self.tokenizer = tokenizer if tokenizer is not None else core.tokenizer
        self.model_info = model_info
        self.max_queue = core.config.max_queue if max_queue is None else max_queue
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._n_inflight = 0  # submitted and not yet finished (guarded by _lock)
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._pending_embeds: list[_Embed] = []  # engine thread only: waiting for an idle slot
        self._stats: EngineStats = core.stats()
        self._closed = False
        self.failure: str | None = None  # why the engine thread stopped on its own (None: it did not)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is not None:
            return
        if self._closed:
            raise RuntimeError("the engine was shut down")
        self._thread = threading.Thread(target=self._run, name="ggserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_dead(self) -> bool:
        """The engine thread stopped without being asked to (see `failure`)."""
        return self._thread is not None and not self._thread.is_alive() and not self._closed

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> bool:
        """Stop the engine thread: abort in-flight requests (or let them finish with drain=True).
        Waits at most `timeout` seconds (None: until it stops); returns whether it stopped. The
        thread is a daemon, so a step that never returns cannot keep the process alive."""
        if self._closed:
            return not self.is_running
        self._closed = True
        if self._thread is None:
            return True
        self._inbox.put(_Shutdown(drain))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- requests ----------------------------------------------------------------------------
    def prepare(self, prompt_ids: list[int], params: GenerationParams | None = None,
                request_id: str | None = None) -> Request:
        """Blocking, thread-safe: validate and build the request (its sampler included). Run it
        on a worker thread and pass the result to `generate(..., prepared=...)`. Raises
        PromptTooLongError / ValueError for a request that can never run."""
        self._check_alive()
        return self.core.prepare(prompt_ids, params, request_id=request_id)

    def generate(
        self, prompt_ids: list[int], params: GenerationParams | None = None, request_id: str | None = None,
        prepared: Request | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a completion; iterate the result for its deltas (the last has finish_reason set).

        `prepared` is `prepare(prompt_ids, params, request_id)`'s result; without it the request is
        prepared here, on the caller's thread. Raises right away (not on first iteration):
        PromptTooLongError / ValueError for a request that can never run, EngineBusyError when
        the waiting queue is full, EngineError when the engine is stopped. Must be called from a
        running event loop. Closing or cancelling the iterator aborts the request.
        """
        request = prepared if prepared is not None else self.prepare(prompt_ids, params, request_id)
        self._check_alive()
        with self._lock:
            if self._n_inflight >= self.config.n_slots + self.max_queue:
                raise EngineBusyError(
                    f"the server is busy: {self._n_inflight} requests in flight "
                    f"({self.config.n_slots} slots + {self.max_queue} queued)"
                )
            self._n_inflight += 1
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(_Add(request, stream))
        return self._iterate(request.request_id, stream)

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineError("the engine is shut down")
        if self.is_dead:
            raise EngineError(f"the engine stopped: {self.failure or 'unknown error'}")

    async def _next_item(self, stream: _Stream) -> Any:
        """The stream's next item; an EngineError once the engine thread is gone and nothing more
        can come (a wait on a dead engine must not last forever). asyncio.wait, not wait_for:
        Python 3.11's wait_for can swallow a cancellation that races with a result, and a client
        that went away must always abort its request."""
        getter = asyncio.ensure_future(stream.queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=LIVENESS_POLL_SECONDS)
                if done:
                    return getter.result()
                if self._thread is not None and not self._thread.is_alive() and stream.queue.empty():
                    return EngineError(f"the engine stopped: {self.failure or 'shut down'}")
        finally:
            getter.cancel()

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await self._next_item(stream)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.is_finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:  # client went away (cancelled / closed early)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its slot is free before the next step."""
        self._inbox.put(_Abort(request_id))

    async def embed(self, prompt_ids: list[int]) -> np.ndarray:
        """Mean-pooled, L2-normalised embedding (n_embd,) of the prompt."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt_ids) > self.config.n_ctx:
            raise PromptTooLongError(len(prompt_ids), self.config.n_ctx)
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Embed(prompt_ids, loop, future))
        while not future.done():
            await asyncio.wait({future}, timeout=LIVENESS_POLL_SECONDS)
            if not future.done() and not self.is_running:
                future.cancel()
                raise EngineError(f"the engine stopped: {self.failure or 'shut down'}")
        return future.result()

    def _slot_job(self, method: str, *args: Any) -> int:
        # Blocking: the server calls these from a worker thread, never the event loop.
        if not self.is_running:
            raise EngineError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_SlotJob(method, args, future))
        while True:
            try:
                return future.result(timeout=LIVENESS_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                if not self.is_running and not future.done():
                    raise EngineError(f"the engine stopped: {self.failure or 'shut down'}") from None

    def save_slot(self, slot_id: int, path: str) -> int:
        return self._slot_job("save_slot", slot_id, str(path))

    def restore_slot(self, slot_id: int, path: str) -> int:
        return self._slot_job("restore_slot", slot_id, str(path))

    def erase_slot(self, slot_id: int) -> int:
        return self._slot_job("erase_slot", slot_id)

    def stats(self) -> EngineStats:
        """Latest snapshot (refreshed by the engine thread after every step and when idle)."""
        return self._stats

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        stopping: list[_Shutdown] = []
        failures = 0
        try:
            while True:
                try:
                    if self._iteration(stopping):
                        return
                    failures = 0
                except Exception as exc:  # a bug anywhere in the loop must not hang every client
                    failures += 1
                    logger.exception("engine loop failed (%d in a row); failing the requests in flight", failures)
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        self.failure = f"{failures} consecutive failures, the last: {exc!r}"
                        raise
                    self._fail_all(exc)
        except BaseException as exc:
            self.failure = self.failure or f"{exc!r}"
            logger.critical("engine thread stopped: %s", self.failure)
            self._fail_everything(EngineError(f"the engine stopped: {self.failure}"))

    def _iteration(self, stopping: list[_Shutdown]) -> bool:
        """One pass of the engine loop; True once a shutdown is complete."""
        busy = self.core.has_work() or bool(self._pending_embeds)
        outputs: list[RequestOutput] = []
        for command in self._drain_inbox(block=not busy and not stopping):
            if isinstance(command, _Shutdown):
                stopping.append(command)
            else:
                outputs.extend(self._handle(command))
        if stopping and not stopping[0].drain:
            outputs.extend(self.core.abort_all())
        self._run_embeds()
        if self.core.has_work():
            try:
                outputs.extend(self.core.step())
            except Exception as exc:  # a model bug: these requests fail, the engine goes on
                logger.exception("engine step failed; aborting in-flight requests")
                self._fail_all(exc)
        # Publish stats before delivering, so a client that saw its last token sees its stats.
        self._stats = self.core.stats()
        self._deliver(outputs)
        if stopping and not self.core.has_work():
            self._fail_leftovers()
            return True
        return False

    def _fail_everything(self, error: EngineError) -> None:
        """The engine thread is ending abnormally: no stream, embedding or job may wait on it."""
        for stream in list(self._streams.values()):
            stream.put(error)
            self._release_inflight()
        self._streams.clear()
        for job in self._pending_embeds:
            try:
                job.loop.call_soon_threadsafe(_set_exception, job.future, error)
            except RuntimeError:
                pass
        self._pending_embeds.clear()
        try:
            self._fail_leftovers()
        except Exception:  # best effort: the waiters' liveness checks cover the rest
            logger.exception("failing queued requests after the engine stopped")

    def _fail_leftovers(self) -> None:
        """After shutdown: anything still queued (raced with shutdown) gets an error, not silence."""
        error = EngineError("the engine shut down")
        jobs = list(self._pending_embeds)
        self._pending_embeds.clear()
        for command in self._drain_inbox(block=False):
            if isinstance(command, _Embed):
                jobs.append(command)
            elif isinstance(command, _Add):
                command.stream.put(error)
                self._release_inflight()
            elif isinstance(command, _SlotJob):
                command.future.set_exception(error)
        for job in jobs:
            try:
                job.loop.call_soon_threadsafe(_set_exception, job.future, error)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _drain_inbox(self, block: bool) -> list[Any]:
        commands = []
        if block:
            commands.append(self._inbox.get())
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, command: Any) -> list[RequestOutput]:
        if isinstance(command, _Add):
            request_id = command.request.request_id
            self._streams[request_id] = command.stream
            try:
                self.core.add_prepared(command.request)
            except Exception as exc:  # prepared already; anything here is a bug
                self._streams.pop(request_id, None)
                self._release_inflight()
                command.stream.put(EngineError(str(exc)))
        elif isinstance(command, _Abort):
            out = self.core.abort(command.request_id)
            if out is not None:
                return [out]
        elif isinstance(command, _Embed):
            self._pending_embeds.append(command)
        elif isinstance(command, _SlotJob):
            try:
                command.future.set_result(getattr(self.core, command.method)(*command.args))
            except Exception as exc:
                command.future.set_exception(exc)
        return []

    def _run_embeds(self) -> None:
        while self._pending_embeds:
            job = self._pending_embeds[0]
            try:
                result = self.core.embed(job.prompt_ids)
            except Exception as exc:
                self._pending_embeds.pop(0)
                job.loop.call_soon_threadsafe(_set_exception, job.future, exc)
                continue
            if result is None:  # every slot busy: retry after the next step
                return
            self._pending_embeds.pop(0)
            job.loop.call_soon_threadsafe(_set_result, job.future, result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            # A request that failed alone (its sampler raised) ends its stream with an error.
            stream.put(EngineError(out.error) if out.error is not None else out)
            if out.is_finished:
                del self._streams[out.request_id]
                self._release_inflight()

    def _fail_all(self, exc: Exception) -> None:
        """Every request in flight ends with an error, then the core is reset (its slots' K/V
        may be half written)."""
        error = EngineError(f"engine step failed: {exc!r}")
        for stream in self._streams.values():
            stream.put(error)
            self._release_inflight()
        self._streams.clear()
        self.core.reset_after_error()

    def _release_inflight(self) -> None:
        with self._lock:
            self._n_inflight -= 1


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
