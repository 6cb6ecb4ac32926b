"""Streaming behaviour at the ASGI level: client disconnects abort the engine request and free
the slot, keep-alive pings are SSE comments, and the event loop stays free during generation."""
from __future__ import annotations

import asyncio
import json
import time

from ggserve.server.app import create_app
from ggserve.server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.helpers import CHAT, fake_client, sse_events


class AsgiCall:
    """Drive one HTTP request through the app; the client 'disconnects' on demand."""

    def __init__(self, app, method: str, path: str, body: dict | None = None):
        self.app, self.method, self.path = app, method, path
        self.body = json.dumps(body).encode() if body is not None else b""
        self.status: int | None = None
        self.chunks: list[bytes] = []
        self.disconnect = asyncio.Event()
        self._sent_body = False

    async def _receive(self):
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and message.get("body"):
            self.chunks.append(message["body"])

    async def run(self):
        path, _, query = self.path.partition("?")
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1234), "server": ("test", 80), "root_path": "",
        }
        await self.app(scope, self._receive, self._send)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()


async def _with_app(engine: FakeEngine, coro_fn, **settings):
    app = create_app(ServerSettings(**settings), engine=engine)
    async with app.router.lifespan_context(app):
        return await coro_fn(app)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def _wait_for(predicate, timeout=5.0):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_stream_disconnect_aborts_and_frees_the_slot():
    engine = FakeEngine(token_delay=0.01, repeat_reply=True, n_slots=1)

    async def scenario(app):
        call = AsgiCall(app, "POST", "/v1/chat/completions", {"messages": CHAT, "stream": True, "max_tokens": 4000})
        task = asyncio.create_task(call.run())
        await _wait_for(lambda: len(call.chunks) >= 4)
        call.disconnect.set()
        await asyncio.wait_for(task, 5)
        await _wait_for(lambda: not engine._active)
        assert engine.aborted == [engine.requests[0].request_id]
        n_streamed = len(call.chunks)
        # the only slot is free again: a new request completes promptly
        t0 = time.monotonic()
        follow = AsgiCall(app, "POST", "/completion", {"prompt": "Hi", "n_predict": 3})
        await follow.run()
        assert follow.status == 200 and json.loads(follow.text)["content"] == "Hel"
        assert time.monotonic() - t0 < 2.0
        return n_streamed

    n_streamed = _run(_with_app(engine, scenario))
    assert n_streamed < 100  # dropped long before the 4000 tokens


def test_non_stream_disconnect_aborts():
    engine = FakeEngine(token_delay=0.01, repeat_reply=True)

    async def scenario(app):
        call = AsgiCall(app, "POST", "/completion", {"prompt": "Hi", "n_predict": 4000})
        task = asyncio.create_task(call.run())
        await _wait_for(lambda: engine.n_decode_total >= 3)
        call.disconnect.set()
        await asyncio.wait_for(task, 5)
        await _wait_for(lambda: not engine._active)
        assert engine.aborted == [engine.requests[0].request_id]
        assert engine.n_decode_total < 1000

    _run(_with_app(engine, scenario))


def test_health_answers_while_generating():
    engine = FakeEngine(token_delay=0.02, repeat_reply=True)

    async def scenario(app):
        gen = AsgiCall(app, "POST", "/completion", {"prompt": "Hi", "n_predict": 50, "stream": True})
        task = asyncio.create_task(gen.run())
        await _wait_for(lambda: len(gen.chunks) >= 2)
        t0 = time.monotonic()
        health = AsgiCall(app, "GET", "/health")
        await health.run()
        elapsed = time.monotonic() - t0
        assert health.status == 200 and elapsed < 0.5
        assert not task.done()  # the generation was still running meanwhile
        gen.disconnect.set()
        await asyncio.wait_for(task, 5)

    _run(_with_app(engine, scenario))


def test_pings_are_sse_comments():
    engine = FakeEngine(token_delay=0.15, reply="abc")
    with fake_client(engine, sse_ping_seconds=0.05) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    lines = r.text.splitlines()
    pings = [line for line in lines if line.startswith(":")]
    assert pings, "expected keep-alive comments during slow generation"
    assert all("ping" in p for p in pings)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                      for e in events[:-1] if json.loads(e)["choices"])
    assert content == "abc"


def test_sse_framing_uses_blank_line_separators():
    with fake_client() as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True, "max_tokens": 1})
    assert r.text.startswith("data: {")
    assert "\r" not in r.text and r.text.rstrip("\n").endswith("data: [DONE]")
    assert r.headers["cache-control"] == "no-cache"
