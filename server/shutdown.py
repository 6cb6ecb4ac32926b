"""Graceful shutdown: on SIGTERM / SIGINT, drain running requests, then stop.

Owns: `DrainState` (are we draining, how many requests are in flight, until when we wait),
`DrainGate` (ASGI middleware: counts requests in flight; while draining, answers every new
request, /health included, with 503 "Server is shutting down" + `Connection: close` +
`Retry-After`, the OpenAI error envelope) and `GracefulServer` (uvicorn's Server with our signal
handling).

Sequence: the first signal starts draining. The listening socket stays open, so load balancers
see /health turn 503 and new requests fail fast with a 503 they retry elsewhere (deploy/nginx.conf
retries http_503) instead of hanging or being refused mid-retry. Running requests and streams
run to completion. After `--timeout` seconds, or on a second signal, the running generations
are aborted (each response still ends properly, with what was generated so far). When no
request is left (or ABORT_GRACE_SECONDS after aborting) the server stops: uvicorn closes the
socket and idle connections, cancels anything still running after another
ABORT_GRACE_SECONDS, the lifespan shuts the engine down, and the process exits 0.

Never a hang: whatever is stuck (an engine step that does not return, a worker thread), the
process is gone HARD_EXIT_MARGIN_SECONDS after `--timeout` from the first signal (exit 1, it had
to be forced), and FORCED_EXIT_SECONDS after a second signal (exit 0: asked twice, it stops now).
Both are timer threads started by the signal handler, so a blocked event loop cannot stop them.

Why not uvicorn's own handling: it closes the socket at once (no 503 /health while draining),
re-raises the signal after serving (the process dies by SIGTERM, not exit 0), and sse-starlette
patches `Server.handle_exit` to cancel every SSE stream the moment a signal arrives, so
streaming generations would be cut instead of finishing. Overriding `handle_exit` here bypasses
both; sse-starlette's watcher still sees `should_exit`, which we set only once draining is over,
so at that point it cancels only the streams that overran the timeout.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

import uvicorn
from fastapi.responses import JSONResponse

from ggserve.server.errors import APIError
from ggserve.server.http_protocol import EnvelopeH11Protocol

log = logging.getLogger("ggserve.server")

# after the drain, how long uvicorn waits for leftover connections before cancelling their tasks
ABORT_GRACE_SECONDS = 3
HARD_EXIT_MARGIN_SECONDS = 4.5  # first signal: the process is gone by --timeout + this
FORCED_EXIT_SECONDS = 1.5  # second signal: the process is gone by this


def exit_after(seconds: float, code: int, why: str) -> threading.Timer:
    """A daemon timer that ends the process with `code` unless it has exited by then."""

    def fire() -> None:
        try:
            sys.stderr.write(f"ggserve: {why}; exiting now\n")
            sys.stderr.flush()
        finally:
            os._exit(code)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


@dataclass
class DrainState:
    timeout: float = 600.0  # seconds running requests get to finish once draining starts
    draining: bool = False
    forced: bool = False  # a second signal: stop waiting
    in_flight: int = 0  # HTTP requests inside the app right now (a stream counts until its end)
    started_at: float = 0.0  # time.monotonic() when draining began
    signal_name: str = ""

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"drain timeout must be > 0 seconds, got {self.timeout}")

    def begin(self, signal_name: str) -> None:
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()
            self.signal_name = signal_name
        else:
            self.forced = True

    @property
    def expired(self) -> bool:
        return self.draining and time.monotonic() - self.started_at >= self.timeout


def shutting_down_response() -> JSONResponse:
    error = APIError(503, "Server is shutting down", type="unavailable_error")
    # close the connection too: a keep-alive client (or balancer pool) must reconnect elsewhere
    return JSONResponse(error.body(), status_code=503, headers={"Retry-After": "1", "Connection": "close"})


class DrainGate:
    """Pure ASGI middleware, so a streamed response counts as in flight until its last byte."""

    def __init__(self, app: Any, drain: DrainState) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await shutting_down_response()(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains on the first SIGTERM/SIGINT instead of stopping at once.

    `abort_running()` aborts every running generation (returns how many); it is called when the
    drain times out or a second signal arrives, so those responses still end properly (a final
    chunk + [DONE], or a JSON body) rather than being cut off."""

    def __init__(self, config: uvicorn.Config, drain: DrainState, abort_running: Callable[[], int]) -> None:
        super().__init__(config)
        self.drain = drain
        self.abort_running = abort_running
        self._announced = False
        self._aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set flags (logging here could interleave with an interrupted
        # log call); on_tick, on the event loop, acts on them within 0.1 s. Deliberately no
        # super(): see the module docstring.
        if self.should_exit:
            self.force_exit = True  # a third signal: stop waiting for connections, too
        first = not self.drain.draining
        self.drain.begin(signal.Signals(sig).name)
        if first:
            exit_after(self.drain.timeout + HARD_EXIT_MARGIN_SECONDS, 1,
                       f"still running {HARD_EXIT_MARGIN_SECONDS:g} s after the drain timeout")
        else:
            exit_after(FORCED_EXIT_SECONDS, 0, "second signal")

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        drain = self.drain
        if not drain.draining:
            return False
        if not self._announced:
            self._announced = True
            log.info("%s received: not accepting new requests; waiting up to %g s for %d running request(s)",
                     drain.signal_name, drain.timeout, drain.in_flight)
        if drain.in_flight == 0:
            log.info("all requests finished; shutting down")
        elif self._aborted_at is None:
            if drain.forced or drain.expired:
                why = "second signal" if drain.forced else f"timeout of {drain.timeout:g} s"
                n_aborted = self.abort_running()
                log.warning("%s: aborting %d running generation(s) (%d request(s) open)",
                            why, n_aborted, drain.in_flight)
                self._aborted_at = time.monotonic()
            return False
        elif time.monotonic() - self._aborted_at < ABORT_GRACE_SECONDS:
            return False  # aborted generations end within an engine step; give them the chance
        else:
            log.warning("%d request(s) still open after aborting; closing them", drain.in_flight)
        self.should_exit = True  # also tells sse-starlette to cancel any stream still running
        return True


def make_server(app: Any, drain: DrainState, abort_running: Callable[[], int], **config: Any) -> GracefulServer:
    """A GracefulServer for `app`; `config` are uvicorn.Config keyword arguments."""
    config.setdefault("timeout_graceful_shutdown", ABORT_GRACE_SECONDS)
    config.setdefault("log_config", None)
    config.setdefault("access_log", False)  # server/access_log.py writes one line per request
    config.setdefault("http", EnvelopeH11Protocol)  # malformed requests get the envelope (431 / 400)
    return GracefulServer(uvicorn.Config(app, **config), drain, abort_running)
