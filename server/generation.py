"""One generation request as the routes drive it: start, iterate, collect, abort.

Owns: `Generation` (wraps `engine.generate(...)`, whose refusals — busy, invalid — become
400 / 503 before any response starts; records TTFT and inter-token latency; aborts the engine
request whenever it is closed unfinished),
`Completion` (the accumulated result of one request) and `collect` (drive a generation to the
end while watching for a client disconnect); for requests with several choices / prompts:
`start_many`, `collect_all` and `merge` (interleave several streams as their outputs arrive).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ggserve.server import engine_api
from ggserve.server.errors import APIError, context_exceeded

DISCONNECT_POLL_SECONDS = 0.25
RETRY_AFTER_SECONDS = "1"


@dataclass
class Completion:
    """Everything a final response needs about one finished (or aborted) request."""

    request_id: str
    n_prompt_tokens: int
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # [((id, logprob), [(id, logprob), ...]), ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_type: str = "none"  # "eos" | "word" | "limit" | "none"
    stopping_word: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    slot_id: int = -1
    truncated: bool = False  # the context filled up (or was shifted) during the request

    def add(self, out: Any) -> None:
        self.content += out.new_text or ""
        self.token_ids.extend(out.new_token_ids or ())
        self.logprobs.extend(engine_api.read_logprobs(out.logprobs))
        self.slot_id = out.slot_id
        self.truncated = self.truncated or out.truncated
        self.timings = engine_api.read_timings(out.timings)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.stop_type = out.stop_type
            self.stopping_word = out.stopping_word

    @property
    def n_cached_prompt_tokens(self) -> int:
        return int(self.timings.get("cache_n", 0))

    @property
    def oai_finish_reason(self) -> str:
        """OpenAI's view: a stop word or EOS is "stop", everything else "length"."""
        return "stop" if self.stop_type in ("eos", "word") or self.finish_reason == "stop" else "length"


def new_request_id() -> str:
    return uuid.uuid4().hex


def _as_api_error(exc: Exception) -> Exception:
    """The engine's refusals as HTTP errors; anything else is passed on unchanged (-> 500)."""
    if isinstance(exc, engine_api.EngineBusyError):
        message = str(exc) or "the server is busy, try again later"
        return APIError(503, message, headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(exc, ValueError):
        n_prompt_tokens, n_ctx = getattr(exc, "n_prompt_tokens", None), getattr(exc, "n_ctx", None)
        if n_prompt_tokens is not None and n_ctx is not None:  # the engine's PromptTooLongError
            return context_exceeded(int(n_prompt_tokens), int(n_ctx))
        return APIError(400, str(exc))
    return exc


class Generation:
    """An engine request in flight. Use `await Generation.start(...)`, then iterate or `collect`."""

    def __init__(self, engine: Any, request_id: str, iterator: AsyncIterator, metrics: Any, n_prompt: int):
        self.engine = engine
        self.request_id = request_id
        self._iterator = iterator
        self._metrics = metrics
        self._t_start = time.perf_counter()
        self._t_last_token: float | None = None
        self.finished = False
        self.completion = Completion(request_id=request_id, n_prompt_tokens=n_prompt)

    @classmethod
    async def start(cls, engine: Any, prompt_ids: list[int], params: Any, metrics: Any) -> "Generation":
        """Submit the request. The engine refuses bad or unadmittable requests right here (before
        any response starts), so they become a clean 400 / 503 and not a broken stream."""
        request_id = new_request_id()
        try:
            # the sampler's grammar / DRY / bias tables are built on a worker thread: neither the
            # event loop nor the engine thread waits for one request's setup
            prepared = await run_in_threadpool(engine.prepare, prompt_ids, params, request_id)
            iterator = engine.generate(prompt_ids, params, request_id=request_id, prepared=prepared)
        except Exception as exc:
            raise _as_api_error(exc) from None
        return cls(engine, request_id, iterator.__aiter__(), metrics, len(prompt_ids))

    async def _next_raw(self) -> Any:
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            return None
        except (engine_api.EngineBusyError, ValueError) as exc:  # refused late (lazy engines)
            raise _as_api_error(exc) from None

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        out = await self._next_raw()
        if out is None:
            self.finished = True
            raise StopAsyncIteration
        self._observe(out)
        self.completion.add(out)
        if out.is_finished:
            self.finished = True
        return out

    def _observe(self, out: Any) -> None:
        if not out.new_token_ids:
            return
        now = time.perf_counter()
        if self._t_last_token is None:
            self._metrics.observe_ttft(now - self._t_start)
        else:
            per_token = (now - self._t_last_token) / len(out.new_token_ids)
            for _ in out.new_token_ids:
                self._metrics.observe_inter_token(per_token)
        self._t_last_token = now

    async def aclose(self) -> None:
        """Abort the engine request if it is still running (client gone, error, cancel)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
        close = getattr(self._iterator, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # an iterator that cannot close cleanly must not mask the cause
                pass


async def collect(gen: Generation, request: Request | None) -> Completion:
    """Run `gen` to the end; if the client disconnects meanwhile, abort it."""

    async def drain() -> None:
        async for _ in gen:
            pass

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                task.result()
                return gen.completion
            if request is not None and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
        await gen.aclose()


async def start_many(engine: Any, jobs: Sequence[tuple[list[int], Any]], metrics: Any) -> list[Generation]:
    """Start one generation per (prompt_ids, params); if any is refused, abort the started ones."""
    gens: list[Generation] = []
    try:
        for prompt_ids, params in jobs:
            gens.append(await Generation.start(engine, prompt_ids, params, metrics))
    except BaseException:
        await close_all(gens)
        raise
    return gens


async def close_all(gens: Sequence[Generation]) -> None:
    for gen in gens:
        await gen.aclose()


async def collect_all(gens: Sequence[Generation], request: Request | None) -> list[Completion]:
    """Run every generation to the end, concurrently; any failure aborts them all."""
    try:
        return list(await asyncio.gather(*(collect(g, request) for g in gens)))
    finally:
        await close_all(gens)


async def merge(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """(index, output) from all generations in arrival order; (index, None) when generation
    `index` has finished. An error in one ends the merge (the caller closes the generations)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for out in gen:
                queue.put_nowait((index, out, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        # wait for them: their generations' cleanup (the abort, the access log's token counts)
        # must be done before the response is
        await asyncio.gather(*tasks, return_exceptions=True)
