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
from typing import Any, AsyncIterator, Sequence

from sse_starlette import EventSourceResponse, ServerSentEvent

from ggserve.server.errors import APIError
from ggserve.server.generation import Generation, close_all

log = logging.getLogger("ggserve.server")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment=f"ping - {datetime.now(timezone.utc).isoformat()}")


def sse_response(
    events: AsyncIterator[Any], gen: Generation | Sequence[Generation], *, ping_seconds: float, send_timeout: float,
    done_marker: bool,
) -> EventSourceResponse:
    """Stream `events` (dicts become JSON `data:` lines); always closes `gen` (or every
    generation of a list: the choices of an n > 1 request) at the end."""
    gens = [gen] if isinstance(gen, Generation) else list(gen)

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield dumps(event)
            if done_marker:
                yield "[DONE]"
        except APIError as exc:
            yield dumps(exc.body())
        except Exception:  # the status line is already sent: report in-band, log the traceback
            log.exception("error while streaming request %s", ",".join(g.request_id for g in gens))
            yield dumps(APIError(500, "internal server error").body())
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:  # stop the event source first (e.g. a merge's pump tasks)
                try:
                    await close()
                except Exception:  # closing must not mask the cause
                    pass
            await close_all(gens)

    return EventSourceResponse(
        body(),
        ping=ping_seconds,
        ping_message_factory=_ping,
        sep="\n",
        send_timeout=send_timeout,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
