"""Shared helpers for the server tests: an app over the fake engine, SSE parsing, and the real
server process (`python -m ggserve.server -m <model> ...`) for the slow black-box tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from ggserve.server.app import create_app
from ggserve.server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.testdata import REPO_ROOT as REPO


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


STARTUP_TIMEOUT = float(os.environ.get("GGSERVE_TEST_STARTUP_TIMEOUT", "900"))


def stop_process(proc: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after grace_seconds."""
    proc.terminate()
    try:
        proc.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model_path: Path, log_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start the real server on a free port with `args`, wait for /health, yield (process, base URL),
    stop it afterwards. The server's output goes to log_dir/server.log (shown on failure)."""
    port = free_port()
    log_path = log_dir / "server.log"
    cmd = [sys.executable, "-m", "ggserve.server", "-m", str(model_path), "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            stop_process(proc, 30)


@contextmanager
def running_server(model_path: Path, log_dir: Path, *args: str) -> Iterator[str]:
    """`server_process`, yielding the base URL only."""
    with server_process(model_path, log_dir, *args) as (_, url):
        yield url
