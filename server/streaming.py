"""Server-sent events: turning a generation into an SSE response.

Owns: the SSE framing (`data: <json>` + blank line, `\n` separators as llama-server), keep-alive
pings sent as SSE comments, the OpenAI `data: [DONE]` terminator, an in-band error event if
something fails after the stream has started, and aborting the engine request when the client
goes away (sse-starlette cancels the body iterator; our `finally` closes the generation).
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from server.errors import APIError
from server.generation import Generation

log = logging.getLogger("ggserve.server")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment=f"ping - {datetime.now(timezone.utc).isoformat()}")


def sse_response(
    events: AsyncIterator[Any], gen: Generation, *, ping_seconds: float, send_timeout: float, done_marker: bool
) -> EventSourceResponse:
    """Stream `events` (dicts become JSON `data:` lines); always closes `gen` at the end."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield dumps(event)
            if done_marker:
                yield "[DONE]"
        except APIError as exc:
            yield dumps(exc.body())
        except Exception:  # the status line is already sent: report in-band, log the traceback
            log.exception("error while streaming request %s", gen.request_id)
            yield dumps(APIError(500, "internal server error").body())
        finally:
            await gen.aclose()

    return EventSourceResponse(
        body(),
        ping=ping_seconds,
        ping_message_factory=_ping,
        sep="\n",
        send_timeout=send_timeout,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
