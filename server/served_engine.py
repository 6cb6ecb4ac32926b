"""The engine as the routes see it: the engine itself, plus two things the server needs to know
about every generation without the routes passing them along.

Owns: `ServedEngine`, which forwards every attribute to the engine and wraps `generate` to
(1) add the generation's prompt / predicted / cached token counts to the current request's
access-log record (server/access_log.py), and (2) keep the ids of running generations, so a
shutdown that runs out of time can abort them all (`abort_running`) and let each response end
cleanly (finish_reason + [DONE]) instead of being cut off.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from ggserve.server.access_log import AccessRecord, current_record


class ServedEngine:
    def __init__(self, engine: Any) -> None:
        self.wrapped = engine
        self.running: set[str] = set()  # request ids whose outputs are still being read

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def generate(self, prompt_ids: Any, params: Any, request_id: str | None = None, prepared: Any = None) -> Any:
        # refusals (busy, prompt too long) are raised here, before any output, as by the engine
        iterator = self.wrapped.generate(prompt_ids, params, request_id=request_id, prepared=prepared)
        record = current_record.get()  # None outside an HTTP request (warm-up, tests)
        if request_id is None and record is None:
            return iterator
        return self._follow(iterator, request_id, record, len(prompt_ids))

    def abort_running(self) -> int:
        """Abort every running generation; returns how many. Each ends with finish_reason
        "abort" within one engine step."""
        ids = list(self.running)
        for request_id in ids:
            self.wrapped.abort(request_id)
        return len(ids)

    async def _follow(self, iterator: AsyncIterator[Any], request_id: str | None, record: AccessRecord | None,
                      n_prompt: int) -> AsyncIterator[Any]:
        n_predicted = 0
        timings = None
        if request_id is not None:
            self.running.add(request_id)
        try:
            async for out in iterator:
                n_predicted += len(out.new_token_ids)
                timings = out.timings
                yield out
        finally:
            self.running.discard(request_id)
            if record is not None:
                # the engine's own count is authoritative once it sent an output
                record.n_generations += 1
                record.prompt_tokens += n_prompt
                record.predicted_tokens += timings.predicted_n if timings is not None else n_predicted
                record.cached_tokens += timings.cache_n if timings is not None else 0
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()
