"""`BodyLimit`: ASGI middleware that refuses a request body over `max_body_bytes` with a 413.

A declared Content-Length over the limit is refused before anything is read; a body without one
(chunked) is counted as it arrives and refused the moment it passes the limit, so a huge body is
never held in memory or parsed.
"""
from __future__ import annotations

from typing import Any

from ggserve.server.errors import APIError


def too_large(max_body_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than {max_body_bytes} bytes (--max-body-bytes)",
                    type="invalid_request_error")


class BodyLimit:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(limit).response()(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(limit)  # the route's body read fails; the handler answers 413
            return message

        await self.app(scope, counted_receive, send)
