"""Graceful shutdown: SIGTERM / SIGINT stop new work (503 "shutting down", /health included),
let running streams finish (finish_reason + [DONE]), abort what is left after --timeout or on a
second signal, shut the engine down and exit 0.

Fast tests run the real `ggserve` process over the fake engine (tests/server/fake_server.py); one slow
test does the same with the real Qwen model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ggserve.server.shutdown import DrainState
from tests.server.fake_server import REPO, fake_server_process, free_port
from tests.server.helpers import CHAT, fake_client

REPLY = "Hello world! I am a fake model."


class StreamReader:
    """Reads one streamed chat completion on a thread; `chunks` fill in as they arrive."""

    def __init__(self, url: str, body: dict):
        self.events: list[str] = []
        self.error: Exception | None = None
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
        except Exception as exc:  # reported by the test
            self.error = exc
        self.ended_at = time.monotonic()

    def wait_for_chunks(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"only {len(self.events)} chunks after {timeout}s"
            time.sleep(0.01)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        assert self.error is None, f"the stream broke: {self.error!r}"

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"])


def _assert_shutting_down(url: str) -> None:
    """While draining, new requests (and /health) fail fast with the 503 envelope."""
    t0 = time.monotonic()
    health = httpx.get(f"{url}/health", timeout=5)
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=5)
    assert time.monotonic() - t0 < 2.0
    for r in (health, chat):
        assert r.status_code == 503
        assert r.json()["error"] == {"message": "Server is shutting down", "type": "unavailable_error",
                                     "param": None, "code": 503}
        assert r.headers["connection"] == "close" and r.headers["retry-after"] == "1"


def _wait_for_log(server, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log_text()[-2000:]}"
        time.sleep(0.02)


# ---- in process ---------------------------------------------------------------------------------


def test_draining_app_answers_503_shutting_down_and_counts_nothing_new():
    with fake_client() as client:
        assert client.get("/health").status_code == 200
        drain: DrainState = client.app.state.ggserve.drain
        assert drain.in_flight == 0  # the finished request was counted out again
        drain.begin("SIGTERM")
        r = client.get("/health")
        r2 = client.post("/v1/chat/completions", json={"messages": CHAT}, headers={"Origin": "http://ui.example"})
        assert client.engine.requests == []  # never reached the engine
    assert r.status_code == 503 and r.json()["error"]["message"] == "Server is shutting down"
    assert r2.status_code == 503 and r2.headers["access-control-allow-origin"] == "http://ui.example"


def test_drain_state_second_signal_forces():
    drain = DrainState(timeout=5)
    assert not drain.draining and not drain.expired
    drain.begin("SIGTERM")
    assert drain.draining and not drain.forced and not drain.expired and drain.signal_name == "SIGTERM"
    drain.begin("SIGINT")
    assert drain.forced and drain.signal_name == "SIGTERM"
    with pytest.raises(ValueError, match="timeout"):
        DrainState(timeout=0)


# ---- the process over the fake engine -----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_the_running_stream_finish_then_exits_0(tmp_path, sig):
    with fake_server_process(tmp_path, env={"FAKE_TOKEN_DELAY": "0.05"}) as server:
        stream = StreamReader(server.url, {"messages": CHAT, "max_tokens": 40})
        stream.wait_for_chunks(3, timeout=10)
        server.proc.send_signal(sig)
        _wait_for_log(server, "not accepting new requests")
        _assert_shutting_down(server.url)
        assert server.proc.poll() is None  # still draining: the stream is not done yet
        stream.join(timeout=10)
        assert server.proc.wait(10) == 0
        log = server.log_text()
    assert stream.events[-1] == "[DONE]"
    assert stream.chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert stream.text == REPLY  # nothing was cut
    assert "fake engine shut down" in log and "all requests finished" in log
    assert "Traceback" not in log


def test_idle_server_exits_0_at_once(tmp_path):
    with fake_server_process(tmp_path) as server:
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - t0 < 3.0
        assert "fake engine shut down" in server.log_text()


def test_signal_while_the_model_loads_exits_0(tmp_path):
    with fake_server_process(tmp_path, env={"FAKE_LOAD_SECONDS": "2"}, wait_ready=False) as server:
        r = httpx.get(f"{server.url}/health", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        log = server.log_text()
    assert "Traceback" not in log and "server is ready" not in log


def test_timeout_aborts_running_requests_which_still_end_cleanly(tmp_path):
    with fake_server_process(tmp_path, "--timeout", "1", env={"FAKE_TOKEN_DELAY": "0.05"}) as server:
        body = {"messages": CHAT, "max_tokens": 400, "ignore_eos": True}  # 20 s of tokens
        stream = StreamReader(server.url, body)
        result: dict = {}
        blocking = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)))
        blocking.start()
        stream.wait_for_chunks(3, timeout=10)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        stream.join(timeout=10)
        blocking.join(10)
        assert server.proc.wait(10) == 0
        elapsed = time.monotonic() - t0
        log = server.log_text()
    assert 0.9 < elapsed < 6.0  # waited for --timeout 1, then aborted (not the 20 s of tokens)
    assert stream.events[-1] == "[DONE]" and stream.chunks[-1]["choices"][0]["finish_reason"] is not None
    assert 5 < len(stream.text) < 400
    r = result["r"]
    assert r.status_code == 200 and 5 < r.json()["usage"]["completion_tokens"] < 400
    assert "timeout of 1 s: aborting 2 running generation(s)" in log
    assert "fake engine shut down" in log and "Traceback" not in log


def test_second_signal_aborts_without_waiting_for_the_timeout(tmp_path):
    with fake_server_process(tmp_path, env={"FAKE_TOKEN_DELAY": "0.05"}) as server:
        stream = StreamReader(server.url, {"messages": CHAT, "max_tokens": 400, "ignore_eos": True})
        stream.wait_for_chunks(3, timeout=10)
        server.proc.send_signal(signal.SIGINT)
        _wait_for_log(server, "not accepting new requests")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)  # Ctrl+C twice
        stream.join(timeout=10)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5.0
        assert "second signal: aborting 1 running generation(s)" in server.log_text()
    assert stream.events[-1] == "[DONE]"


# ---- the real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_server_sigterm_mid_stream(qwen_path, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "ggserve.server", "-m", str(qwen_path), "--port", str(port), "-np", "2", "-c", "2048"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + float(os.environ.get("GGSERVE_TEST_STARTUP_TIMEOUT", "900"))
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        stream = StreamReader(url, {"messages": [{"role": "user", "content": "Count from 1 to 50."}],
                                    "max_tokens": 40, "temperature": 0, "ignore_eos": True})
        stream.wait_for_chunks(4, timeout=120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        _assert_shutting_down(url)  # a new connection during draining gets an answer, fast
        stream.join(timeout=300)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = log_path.read_text()
    assert stream.events[-1] == "[DONE]"
    assert stream.chunks[-1]["choices"][0]["finish_reason"] == "length"
    n_content = sum(1 for c in stream.chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert n_content >= 30  # all 40 tokens were generated (a few may merge or be held back by the detokenizer)
    assert "all requests finished" in log and "stopping the engine" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
