"""Errors as the client sees them: the OpenAI error envelope with llama-server's types.

Owns: `APIError` (raise it anywhere in a route), the envelope
`{"error": {"message", "type", "param", "code"}}` (code = the HTTP status, as llama-server),
and the exception handlers that turn validation errors, malformed JSON and anything unexpected
into that envelope (`CatchAll`). An unexpected exception becomes a 500 whose body never holds a
traceback (the traceback goes to the log), and the connection stays open.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ggserve.server")

# llama-server's error types, by HTTP status
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


class APIError(Exception):
    """An error with an HTTP status that becomes the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.headers = headers
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        error.update(self.extra)
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def context_exceeded(n_prompt_tokens: int, n_ctx: int) -> APIError:
    return APIError(
        400,
        f"the request exceeds the available context size ({n_prompt_tokens} prompt tokens, "
        f"{n_ctx} per slot), try increasing it",
        type="exceed_context_size_error",
        extra={"n_prompt_tokens": n_prompt_tokens, "n_ctx": n_ctx},
    )


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first pydantic error as 'field: message' (what a client needs to fix its request)."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if param:
        return f"{param}: {message}", param
    return message, None


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if hasattr(exc, "errors") else []
    message, param = _describe_validation(list(errors))
    return APIError(400, message, param=param).response()


async def _http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()


def unexpected_error(exc: BaseException) -> APIError:
    """What a client sees for an exception no route turned into an APIError. A too-deep input
    (RecursionError) and text that is not valid Unicode (a lone surrogate) are the client's doing:
    400s; anything else is ours: a 500 whose body never holds a traceback."""
    if isinstance(exc, RecursionError):
        return APIError(400, "the request is nested too deeply to process")
    if isinstance(exc, UnicodeError):
        return APIError(400, "the request holds text that is not valid Unicode (a lone surrogate?)")
    return APIError(500, "internal server error")


class CatchAll:
    """ASGI middleware (inside Starlette's ServerErrorMiddleware) that answers any exception with
    the envelope. Starlette's own catch-all sends its 500 and then re-raises, which makes uvicorn
    drop the keep-alive connection (the client's next request on it fails with ECONNRESET); here
    the exception ends at the response, so the connection stays usable."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            error = unexpected_error(exc)
            if error.status >= 500:
                log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                await error.response()(scope, receive, send)
            # a response already under way (a stream) cannot change its status: it just ends


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
