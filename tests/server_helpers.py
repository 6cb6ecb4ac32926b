"""Shared helpers for the server tests: an app over the fake engine, and SSE parsing."""
from __future__ import annotations

import json
from contextlib import contextmanager

from starlette.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.fake_engine import FakeEngine


@contextmanager
def fake_client(engine: FakeEngine | None = None, raise_server_exceptions: bool = True, **settings):
    engine = engine or FakeEngine()
    app = create_app(ServerSettings(**settings), engine=engine)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        client.engine = engine
        yield client


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def sse_json(text: str) -> list[dict]:
    return [json.loads(e) for e in sse_events(text) if e != "[DONE]"]


CHAT = [{"role": "user", "content": "Say hello"}]
