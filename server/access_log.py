"""The access log: one line per HTTP request, written when the response has been sent in full.

Owns: `AccessLogMiddleware` (pure ASGI, so a streamed response is logged when its last byte
went out, with the stream's whole duration), `AccessRecord` (what one request did) and
`current_record`, where server/served_engine.py adds each generation's prompt / predicted
token counts for the request that started it.

The record travels in a ContextVar: the middleware sets it in the request's task, and every
task the request spawns (sse-starlette's stream task group, `collect`'s drain task) copies that
context, so a generation finds its request's record without the routes passing it along.

Line format (text): `POST /v1/chat/completions 200 1234.5ms prompt=12 predicted=40 client=127.0.0.1`.
JSON fields: method, path, status, duration_ms, client, and prompt_tokens / predicted_tokens /
cached_tokens when the request generated. Successful /health and /metrics probes are logged at
DEBUG (load balancers poll them every few seconds); everything else at INFO.
"""
from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ggserve.access")

PROBE_PATHS = frozenset({"/health", "/v1/health", "/metrics"})


@dataclass
class AccessRecord:
    method: str
    path: str
    client: str = "-"
    status: int = 0  # 0 until the response starts
    n_generations: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    predicted_tokens: int = 0
    error: str = ""  # the exception that ended the request, if any

    def fields(self, duration_ms: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "path": self.path, "status": self.status,
            "duration_ms": round(duration_ms, 1), "client": self.client,
        }
        if self.n_generations:
            out.update(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                       predicted_tokens=self.predicted_tokens)
        if self.error:
            out["error"] = self.error
        return out

    def line(self, duration_ms: float) -> str:
        text = f"{self.method} {self.path} {self.status} {duration_ms:.1f}ms"
        if self.n_generations:
            text += f" prompt={self.prompt_tokens} predicted={self.predicted_tokens}"
            if self.cached_tokens:
                text += f" cached={self.cached_tokens}"
        if self.error:
            text += f" error={self.error}"
        return f"{text} client={self.client}"


# The current request's record (None outside a request). A ContextVar, not shared state: each
# request's task sees only its own value.
current_record: ContextVar[AccessRecord | None] = ContextVar("ggserve_access_record", default=None)


class AccessLogMiddleware:
    """Pure ASGI middleware: with BaseHTTPMiddleware, `call_next` returns as soon as the response
    starts, so a stream would be logged (and timed) before it had run."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = AccessRecord(method=scope["method"], path=scope["path"], client=client[0] if client else "-")
        token = current_record.set(record)
        t0 = time.perf_counter()

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException as exc:  # cancelled (shutdown, disconnect) or a bug: still log the line
            record.error = type(exc).__name__
            if record.status == 0:
                record.status = 500
            raise
        finally:
            current_record.reset(token)
            duration_ms = (time.perf_counter() - t0) * 1000.0
            quiet = record.path in PROBE_PATHS and record.status < 400
            log.log(logging.DEBUG if quiet else logging.INFO, "%s", record.line(duration_ms),
                    extra={"fields": record.fields(duration_ms)})
