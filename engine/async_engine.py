"""asyncio front of the engine: EngineCore on ONE background thread, results as async iterators.

The engine thread blocks on its inbox while there is nothing to do (no busy spin), otherwise it
drains the inbox (new requests, aborts, embeddings, shutdown) and runs one `EngineCore.step()`
per iteration. Each request's deltas go to its own asyncio.Queue through
`loop.call_soon_threadsafe`. A bounded waiting queue turns overload into EngineBusyError (503).
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
    RequestOutput,
    new_request_id,
)
from ggserve.engine.stats import EngineStats

logger = logging.getLogger(__name__)


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
    request_id: str
    prompt_ids: list[int]
    params: GenerationParams
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

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine thread: abort in-flight requests (or let them finish with drain=True)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._inbox.put(_Shutdown(drain))
        self._thread.join(timeout)

    # ---- requests ----------------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[int], params: GenerationParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a completion; iterate the result for its deltas (the last has finish_reason set).

        Raises right away (not on first iteration): PromptTooLongError / ValueError for a request
        that can never run, EngineBusyError when the waiting queue is full. Must be called from
        a running event loop. Closing or cancelling the iterator aborts the request.
        """
        params = params if params is not None else GenerationParams()
        prompt_ids = [int(t) for t in prompt_ids]
        self.core.validate(prompt_ids, params)
        if self._closed:
            raise EngineError("the engine is shut down")
        with self._lock:
            if self._n_inflight >= self.config.n_slots + self.max_queue:
                raise EngineBusyError(
                    f"the server is busy: {self._n_inflight} requests in flight "
                    f"({self.config.n_slots} slots + {self.max_queue} queued)"
                )
            self._n_inflight += 1
        request_id = request_id or new_request_id()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(_Add(request_id, prompt_ids, params, stream))
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
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
        if self._closed:
            raise EngineError("the engine is shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Embed(prompt_ids, loop, future))
        return await future

    def _slot_job(self, method: str, *args: Any) -> int:
        # Blocking: the server calls these from a worker thread, never the event loop.
        if not self.is_running:
            raise EngineError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_SlotJob(method, args, future))
        return future.result()

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
        stopping: _Shutdown | None = None
        while True:
            busy = self.core.has_work() or bool(self._pending_embeds)
            outputs: list[RequestOutput] = []
            for command in self._drain_inbox(block=not busy and stopping is None):
                if isinstance(command, _Shutdown):
                    stopping = command
                else:
                    outputs.extend(self._handle(command))
            if stopping is not None and not stopping.drain:
                outputs.extend(self.core.abort_all())
            self._run_embeds()
            if self.core.has_work():
                try:
                    outputs.extend(self.core.step())
                except Exception as exc:  # a model bug must not hang every client
                    logger.exception("engine step failed; aborting in-flight requests")
                    self._fail_all(exc)
            # Publish stats before delivering, so a client that saw its last token sees its stats.
            self._stats = self.core.stats()
            self._deliver(outputs)
            if stopping is not None and not self.core.has_work():
                self._fail_leftovers()
                return

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
            self._streams[command.request_id] = command.stream
            try:
                self.core.add_request(command.prompt_ids, command.params, request_id=command.request_id)
            except Exception as exc:  # validated already; anything here is a bug
                self._streams.pop(command.request_id, None)
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
        self.core.reset_after_error()
        error = EngineError(f"engine step failed: {exc!r}")
        for stream in self._streams.values():
            stream.put(error)
            self._release_inflight()
        self._streams.clear()

    def _release_inflight(self) -> None:
        with self._lock:
            self._n_inflight -= 1


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
